// The per-op argument checks of op_checks.h, shared by the CPU and CUDA wrappers.
#include "common/op_checks.h"

#include "common/limits.h"
#include "common/plans.h"
#include "common/torch_checks.h"

#include <algorithm>
#include <utility>

namespace knnfast {
namespace {

// The primary input fixes the device of the call: a direct torch.ops call that mixes a CPU
// tensor into CUDA inputs (dispatched to CUDA) must fail as ValueError before any device guard.
void check_on_backend(const at::Tensor& t, Backend backend, const char* op, const char* name) {
  const bool on = backend == Backend::CPU ? t.device().is_cpu() : t.is_cuda();
  TORCH_CHECK_VALUE(on, op, ": ", name, " must be on the same device as the other inputs (",
                    backend == Backend::CPU ? "cpu" : "cuda", "), got ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Device& device, const char* op,
                       const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name,
                    " must be on the same device as the other inputs (", device, "), got ",
                    t.device());
}

// Per-row parameter (temperature, lam): on `device`, numel 1 (all rows) or shape [rows].
void check_row_param(const at::Tensor& t, int64_t rows, const at::Device& device,
                     const char* op, const char* name) {
  check_same_device(t, device, op, name);
  check_row_param_shape(t, rows, op, name);
}

// Neighbour inputs of `rows` rows: tokens [rows, k] integer, exactly one of scores / weights
// [rows, k] float, temperature 1 or [rows].
void check_neighbour_args(const at::Tensor& tokens, const c10::optional<at::Tensor>& scores,
                          const c10::optional<at::Tensor>& weights,
                          const at::Tensor& temperature, int64_t rows, const at::Device& device,
                          const char* op, const NeighbourNames& names) {
  TORCH_CHECK_VALUE(scores.has_value() != weights.has_value(), op, ": pass exactly one of ",
                    names.scores, " or ", names.weights);
  check_same_device(tokens, device, op, names.tokens);
  check_dim(tokens, 2, op, names.tokens);
  check_integer(tokens, op, names.tokens);
  TORCH_CHECK_VALUE(tokens.size(0) == rows, op, ": ", names.tokens, " must have ", rows,
                    " rows (one per logits/scores row), got shape ", tokens.sizes());
  const at::Tensor& given = scores.has_value() ? *scores : *weights;
  const char* name = scores.has_value() ? names.scores : names.weights;
  check_same_device(given, device, op, name);
  check_dim(given, 2, op, name);
  // any floating dtype: both backends read them as float32 (float64 serves gradcheck)
  TORCH_CHECK_VALUE(at::isFloatingType(given.scalar_type()), op, ": ", name,
                    " must be a floating-point tensor, got ", given.scalar_type());
  TORCH_CHECK_VALUE(given.sizes() == tokens.sizes(), op, ": ", name, " must have the shape of ",
                    names.tokens, " ", tokens.sizes(), ", got ", given.sizes());
  check_row_param(temperature, rows, device, op, "temperature");
}

// logits [B, V] of any floating dtype, the primary input of the row ops.
void check_logits_arg(const at::Tensor& logits, Backend backend, const char* op) {
  check_on_backend(logits, backend, op, "logits");
  check_dim(logits, 2, op, "logits");
  check_logits(logits, op);
}

// targets [rows] integer on `device`.
void check_targets_arg(const at::Tensor& targets, int64_t rows, const at::Device& device,
                       const char* op) {
  check_same_device(targets, device, op, "targets");
  check_dim(targets, 1, op, "targets");
  check_integer(targets, op, "targets");
  TORCH_CHECK_VALUE(targets.size(0) == rows, op, ": targets must have shape [", rows, "], got ",
                    targets.sizes());
}

// queries [B, D] and keys [N, D] float on one device, N > 0, D > 0 where `positive_d`.
void check_queries_keys(const at::Tensor& queries, const at::Tensor& keys, bool positive_d,
                        const char* op) {
  check_same_device(keys, queries.device(), op, "keys");
  check_dim(queries, 2, op, "queries");
  check_dim(keys, 2, op, "keys");
  check_floating(queries, op, "queries");
  check_floating(keys, op, "keys");
  if (!positive_d) {
    TORCH_CHECK_VALUE(queries.size(1) == keys.size(1), op,
                      ": queries and keys must have the same dimension D, got queries ",
                      queries.sizes(), " and keys ", keys.sizes());
  }
}

// A per-row tensor argument of knn_search (key_sq_norms [N], exclude [B]).
void check_vector_arg(const at::Tensor& t, int64_t size, const at::Device& device,
                      const char* op, const char* name) {
  check_same_device(t, device, op, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must have shape [",
                    size, "], got ", t.sizes());
}

// The search ops' queries [B, D] and keys [N, D] (N > 0, D > 0) and 1 <= k <= kMaxK.
void check_search_inputs(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                         const char* op) {
  check_queries_keys(queries, keys, /*positive_d=*/true, op);
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxK, op, ": k must be in [1, ", kMaxK, "], got ", k);
  TORCH_CHECK_VALUE(keys.size(0) > 0, op, ": keys must have at least one row (N = 0)");
  TORCH_CHECK_VALUE(queries.size(1) == keys.size(1) && keys.size(1) > 0, op,
                    ": queries and keys must have the same dimension D > 0, got queries ",
                    queries.sizes(), " and keys ", keys.sizes());
}

// exclude [B] integer on the queries' device (one id per query).
void check_exclude_arg(const at::Tensor& exclude, const at::Tensor& queries, const char* op) {
  check_same_device(exclude, queries.device(), op, "exclude");
  check_integer(exclude, op, "exclude");
  check_vector_arg(exclude, queries.size(0), queries.device(), op, "exclude");
}

// The kNN-KD loss weights: ce_weight, kd_weight finite >= 0, label_smoothing in [0, 1).
void check_kd_weights(double ce_weight, double kd_weight, double label_smoothing,
                      const char* op) {
  TORCH_CHECK_VALUE(ce_weight >= 0 && ce_weight < INFINITY, op,
                    ": ce_weight must be a finite number >= 0, got ", ce_weight);
  TORCH_CHECK_VALUE(kd_weight >= 0 && kd_weight < INFINITY, op,
                    ": kd_weight must be a finite number >= 0, got ", kd_weight);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 1, op,
                    ": label_smoothing must be in [0, 1), got ", label_smoothing);
}

// hidden [T, D] (T > 0), weight [V, D] (V > 0), bias [V]: floating, on one device.
void check_linear_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, Backend backend, const char* op) {
  check_on_backend(hidden, backend, op, "hidden");
  check_same_device(weight, hidden.device(), op, "weight");
  check_dim(hidden, 2, op, "hidden");
  check_dim(weight, 2, op, "weight");
  for (const auto& [t, name] : {std::pair{&hidden, "hidden"}, std::pair{&weight, "weight"}})
    TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), op, ": ", name,
                      " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(hidden.size(0) > 0, op, ": hidden must have at least one row (T = 0)");
  TORCH_CHECK_VALUE(weight.size(0) > 0 && weight.size(1) == hidden.size(1), op,
                    ": weight must have shape [V, ", hidden.size(1), "] with V > 0 (D of hidden ",
                    hidden.sizes(), "), got ", weight.sizes());
  if (!bias.has_value()) return;
  check_same_device(*bias, hidden.device(), op, "bias");
  TORCH_CHECK_VALUE(at::isFloatingType(bias->scalar_type()), op,
                    ": bias must be a floating-point tensor, got ", bias->scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                    ": bias must have shape [", weight.size(0), "] (V rows of weight), got ",
                    bias->sizes());
}

}  // namespace

