// Value checks and small helpers shared by the CPU kernels. The argument checks (devices,
// shapes, dtypes) come first, from common/op_checks.h; the loops here then check the values
// with the rules of common/knn_math.h and raise the texts of common/messages.h (the CUDA
// backend raises the same texts after its kernels report a bad value).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/knn_math.h"
#include "common/messages.h"
#include "common/op_checks.h"
#include "common/op_inputs.h"
#include "common/torch_checks.h"

namespace knnfast::cpu {

using knnfast::as_float32;
using knnfast::as_int64;

// Row r of a [B, V] logits tensor as float32: a pointer into it when it is float32, else
// converted into `buffer` (V floats).
inline const float* logits_row_f32(const at::Tensor& logits, int64_t r, float* buffer) {
  const int64_t V = logits.size(1);
  if (logits.scalar_type() == at::kFloat) return logits.data_ptr<float>() + r * V;
  at::from_blob(buffer, {V}, at::kFloat).copy_(logits[r]);
  return buffer;
}

// Targets [B] -> int64 contiguous, every id valid_target (in [0, vocab) or ignore_index).
inline at::Tensor checked_targets(const at::Tensor& targets_in, int64_t vocab,
                                  int64_t ignore_index, const char* op) {
  at::Tensor targets = as_int64(targets_in);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < targets.numel(); ++r)
    if (!valid_target(tgt[r], vocab, ignore_index))
      raise_bad_target(op, vocab, ignore_index, tgt[r], r);
  return targets;
}

// Ids (neighbour tokens, candidate indices) -> int64 contiguous, every id valid_id: in
// [-1, bound) (bound < 0: no upper bound).
inline at::Tensor checked_ids(const at::Tensor& ids, int64_t bound, const char* op,
                              const char* name) {
  at::Tensor t = as_int64(ids);
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!valid_id(p[i], bound)) raise_bad_id(op, name, bound, p[i], i);
  return t;
}

// Neighbour scores [B, k] -> float32 contiguous, every value valid_score (finite or -inf, an
// invalid slot): NaN / +inf would silently turn rows into NaN.
inline at::Tensor checked_scores(const at::Tensor& scores, const char* op, const char* name) {
  at::Tensor s = as_float32(scores);
  const float* p = s.data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i)
    if (!valid_score(p[i])) raise_bad_score(op, name, p[i], i);
  return s;
}

// Given neighbour weights [B, k]: as scores (finite or -inf), then valid_weight (>= 0).
inline at::Tensor checked_weights(const at::Tensor& weights, const char* op, const char* name) {
  at::Tensor w = checked_scores(weights, op, name);
  const float* p = w.data_ptr<float>();
  for (int64_t i = 0; i < w.numel(); ++i)
    if (!valid_weight(p[i])) raise_bad_weight(op, name, p[i], i);
  return w;
}

// Per-row scalar (temperature, lambda): a float32 tensor of numel 1 (all rows) or B.
struct RowParam {
  at::Tensor storage;
  const float* data = nullptr;
  int64_t stride = 0;
  float operator[](int64_t row) const { return data[row * stride]; }
};

// `t` has the shape op_checks allowed (1 or [B]); every value valid_temperature (Positive) or
// valid_lam (UnitInterval).
inline RowParam row_param(const at::Tensor& t, ParamRange range, const char* op,
                          const char* name) {
  RowParam p;
  p.storage = as_float32(t).reshape({-1});
  p.data = p.storage.data_ptr<float>();
  p.stride = p.storage.numel() == 1 ? 0 : 1;
  for (int64_t i = 0; i < p.storage.numel(); ++i) {
    const float v = p.data[i];
    const bool ok = range == ParamRange::Positive ? valid_temperature(v) : valid_lam(v);
    if (!ok) raise_bad_row_param(op, name, range, v, i);
  }
  return p;
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

// Every element of t is finite. A contiguous float32 tensor (a search's queries, a pack's
// centers) by one plain loop: isfinite().all() is four ATen ops, ~25-50 us for a decoding
// step's queries, a few % of the search it guards.
inline bool all_finite(const at::Tensor& t) {
  if (t.scalar_type() != at::kFloat || !t.is_contiguous())
    return at::isfinite(t).all().item<bool>();
  const float* p = t.data_ptr<float>();
  return std::all_of(p, p + t.numel(), [](float x) { return std::isfinite(x); });
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

// The values of neighbour inputs whose shapes op_checks has checked (token ids < vocab; vocab
// < 0: no bound). `names` words the errors (knn_kd_loss: teacher_*).
inline NeighbourInputs neighbour_inputs(const at::Tensor& tokens,
                                        const c10::optional<at::Tensor>& scores,
                                        const c10::optional<at::Tensor>& weights,
                                        const at::Tensor& temperature, int64_t vocab,
                                        const char* op,
                                        const NeighbourNames& names = kNeighbourNames) {
  const NeighbourTensors t = neighbour_tensors(tokens, scores, weights, temperature, names);
  NeighbourInputs in;
  in.tokens = checked_ids(t.tokens, vocab, op, names.tokens);  // (converted: checks only)
  in.src.k = in.tokens.size(1);
  if (t.scores.defined()) {
    in.scores = checked_scores(t.scores, op, names.scores);
    in.src.scores = in.scores.data_ptr<float>();
  } else {
    in.weights = checked_weights(t.weights, op, names.weights);
    in.src.weights = in.weights.data_ptr<float>();
  }
  in.temperature = row_param(t.temperature, ParamRange::Positive, op, "temperature");
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
