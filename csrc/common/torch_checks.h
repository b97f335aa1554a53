// Generic argument checks (dims, dtypes, metric and plan names) that the per-op checks in
// common/op_checks.cpp are made of, and the conversions both backends apply after them
// (torch side only; never included by a .cu file). Every check names the op and the argument
// and raises ValueError in Python (TORCH_CHECK_VALUE), so direct torch.ops.knnfast.* calls
// fail as clearly as the Python wrappers do.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>

#include "common/knn_math.h"
#include "common/plans.h"

namespace knnfast {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ",
                    t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                    " must be float32, float16 or bfloat16, got ", s);
}

// Logits may be any floating dtype (float64 included); kernels read them as float32 rows.
inline void check_logits(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op,
                    ": logits must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_integer(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ",
                    name, " must be int64 or int32, got ", t.scalar_type());
}

inline Metric parse_metric(const std::string& metric, const char* op) {
  if (metric == "l2") return Metric::L2;
  if (metric == "ip") return Metric::IP;
  if (metric == "cos") return Metric::COS;
  TORCH_CHECK_VALUE(false, op, ": metric must be 'l2', 'ip' or 'cos', got '", metric, "'");
  return Metric::L2;
}

// The index of `plan` in `names` (one op's plans on `backend`, see common/plans.h), or a
// ValueError naming the plans this backend has.
template <size_t N>
int parse_plan(const std::string& plan, const std::array<const char*, N>& names,
               const char* backend, const char* op) {
  std::string listed;
  for (size_t i = 0; i < N; ++i) {
    if (plan == names[i]) return static_cast<int>(i);
    listed += std::string(i ? ", '" : "'") + names[i] + "'";
  }
  TORCH_CHECK_VALUE(false, op, ": plan must be one of ", listed, " on ", backend, ", got '", plan,
                    "'");
  return 0;
}

// Ops that write their result over the logits need them float32 and contiguous.
inline void check_in_place_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat && logits.is_contiguous(), op,
                    ": needs contiguous float32 logits (written in place), got ",
                    logits.scalar_type(), logits.is_contiguous() ? "" : " (non-contiguous)");
}

inline at::Tensor as_float32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline at::Tensor as_int64(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

// Per-row parameter (temperature, lam) shape check: numel 1 (all rows) or shape [rows].
inline void check_row_param_shape(const at::Tensor& t, int64_t rows, const char* op,
                                  const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 1 || (t.dim() == 1 && t.size(0) == rows), op, ": ", name,
                    " must be a float or a tensor of shape [", rows, "], got shape ", t.sizes());
}

}  // namespace knnfast
