// One argument check per op, shared by its CPU wrapper (csrc/cpu/<op>_cpu.cpp) and its CUDA
// wrapper (csrc/cuda/<op>_cuda.cpp): devices, dims, dtypes, shapes, per-row parameter shapes
// and the scalar arguments (k, metric, plan, loss weights). Values inside tensors (ids,
// scores, temperature, ...) are checked after these by each backend: on the host by the CPU
// (cpu/cpu_utils.h), inside the kernels by CUDA; common/knn_math.h holds those rules and
// common/messages.h their texts. Every failure is a ValueError naming the op and argument.
//
// Shapes: B rows, N datastore entries, D key dimension, k neighbours, V vocabulary.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "common/knn_math.h"

namespace knnfast {

enum class Backend { CPU, CUDA };

// The names a neighbour-input error uses (knn_kd_loss calls its inputs teacher_*).
struct NeighbourNames {
  const char* tokens;
  const char* scores;
  const char* weights;
};
inline constexpr NeighbourNames kNeighbourNames{"tokens", "scores", "weights"};
inline constexpr NeighbourNames kTeacherNames{"teacher_tokens", "teacher_scores", "teacher_probs"};

// knn_search: queries [B, D] float, keys [N, D] float, 1 <= k <= kMaxK, key_sq_norms [N],
// exclude [B] integer, plan of `backend` (common/plans.h; bf16's CPU support is the CPU
// wrapper's check). Returns the metric and the plan's index.
struct SearchArgs {
  Metric metric;
  int plan;
};
SearchArgs check_knn_search_args(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                 const std::string& metric,
                                 const c10::optional<at::Tensor>& key_sq_norms,
                                 const c10::optional<at::Tensor>& exclude,
                                 const std::string& plan, Backend backend);

// knn_search_lists: queries and keys as knn_search (keys grouped by list), list_offsets [L + 1]
// integer with L >= 1, probes [B, P] integer with P >= 1, exclude [B] integer, plan one of the
// backend's (common/plans.h). Returns the metric and the plan's index. (Offsets, probe and
// exclude values are each plan's value check.) A pack comes whole or not at all, contiguous
// and on the queries' device: centers [L, D] float32 and either the bf16 pack's residuals
// [N, D] bfloat16 and residual_norms [N, 2] float32, or the int8 pack's codes [N, D] int8 and
// key terms [N, 5] float32 (in the residuals / residual_norms slots; D <= 65536). Plans bf16
// and int8 need their own pack.
struct ListsPackArgs {
  const c10::optional<at::Tensor>& centers;
  const c10::optional<at::Tensor>& residuals;
  const c10::optional<at::Tensor>& residual_norms;
  bool given() const { return centers.has_value(); }
  bool is_int8() const { return given() && residuals->scalar_type() == at::kChar; }
};
SearchArgs check_knn_search_lists_args(const at::Tensor& queries, const at::Tensor& keys,
                                       const at::Tensor& list_offsets, const at::Tensor& probes,
                                       int64_t k, const std::string& metric,
                                       const c10::optional<at::Tensor>& exclude,
                                       const std::string& plan, const ListsPackArgs& pack,
                                       Backend backend);

// knn_rescore: queries [B, D] float, keys [N, D] float, indices [B, k] integer.
Metric check_knn_rescore_args(const at::Tensor& queries, const at::Tensor& keys,
                              const at::Tensor& indices, const std::string& metric,
                              Backend backend);

// knn_probs (vocab_size > 0) and knn_probs_sparse (op "knn_probs_sparse", no vocab_size):
// scores [B, k] float, tokens [B, k] integer, temperature 1 or [B].
void check_knn_probs_args(const at::Tensor& scores, const at::Tensor& tokens,
                          c10::optional<int64_t> vocab_size, const at::Tensor& temperature,
                          Backend backend, const char* op);

// knn_interpolate(.out): logits [B, V] float with V > 0, tokens [B, k] integer, exactly one of
// scores / weights [B, k] float, temperature and lam 1 or [B], out (or null) [B, V] float32
// contiguous. Returns the plan's index (common/plans.h).
int check_knn_interpolate_args(const at::Tensor& logits, const at::Tensor& tokens,
                               const c10::optional<at::Tensor>& scores,
                               const c10::optional<at::Tensor>& weights,
                               const at::Tensor& temperature, const at::Tensor& lam,
                               const std::string& plan, const at::Tensor* out, Backend backend);

// knn_gold_logprob: logits [B, V] float, targets [B] integer, neighbours as knn_interpolate.
void check_knn_gold_logprob_args(const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& tokens,
                                 const c10::optional<at::Tensor>& scores,
                                 const c10::optional<at::Tensor>& weights,
                                 const at::Tensor& temperature, const at::Tensor& lam,
                                 Backend backend);

// knn_kd_loss (and its backward / in-place gradient): logits [B, V] float, targets [B]
// integer, teacher_tokens [B, k] integer, exactly one of teacher_scores / teacher_probs
// [B, k] float, temperature 1 or [B]; ce_weight, kd_weight finite >= 0, label_smoothing in
// [0, 1). grad_rows (or null) [B].
void check_knn_kd_loss_args(const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& teacher_tokens,
                            const c10::optional<at::Tensor>& teacher_scores,
                            const c10::optional<at::Tensor>& teacher_probs,
                            const at::Tensor& temperature, double ce_weight, double kd_weight,
                            double label_smoothing, const at::Tensor* grad_rows, Backend backend);

// knn_kd_linear_loss (and its backward): hidden [T, D] float with T > 0, weight [V, D] float
// with V > 0, bias (or none) [V] float, targets [T], teacher as knn_kd_loss with T rows
// (k may be 0), the loss weights as knn_kd_loss, chunk >= 0. Backward: grad_rows and lse
// [T] (or null).
void check_knn_kd_linear_loss_args(const at::Tensor& hidden, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& targets, const at::Tensor& teacher_tokens,
                                   const c10::optional<at::Tensor>& teacher_scores,
                                   const c10::optional<at::Tensor>& teacher_probs,
                                   const at::Tensor& temperature, double ce_weight,
                                   double kd_weight, double label_smoothing, int64_t chunk,
                                   const at::Tensor* grad_rows, const at::Tensor* lse,
                                   Backend backend);

// label_counts: tokens [B, k] integer.
void check_label_counts_args(const at::Tensor& tokens, Backend backend);

// softmax_stats: logits [B, V > 0] floating; top in [1, min(V, MAX_K)]; plan one of the
// backend's (common/plans.h). Returns the plan's index.
int check_softmax_stats_args(const at::Tensor& logits, int64_t top, const std::string& plan,
                             Backend backend);

}  // namespace knnfast
