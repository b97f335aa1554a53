// knn_gold_logprob on CPU: log((1 - lam) softmax(logits)[y] + lam P_kNN[y]) per row.
// Reads each logits row once (vectorized log-sum-exp) and writes one number; the kNN side
// only needs the neighbours whose token is y, so duplicates never have to be merged.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/cpu_utils.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

constexpr const char* kOp = "knn_gold_logprob";

// log sum of the neighbour weights whose token equals `target` (-inf if none).
float knn_log_mass_of(int64_t target, const int64_t* tokens, const float* log_w, int64_t k) {
  float acc = -INFINITY;
  for (int64_t j = 0; j < k; ++j)
    if (tokens[j] == target) acc = logaddexp(acc, log_w[j]);
  return acc;
}

}  // namespace

at::Tensor knn_gold_logprob_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                const at::Tensor& tokens,
                                const c10::optional<at::Tensor>& scores,
                                const c10::optional<at::Tensor>& weights,
                                const at::Tensor& temperature, const at::Tensor& lam,
                                int64_t ignore_index) {
  check_knn_gold_logprob_args(logits_in, targets_in, tokens, scores, weights, temperature, lam,
                              Backend::CPU);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor targets = checked_targets(targets_in, V, ignore_index, kOp);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  NeighbourInputs in = neighbour_inputs(tokens, scores, weights, temperature, V, kOp);
  const RowParam lam_rows = row_param(lam, ParamRange::UnitInterval, kOp, "lam");
  at::Tensor out = at::zeros({B}, logits.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t k = in.src.k;
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, B, row_grain(V + k), [&](int64_t begin, int64_t end) {
    Scratch<float> log_w_buf, row_buf;
    float* log_w = log_w_buf.get(k, 0.0f);
    float* row = logits.scalar_type() == at::kFloat ? nullptr : row_buf.get(V, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      if (tgt[r] == ignore_index) continue;  // masked: stays 0
      MixtureRow m;
      if (!load_mixture_row(logits, r, row, in, lam_rows, log_w, m)) {
        bad_row = r;
        continue;
      }
      const float model =
          m.lse.max == -INFINITY
              ? -INFINITY
              : std::log1p(-m.lam) + ((m.logits[tgt[r]] - m.lse.max) - m.lse.log_sum);
      const float knn = m.has_knn ? std::log(m.lam) + knn_log_mass_of(tgt[r], m.tokens, log_w, k)
                                  : -INFINITY;
      o[r] = interpolate_log(model, knn);
    }
  });
  if (bad_row.load() >= 0) raise_bad_logits_row(kOp, bad_row.load());
  return out;
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) { m.impl("knn_gold_logprob", &knn_gold_logprob_cpu); }

}  // namespace knnfast::cpu
