// Argument checks shared by the CPU and CUDA wrappers (torch side only; never included by a
// .cu file). Every check names the op and the argument and raises ValueError in Python
// (TORCH_CHECK_VALUE), so direct torch.ops.knnfast.* calls fail as clearly as the Python
// wrappers do.
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

// knn_kd_loss's loss weights: ce_weight, kd_weight finite and >= 0, label_smoothing in [0, 1).
inline void check_kd_weights(double ce_weight, double kd_weight, double label_smoothing,
                             const char* op) {
  TORCH_CHECK_VALUE(ce_weight >= 0 && ce_weight < INFINITY, op,
                    ": ce_weight must be a finite number >= 0, got ", ce_weight);
  TORCH_CHECK_VALUE(kd_weight >= 0 && kd_weight < INFINITY, op,
                    ": kd_weight must be a finite number >= 0, got ", kd_weight);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 1, op,
                    ": label_smoothing must be in [0, 1), got ", label_smoothing);
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

// knn_search shapes (both backends): queries [B, D] and keys [N, D] float, 1 <= k <= max_k,
// N > 0, D > 0.
inline void check_search_shapes(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                int64_t max_k, const char* op) {
  check_dim(queries, 2, op, "queries");
  check_dim(keys, 2, op, "keys");
  check_floating(queries, op, "queries");
  check_floating(keys, op, "keys");
  TORCH_CHECK_VALUE(k >= 1 && k <= max_k, op, ": k must be in [1, ", max_k, "], got ", k);
  TORCH_CHECK_VALUE(keys.size(0) > 0, op, ": keys must have at least one row (N = 0)");
  TORCH_CHECK_VALUE(queries.size(1) == keys.size(1) && keys.size(1) > 0, op,
                    ": queries and keys must have the same dimension D > 0, got queries ",
                    queries.sizes(), " and keys ", keys.sizes());
}

// knn_rescore shapes (both backends): queries [B, D], keys [N, D], indices [B, k] integer.
inline void check_rescore_shapes(const at::Tensor& queries, const at::Tensor& keys,
                                 const at::Tensor& indices, const char* op) {
  check_dim(queries, 2, op, "queries");
  check_dim(keys, 2, op, "keys");
  check_dim(indices, 2, op, "indices");
  check_floating(queries, op, "queries");
  check_floating(keys, op, "keys");
  check_integer(indices, op, "indices");
  TORCH_CHECK_VALUE(queries.size(1) == keys.size(1), op,
                    ": queries and keys must have the same dimension D, got queries ",
                    queries.sizes(), " and keys ", keys.sizes());
  TORCH_CHECK_VALUE(indices.size(0) == queries.size(0), op, ": indices must have ",
                    queries.size(0), " rows (one per query), got ", indices.sizes());
}

}  // namespace knnfast
