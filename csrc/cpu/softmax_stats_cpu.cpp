// softmax_stats on CPU: per row, one read of the logits for the log-sum-exp (row_logsumexp),
// one for the entropy and one for the top values, while the row is still in L1/L2; no [B, V]
// temporary (a decoding step that only decides whether to search should not pay for a
// softmax's worth of fresh memory). This is plan "fused" (= auto); plan "aten" runs CUDA's
// composition (common/softmax_stats_aten.h) instead.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "common/plans.h"
#include "common/softmax_stats_aten.h"
#include "cpu/cpu_utils.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

constexpr const char* kOp = "softmax_stats";

// One row x [V] -> entropy (when entropy != nullptr) and top_logp [top]; false when the row
// holds NaN or +inf.
bool row_stats(const float* x, int64_t V, int64_t top, float* entropy, float* top_logp) {
  const RowLogSumExp lse = row_logsumexp(x, V);
  if (lse.bad) return false;
  if (lse.max == -INFINITY) {  // no mass anywhere: nothing to be uncertain about
    if (entropy) *entropy = 0.0f;
    std::fill(top_logp, top_logp + top, -INFINITY);
    return true;
  }
  if (entropy) *entropy = row_entropy(x, V, lse.max, lse.log_sum);
  row_top_values(x, V, top, top_logp);
  // (x - max) - log_sum: the rounding of torch.log_softmax (and of knn_interpolate)
  for (int64_t j = 0; j < top; ++j) top_logp[j] = (top_logp[j] - lse.max) - lse.log_sum;
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softmax_stats_cpu(const at::Tensor& logits_in, int64_t top,
                                                     bool with_entropy, const std::string& plan) {
  const int p = check_softmax_stats_args(logits_in, top, plan, Backend::CPU);
  if (static_cast<CpuSoftmaxStatsPlan>(p) == CpuSoftmaxStatsPlan::Aten)
    return softmax_stats_aten(logits_in, top, with_entropy);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  const auto options = logits.options().dtype(at::kFloat);
  at::Tensor entropy = at::empty({with_entropy ? B : 0}, options);
  at::Tensor top_logp = at::empty({B, top}, options);
  float* e = with_entropy ? entropy.data_ptr<float>() : nullptr;
  float* t = top_logp.data_ptr<float>();
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, B, row_grain(3 * V), [&](int64_t begin, int64_t end) {
    Scratch<float> buffer;
    float* row_buf = logits.scalar_type() == at::kFloat ? nullptr : buffer.get(V, 0.0f);
    for (int64_t r = begin; r < end; ++r)
      if (!row_stats(logits_row_f32(logits, r, row_buf), V, top, e ? e + r : nullptr, t + r * top))
        bad_row = r;
  });
  if (bad_row.load() >= 0) raise_bad_logits_row(kOp, bad_row.load());
  return {entropy, top_logp};
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) { m.impl("softmax_stats", &softmax_stats_cpu); }

}  // namespace knnfast::cpu
