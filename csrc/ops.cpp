// Every knnfast schema, nothing else. Kernels register per backend in csrc/cpu/<op>_cpu.cpp
// and csrc/cuda/<op>_cuda.cpp; fake (meta) kernels and argument conversion live in
// knnfast/ops.py. Shapes: B rows (queries / decoding positions), N datastore entries,
// D key dimension, k neighbours per row, V vocabulary size.
//
// temperature and lam are float32 tensors with 1 element (all rows) or B (per row); the
// Python wrappers turn Python floats into them.
#include <torch/library.h>

#include "build_info.h"
#include "common/settings.h"

TORCH_LIBRARY(knnfast, m) {
  // queries [B, D], keys [N, D] -> scores [B, k] float32 (descending), indices [B, k] int64.
  // plan: "auto", or a forced variant (common/plans.h): CPU stream|gemm_f32|bf16, CUDA
  // stream|tensor|tensor_recheck.
  m.def("knn_search(Tensor queries, Tensor keys, int k, str metric, Tensor? key_sq_norms, "
        "Tensor? exclude, str plan=\"auto\") -> (Tensor, Tensor)");
  // queries [B, D], keys [N, D] grouped by list (list l = rows [list_offsets[l],
  // list_offsets[l + 1])), list_offsets [L + 1], probes [B, P] list ids (-1: none) ->
  // scores [B, k] float32 (descending), indices [B, k] int64 rows of keys: the exact top k of
  // each query over the union of the lists it probes (an IVF search step).
  // Optional bf16 pack (all three or none; knnfast.pack_lists_bf16): centers [L, D] float32,
  // residuals [N, D] bfloat16, residual_norms [N, 2] float32, for the CPU plan bf16.
  m.def("knn_search_lists(Tensor queries, Tensor keys, Tensor list_offsets, Tensor probes, "
        "int k, str metric, Tensor? exclude, str plan=\"auto\", Tensor? centers=None, "
        "Tensor? residuals=None, Tensor? residual_norms=None) -> (Tensor, Tensor)");
  // queries [B, D], keys [N, D], indices [B, k] -> exact scores [B, k]
  m.def("knn_rescore(Tensor queries, Tensor keys, Tensor indices, str metric) -> Tensor");
  // scores [B, k], tokens [B, k] -> probs [B, V]
  m.def("knn_probs(Tensor scores, Tensor tokens, int vocab_size, Tensor temperature) -> Tensor");
  // scores [B, k], tokens [B, k] -> (tokens_u [B, k], probs [B, k])
  m.def("knn_probs_sparse(Tensor scores, Tensor tokens, Tensor temperature) -> (Tensor, Tensor)");
  // logits [B, V], tokens [B, k], scores|weights [B, k] -> logp [B, V].
  // plan: "auto" (CPU has only this), CUDA also row_cache|global (common/plans.h).
  m.def("knn_interpolate(Tensor logits, Tensor tokens, Tensor? scores, Tensor? weights, "
        "Tensor temperature, Tensor lam, str plan=\"auto\") -> Tensor");
  m.def("knn_interpolate.out(Tensor logits, Tensor tokens, Tensor? scores, Tensor? weights, "
        "Tensor temperature, Tensor lam, str plan=\"auto\", *, Tensor(a!) out) -> ()");
  // logits [B, V], targets [B], tokens [B, k], scores|weights [B, k] -> logp [B]
  m.def("knn_gold_logprob(Tensor logits, Tensor targets, Tensor tokens, Tensor? scores, "
        "Tensor? weights, Tensor temperature, Tensor lam, int ignore_index) -> Tensor");
  // logits [B, V], targets [B], teacher tokens/scores|probs [B, k] -> per-row loss [B]
  // (ce_weight * label-smoothed CE + kd_weight * (H or KL)(p_T, softmax)); reduced in Python
  m.def("knn_kd_loss(Tensor logits, Tensor targets, Tensor teacher_tokens, Tensor? teacher_scores, "
        "Tensor? teacher_probs, Tensor temperature, float ce_weight, float kd_weight, "
        "float label_smoothing, int ignore_index, bool kl) -> Tensor");
  // d loss_rows / d logits given grad_rows [B] -> [B, V] float32 (no dense teacher)
  m.def("knn_kd_loss_backward(Tensor grad_rows, Tensor logits, Tensor targets, "
        "Tensor teacher_tokens, Tensor? teacher_scores, Tensor? teacher_probs, "
        "Tensor temperature, float ce_weight, float kd_weight, float label_smoothing, "
        "int ignore_index) -> Tensor");
  // the same gradient written in place over float32 logits (fused losses keep one [B, V] buffer)
  m.def("knn_kd_loss_grad_(Tensor(a!) logits, Tensor grad_rows, Tensor targets, "
        "Tensor teacher_tokens, Tensor? teacher_scores, Tensor? teacher_probs, "
        "Tensor temperature, float ce_weight, float kd_weight, float label_smoothing, "
        "int ignore_index) -> ()");
  // knn_kd_loss of logits = hidden [T, D] . weight [V, D]^T (+ bias [V]) without the [T, V]
  // logits: vocabulary chunks of `chunk` columns (0: auto), online log-sum-exp. teacher_*
  // [T, k] (k = 0: plain CE). -> (per-row loss [T], log-sum-exp [T] for the backward), float32
  m.def("knn_kd_linear_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
        "Tensor teacher_tokens, Tensor? teacher_scores, Tensor? teacher_probs, "
        "Tensor temperature, float ce_weight, float kd_weight, float label_smoothing, "
        "int ignore_index, bool kl, int chunk=0) -> (Tensor, Tensor)");
  // grad_rows [T], the forward's lse [T] -> (grad_hidden [T, D], grad_weight [V, D],
  // grad_bias [V]) in the dtypes of hidden, weight, bias (weight's when bias is None)
  m.def("knn_kd_linear_loss_backward(Tensor grad_rows, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor targets, Tensor teacher_tokens, Tensor? teacher_scores, "
        "Tensor? teacher_probs, Tensor temperature, Tensor lse, float ce_weight, "
        "float kd_weight, float label_smoothing, int ignore_index, int chunk=0) "
        "-> (Tensor, Tensor, Tensor)");
  // tokens [B, k] -> counts [B, k] int64
  m.def("label_counts(Tensor tokens) -> Tensor");
  // logits [B, V] -> (entropy [B], top_logp [B, top]) float32 of softmax(logits): -sum p log p
  // (0 log 0 = 0) and the `top` largest log-probabilities, descending; a row of only -inf
  // gives (0, -inf). What retrieval skipping decides from, without a [B, V] temporary.
  // entropy=false skips the entropy's pass over the logits; its output is then empty [0].
  m.def("softmax_stats(Tensor logits, int top, bool entropy=True, str plan=\"auto\") -> "
        "(Tensor, Tensor)");
  m.def("build_info() -> str", &knnfast::build_info);
  // process-wide setting name ("cuda_checks", "debug") := value; returns the previous value
  m.def("configure(str name, int value) -> int", &knnfast::configure);
  // like: any tensor on a CUDA device -> that device's deferred-check status [kNumStatusCodes]
  // int64 on the CPU (-1: clear; else the first bad flat position per status code), cleared
  // (csrc/cuda/status_buffer_cuda.cpp; CUDA builds only)
  m.def("take_cuda_status(Tensor like) -> Tensor");
}
