// Argument checks and small helpers shared by the CPU kernels. Every check names the op and
// the argument and raises ValueError in Python (TORCH_CHECK_VALUE), so direct
// torch.ops.knnfast.* calls fail as clearly as the Python wrappers do.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/knn_math.h"
#include "common/torch_checks.h"

namespace knnfast::cpu {

using knnfast::as_float32;
using knnfast::as_int64;
using knnfast::check_dim;
using knnfast::check_floating;
using knnfast::check_integer;
using knnfast::check_logits;
using knnfast::parse_metric;

// Row r of a [B, V] logits tensor as float32: a pointer into it when it is float32, else
// converted into `buffer` (V floats).
inline const float* logits_row_f32(const at::Tensor& logits, int64_t r, float* buffer) {
  const int64_t V = logits.size(1);
  if (logits.scalar_type() == at::kFloat) return logits.data_ptr<float>() + r * V;
  at::from_blob(buffer, {V}, at::kFloat).copy_(logits[r]);
  return buffer;
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name,
                    " must be on the same device as the other inputs (cpu), got ", t.device());
}

// Targets [rows] -> int64 contiguous, every id in [0, vocab) or == ignore_index (the checks
// knn_gold_logprob and knn_kd_loss share; the caller has checked the dtype).
inline at::Tensor checked_targets(const at::Tensor& targets_in, int64_t rows, int64_t vocab,
                                  int64_t ignore_index, const char* op) {
  TORCH_CHECK_VALUE(targets_in.size(0) == rows, op, ": targets must have shape [", rows,
                    "], got ", targets_in.sizes());
  at::Tensor targets = as_int64(targets_in);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(tgt[r] == ignore_index || (tgt[r] >= 0 && tgt[r] < vocab), op,
                      ": targets must be in [0, ", vocab, ") or ignore_index (", ignore_index,
                      "), got ", tgt[r], " at row ", r);
  }
  return targets;
}

// Neighbour tokens [B, k]: int64 contiguous, every id in [-1, vocab) (vocab < 0: no bound).
inline at::Tensor checked_tokens(const at::Tensor& tokens, int64_t rows, int64_t vocab,
                                 const char* op, const char* name = "tokens") {
  check_cpu(tokens, op, name);
  check_dim(tokens, 2, op, name);
  check_integer(tokens, op, name);
  TORCH_CHECK_VALUE(tokens.size(0) == rows, op, ": ", name, " must have ", rows,
                    " rows (one per logits/scores row), got shape ", tokens.sizes());
  at::Tensor t = as_int64(tokens);
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const bool ok = p[i] >= -1 && (vocab < 0 || p[i] < vocab);
    if (!ok) {
      TORCH_CHECK_VALUE(false, op, ": ", name, " must hold ids in [-1, ",
                        vocab < 0 ? std::string("inf") : std::to_string(vocab),
                        "), got ", p[i], " at flat position ", i);
    }
  }
  return t;
}

// Per-row scalar (temperature, lambda): a float32 tensor of numel 1 (all rows) or B.
struct RowParam {
  at::Tensor storage;
  const float* data = nullptr;
  int64_t stride = 0;
  float operator[](int64_t row) const { return data[row * stride]; }
};

enum class ParamRange { Positive, UnitInterval };

inline RowParam row_param(const at::Tensor& t, int64_t rows, ParamRange range, const char* op,
                          const char* name) {
  check_cpu(t, op, name);
  check_row_param_shape(t, rows, op, name);
  RowParam p;
  p.storage = as_float32(t).reshape({-1});
  p.data = p.storage.data_ptr<float>();
  p.stride = p.storage.numel() == 1 ? 0 : 1;
  for (int64_t i = 0; i < p.storage.numel(); ++i) {
    const float v = p.data[i];
    if (range == ParamRange::Positive) {
      TORCH_CHECK_VALUE(v > 0.0f && v < INFINITY, op, ": ", name,
                        " must be > 0 and finite, got ", v, " (row ", i, ")");
    } else {
      TORCH_CHECK_VALUE(v >= 0.0f && v <= 1.0f, op, ": ", name, " must be in [0, 1], got ",
                        v, " (row ", i, ")");
    }
  }
  return p;
}