SearchArgs check_knn_search_args(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                 const std::string& metric,
                                 const c10::optional<at::Tensor>& key_sq_norms,
                                 const c10::optional<at::Tensor>& exclude,
                                 const std::string& plan, Backend backend) {
  constexpr const char* op = "knn_search";
  check_on_backend(queries, backend, op, "queries");
  SearchArgs args;
  args.metric = parse_metric(metric, op);
  check_search_inputs(queries, keys, k, op);
  if (key_sq_norms.has_value())
    check_vector_arg(*key_sq_norms, keys.size(0), queries.device(), op, "key_sq_norms");
  if (exclude.has_value()) check_exclude_arg(*exclude, queries, op);
  args.plan = backend == Backend::CPU ? parse_plan(plan, kCpuSearchPlans, "CPU", op)
                                      : parse_plan(plan, kCudaSearchPlans, "CUDA", op);
  return args;
}

namespace {

// The bf16 pack of knn_search_lists: whole or absent, shapes from queries, keys and L.
void check_lists_pack(const ListsPackArgs& pack, const at::Tensor& queries,
                      const at::Tensor& keys, int64_t L, const char* op) {
  const int given = int(pack.centers.has_value()) + int(pack.residuals.has_value()) +
                    int(pack.residual_norms.has_value());
  if (given == 0) return;
  TORCH_CHECK_VALUE(given == 3, op, ": centers, residuals and residual_norms come together "
                    "(knnfast.pack_lists_bf16 / pack_lists_int8 make all three); got ", given,
                    " of them");
  const int64_t N = keys.size(0), D = keys.size(1);
  const bool int8 = pack.residuals->scalar_type() == at::kChar;
  const char* maker = int8 ? "knnfast.pack_lists_int8" : "knnfast.pack_lists_bf16";
  const struct {
    const at::Tensor& t;
    const char* name;
    at::ScalarType type;
    std::vector<int64_t> shape;
  } parts[] = {{*pack.centers, "centers", at::kFloat, {L, D}},
               {*pack.residuals, "residuals", int8 ? at::kChar : at::kBFloat16, {N, D}},
               {*pack.residual_norms, "residual_norms", at::kFloat, {N, int8 ? 5 : 2}}};
  for (const auto& p : parts) {
    check_same_device(p.t, queries.device(), op, p.name);
    TORCH_CHECK_VALUE(p.t.scalar_type() == p.type && p.t.sizes() == at::IntArrayRef(p.shape) &&
                          p.t.is_contiguous(),
                      op, ": ", p.name, " must be a contiguous ", c10::toString(p.type),
                      " tensor of shape ", at::IntArrayRef(p.shape), " (from ", maker,
                      " over these keys and list_offsets), got ", p.t.scalar_type(), " ",
                      p.t.sizes());
  }
  TORCH_CHECK_VALUE(!int8 || D <= 65536, op, ": the int8 pack takes D <= 65536, got D = ", D);
}

}  // namespace

