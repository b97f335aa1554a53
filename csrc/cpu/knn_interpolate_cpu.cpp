// knn_interpolate on CPU: log((1 - lam) softmax(logits) + lam P_kNN), one row per task.
// Per row: one read of the logits for the log-sum-exp (vectorized, online), one write pass
// of logits + log(1 - lam) - lse (the row is still in L2), then the <= k neighbour tokens
// are combined with a stable logaddexp. No dense P_kNN, no atomics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "cpu/cpu_utils.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

constexpr const char* kOp = "knn_interpolate";

// Per-thread state: the row's neighbour log-weights and a vocab-sized accumulator of log
// P_kNN per token (kept at -inf between rows; only touched tokens are reset).
struct RowWorkspace {
  Scratch<float> log_w, token_acc, row_f32;
};

// Adds the kNN part of one row into out_row, which already holds log(1-lam) + log p_model.
void add_knn_part(const int64_t* tokens, const float* log_w, int64_t k, float log_lam,
                  float* token_acc, float* out_row) {
  for (int64_t j = 0; j < k; ++j)
    if (log_w[j] != -INFINITY) token_acc[tokens[j]] = logaddexp(token_acc[tokens[j]], log_w[j]);
  for (int64_t j = 0; j < k; ++j) {
    if (log_w[j] == -INFINITY) continue;
    const int64_t t = tokens[j];
    if (token_acc[t] == -INFINITY) continue;  // this token was already written
    out_row[t] = interpolate_log(out_row[t], log_lam + token_acc[t]);
    token_acc[t] = -INFINITY;
  }
}

void interpolate_rows(const at::Tensor& logits, const NeighbourInputs& in, const RowParam& lam,
                      at::Tensor& out) {
  const int64_t B = logits.size(0), V = logits.size(1), k = in.src.k;
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, B, row_grain(2 * V + k), [&](int64_t begin, int64_t end) {
    RowWorkspace ws;
    float* log_w = ws.log_w.get(k, 0.0f);
    float* token_acc = ws.token_acc.get(V, -INFINITY);
    float* row_buf = logits.scalar_type() == at::kFloat ? nullptr : ws.row_f32.get(V, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      MixtureRow m;
      if (!load_mixture_row(logits, r, row_buf, in, lam, log_w, m)) {
        bad_row = r;
        continue;
      }
      float* out_row = out.data_ptr<float>() + r * V;
      if (m.lse.max == -INFINITY) {
        // every logit is -inf: the model puts no mass anywhere (log_softmax would be NaN)
        std::fill(out_row, out_row + V, -INFINITY);
      } else {
        // (x - max) - log(sum) + log(1 - lam), the same rounding as torch.log_softmax; a row
        // without a valid neighbour has lam = 0 here and is exactly log_softmax
        row_shift(m.logits, m.lse.max, std::log1p(-m.lam) - m.lse.log_sum, out_row, V);
      }
      if (m.has_knn) add_knn_part(m.tokens, log_w, k, std::log(m.lam), token_acc, out_row);
    }
  });
  if (bad_row.load() >= 0) raise_bad_logits_row(kOp, bad_row.load());
}

// After check_knn_interpolate_args: the values, then the rows.
void knn_interpolate_impl(const at::Tensor& logits_in, const at::Tensor& tokens,
                          const c10::optional<at::Tensor>& scores,
                          const c10::optional<at::Tensor>& weights,
                          const at::Tensor& temperature, const at::Tensor& lam, at::Tensor& out) {
  const at::Tensor logits = logits_in.contiguous();
  NeighbourInputs in = neighbour_inputs(tokens, scores, weights, temperature, logits.size(1), kOp);
  RowParam lam_rows = row_param(lam, ParamRange::UnitInterval, kOp, "lam");
  interpolate_rows(logits, in, lam_rows, out);
}

}  // namespace

at::Tensor knn_interpolate_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                               const c10::optional<at::Tensor>& scores,
                               const c10::optional<at::Tensor>& weights,
                               const at::Tensor& temperature, const at::Tensor& lam,
                               const std::string& plan) {
  check_knn_interpolate_args(logits, tokens, scores, weights, temperature, lam, plan, nullptr,
                             Backend::CPU);
  at::Tensor out = empty_output({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  knn_interpolate_impl(logits, tokens, scores, weights, temperature, lam, out);
  return out;
}

void knn_interpolate_out_cpu(const at::Tensor& logits, const at::Tensor& tokens,
                             const c10::optional<at::Tensor>& scores,
                             const c10::optional<at::Tensor>& weights,
                             const at::Tensor& temperature, const at::Tensor& lam,
                             const std::string& plan, at::Tensor& out) {
  check_knn_interpolate_args(logits, tokens, scores, weights, temperature, lam, plan, &out,
                             Backend::CPU);
  knn_interpolate_impl(logits, tokens, scores, weights, temperature, lam, out);
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) {
  m.impl("knn_interpolate", &knn_interpolate_cpu);
  m.impl("knn_interpolate.out", &knn_interpolate_out_cpu);
}

}  // namespace knnfast::cpu