// Neighbour scores [B, k]: float32, finite or -inf (an invalid slot). NaN / +inf make the
// kNN softmax undefined, so they are rejected instead of silently turning rows into NaN.
inline at::Tensor checked_scores(const at::Tensor& scores, const at::Tensor& tokens,
                                 const char* op, const char* name = "scores") {
  check_cpu(scores, op, name);
  check_dim(scores, 2, op, name);
  check_floating(scores, op, name);
  TORCH_CHECK_VALUE(scores.sizes() == tokens.sizes(), op, ": ", name,
                    " must have the shape of tokens ", tokens.sizes(), ", got ",
                    scores.sizes());
  at::Tensor s = as_float32(scores);
  const float* p = s.data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i) {
    TORCH_CHECK_VALUE(!(p[i] != p[i]) && p[i] != INFINITY, op, ": ", name,
                      " must be finite or -inf, got ", p[i], " at flat position ", i);
  }
  return s;
}

// A fresh float32 output of `sizes`, with transparent huge pages requested for large ones
// before first touch: on kernels in THP "madvise" mode this removes most of the page-fault
// cost of a new [B, V] buffer (which otherwise exceeds the cost of the kernel itself).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

// Rows per parallel_for chunk so that each chunk does at least ~64K element-operations:
// small inputs then run on the calling thread instead of paying an OpenMP wake-up.
inline int64_t row_grain(int64_t work_per_row) {
  constexpr int64_t kMinWork = 1 << 16;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_row));
}

// Per-thread scratch that survives across rows of one call (allocated once per chunk).
template <typename T>
struct Scratch {
  std::vector<T> data;
  T* get(size_t n, T fill) {
    if (data.size() < n) data.assign(n, fill);
    return data.data();
  }
};

}  // namespace knnfast::cpu

#include "cpu/neighbour_weights.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {

// Validated neighbour inputs of one call: tokens int64, exactly one of scores / weights as
// float32, and the per-row temperature. Tensors are kept alive here; src points into them.
struct NeighbourInputs {
  at::Tensor tokens, scores, weights;
  NeighbourSource src;
  RowParam temperature;
};

inline NeighbourInputs neighbour_inputs(const at::Tensor& tokens,
                                        const c10::optional<at::Tensor>& scores,
                                        const c10::optional<at::Tensor>& weights,
                                        const at::Tensor& temperature, int64_t rows,
                                        int64_t vocab, const char* op) {
  TORCH_CHECK_VALUE(scores.has_value() != weights.has_value(), op,
                    ": pass exactly one of scores or weights");
  NeighbourInputs in;
  in.tokens = checked_tokens(tokens, rows, vocab, op);
  in.src.k = in.tokens.size(1);
  if (scores.has_value()) {
    in.scores = checked_scores(*scores, in.tokens, op, "scores");
    in.src.scores = in.scores.data_ptr<float>();
  } else {
    in.weights = checked_scores(*weights, in.tokens, op, "weights");
    const float* w = in.weights.data_ptr<float>();
    for (int64_t i = 0; i < in.weights.numel(); ++i) {
      TORCH_CHECK_VALUE(w[i] >= 0.0f && w[i] < INFINITY, op,
                        ": weights must be finite and >= 0, got ", w[i], " at flat position ", i);
    }
    in.src.weights = w;
  }
  in.temperature = row_param(temperature, rows, ParamRange::Positive, op, "temperature");
  return in;
}

// One row of the mixture (1 - lam) softmax(logits) + lam P_kNN, as knn_interpolate and
// knn_gold_logprob both need it.
struct MixtureRow {
  const float* logits;    // the row as float32
  RowLogSumExp lse;       // of the logits
  const int64_t* tokens;  // the row's k neighbour tokens
  bool has_knn;           // some neighbour is valid (else P_kNN is undefined)
  float lam;              // effective lam: 0 when the row has no valid neighbour
};

// Loads row r: logits (converted into row_buf unless float32), their log-sum-exp and the
// neighbour log-weights (into log_w). Returns false when the logits row holds NaN or +inf.
inline bool load_mixture_row(const at::Tensor& logits, int64_t r, float* row_buf,
                             const NeighbourInputs& in, const RowParam& lam, float* log_w,
                             MixtureRow& row) {
  row.logits = logits_row_f32(logits, r, row_buf);
  row.lse = row_logsumexp(row.logits, logits.size(1));
  if (row.lse.bad) return false;
  row.tokens = in.tokens.data_ptr<int64_t>() + r * in.src.k;
  row.has_knn = neighbour_log_weights(in.src, r, row.tokens, in.temperature[r], log_w);
  row.lam = row.has_knn ? lam[r] : 0.0f;
  return true;
}

}  // namespace knnfast::cpu