SearchArgs check_knn_search_lists_args(const at::Tensor& queries, const at::Tensor& keys,
                                       const at::Tensor& list_offsets, const at::Tensor& probes,
                                       int64_t k, const std::string& metric,
                                       const c10::optional<at::Tensor>& exclude,
                                       const std::string& plan, const ListsPackArgs& pack,
                                       Backend backend) {
  constexpr const char* op = "knn_search_lists";
  check_on_backend(queries, backend, op, "queries");
  SearchArgs args;
  args.metric = parse_metric(metric, op);
  check_search_inputs(queries, keys, k, op);
  check_same_device(list_offsets, queries.device(), op, "list_offsets");
  check_integer(list_offsets, op, "list_offsets");
  TORCH_CHECK_VALUE(list_offsets.dim() == 1 && list_offsets.size(0) >= 2, op,
                    ": list_offsets must have shape [L + 1] with L >= 1 lists, got ",
                    list_offsets.sizes());
  check_same_device(probes, queries.device(), op, "probes");
  check_dim(probes, 2, op, "probes");
  check_integer(probes, op, "probes");
  TORCH_CHECK_VALUE(probes.size(0) == queries.size(0) && probes.size(1) >= 1, op,
                    ": probes must have shape [", queries.size(0),
                    ", P] with P >= 1 (list ids per query), got ", probes.sizes());
  if (exclude.has_value()) check_exclude_arg(*exclude, queries, op);
  args.plan = backend == Backend::CPU ? parse_plan(plan, kCpuListsPlans, "CPU", op)
                                      : parse_plan(plan, kCudaListsPlans, "CUDA", op);
  check_lists_pack(pack, queries, keys, list_offsets.size(0) - 1, op);
  if (backend == Backend::CPU && args.plan == int(CpuListsPlan::Bf16))
    TORCH_CHECK_VALUE(pack.given() && !pack.is_int8(), op, ": plan \"bf16\" needs the bf16 "
                      "pack (centers, residuals, residual_norms from knnfast.pack_lists_bf16)");
  if (backend == Backend::CPU && args.plan == int(CpuListsPlan::Int8))
    TORCH_CHECK_VALUE(pack.is_int8(), op, ": plan \"int8\" needs the int8 pack (from "
                      "knnfast.pack_lists_int8)");
  return args;
}

Metric check_knn_rescore_args(const at::Tensor& queries, const at::Tensor& keys,
                              const at::Tensor& indices, const std::string& metric,
                              Backend backend) {
  constexpr const char* op = "knn_rescore";
  const Metric m = parse_metric(metric, op);
  check_on_backend(queries, backend, op, "queries");
  check_same_device(indices, queries.device(), op, "indices");
  check_queries_keys(queries, keys, /*positive_d=*/false, op);
  check_dim(indices, 2, op, "indices");
  check_integer(indices, op, "indices");
  TORCH_CHECK_VALUE(indices.size(0) == queries.size(0), op, ": indices must have ",
                    queries.size(0), " rows (one per query), got ", indices.sizes());
  return m;
}

void check_knn_probs_args(const at::Tensor& scores, const at::Tensor& tokens,
                          c10::optional<int64_t> vocab_size, const at::Tensor& temperature,
                          Backend backend, const char* op) {
  check_on_backend(scores, backend, op, "scores");
  if (vocab_size.has_value())
    TORCH_CHECK_VALUE(*vocab_size > 0, op, ": vocab_size must be > 0, got ", *vocab_size);
  check_dim(tokens, 2, op, "tokens");
  check_neighbour_args(tokens, scores, c10::nullopt, temperature, tokens.size(0),
                       scores.device(), op, kNeighbourNames);
}

int check_knn_interpolate_args(const at::Tensor& logits, const at::Tensor& tokens,
                               const c10::optional<at::Tensor>& scores,
                               const c10::optional<at::Tensor>& weights,
                               const at::Tensor& temperature, const at::Tensor& lam,
                               const std::string& plan, const at::Tensor* out, Backend backend) {
  constexpr const char* op = "knn_interpolate";
  const int p = backend == Backend::CPU ? parse_plan(plan, kCpuInterpolatePlans, "CPU", op)
                                        : parse_plan(plan, kCudaInterpolatePlans, "CUDA", op);
  check_logits_arg(logits, backend, op);
  TORCH_CHECK_VALUE(logits.size(1) > 0, op, ": logits must have a vocabulary dimension > 0");
  if (out) {
    check_same_device(*out, logits.device(), op, "out");
    TORCH_CHECK_VALUE(out->scalar_type() == at::kFloat && out->is_contiguous() &&
                          out->sizes() == logits.sizes(),
                      op, ": out must be a contiguous float32 tensor of shape ", logits.sizes(),
                      ", got ", out->scalar_type(), " ", out->sizes());
  }
  const int64_t B = logits.size(0);
  check_neighbour_args(tokens, scores, weights, temperature, B, logits.device(), op,
                       kNeighbourNames);
  check_row_param(lam, B, logits.device(), op, "lam");
  return p;
}

void check_knn_gold_logprob_args(const at::Tensor& logits, const at::Tensor& targets,
                                 const at::Tensor& tokens,
                                 const c10::optional<at::Tensor>& scores,
                                 const c10::optional<at::Tensor>& weights,
                                 const at::Tensor& temperature, const at::Tensor& lam,
                                 Backend backend) {
  constexpr const char* op = "knn_gold_logprob";
  check_logits_arg(logits, backend, op);
  const int64_t B = logits.size(0);
  check_targets_arg(targets, B, logits.device(), op);
  check_neighbour_args(tokens, scores, weights, temperature, B, logits.device(), op,
                       kNeighbourNames);
  check_row_param(lam, B, logits.device(), op, "lam");
}

void check_knn_kd_loss_args(const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& teacher_tokens,
                            const c10::optional<at::Tensor>& teacher_scores,
                            const c10::optional<at::Tensor>& teacher_probs,
                            const at::Tensor& temperature, double ce_weight, double kd_weight,
                            double label_smoothing, const at::Tensor* grad_rows,
                            Backend backend) {
  constexpr const char* op = "knn_kd_loss";
  check_logits_arg(logits, backend, op);
  check_kd_weights(ce_weight, kd_weight, label_smoothing, op);
  const int64_t B = logits.size(0);
  check_targets_arg(targets, B, logits.device(), op);
  check_neighbour_args(teacher_tokens, teacher_scores, teacher_probs, temperature, B,
                       logits.device(), op, kTeacherNames);
  if (grad_rows)  // the backward's incoming gradient, one number per row
    check_vector_arg(*grad_rows, B, logits.device(), "knn_kd_loss_backward", "grad");
}

void check_knn_kd_linear_loss_args(const at::Tensor& hidden, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& targets, const at::Tensor& teacher_tokens,
                                   const c10::optional<at::Tensor>& teacher_scores,
                                   const c10::optional<at::Tensor>& teacher_probs,
                                   const at::Tensor& temperature, double ce_weight,
                                   double kd_weight, double label_smoothing, int64_t chunk,
                                   const at::Tensor* grad_rows, const at::Tensor* lse,
                                   Backend backend) {
  constexpr const char* op = "knn_kd_linear_loss";
  check_linear_args(hidden, weight, bias, backend, op);
  check_kd_weights(ce_weight, kd_weight, label_smoothing, op);
  TORCH_CHECK_VALUE(chunk >= 0, op, ": chunk must be >= 0 (0: automatic), got ", chunk);
  const int64_t T = hidden.size(0);
  check_targets_arg(targets, T, hidden.device(), op);
  check_neighbour_args(teacher_tokens, teacher_scores, teacher_probs, temperature, T,
                       hidden.device(), op, kTeacherNames);
  if (grad_rows) check_vector_arg(*grad_rows, T, hidden.device(), op, "grad");
  if (lse) check_vector_arg(*lse, T, hidden.device(), op, "lse");
}

void check_label_counts_args(const at::Tensor& tokens, Backend backend) {
  constexpr const char* op = "label_counts";
  check_on_backend(tokens, backend, op, "tokens");
  check_dim(tokens, 2, op, "tokens");
  check_integer(tokens, op, "tokens");
}

int check_softmax_stats_args(const at::Tensor& logits, int64_t top, const std::string& plan,
                             Backend backend) {
  constexpr const char* op = "softmax_stats";
  check_logits_arg(logits, backend, op);
  const int64_t V = logits.size(1);
  TORCH_CHECK_VALUE(V > 0, op, ": logits must have a vocabulary dimension > 0");
  const int64_t most = std::min<int64_t>(V, kMaxK);
  TORCH_CHECK_VALUE(top >= 1 && top <= most, op, ": top must be an int in [1, ", most,
                    "] (the vocabulary size V = ", V, ", at most MAX_K = ", kMaxK, "), got ",
                    top);
  return backend == Backend::CPU ? parse_plan(plan, kCpuSoftmaxStatsPlans, "CPU", op)
                                 : parse_plan(plan, kCudaSoftmaxStatsPlans, "CUDA", op);
}

}  // namespace knnfast
