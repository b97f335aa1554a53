// softmax_stats' plan "aten" (see softmax_stats_aten.h): device-agnostic ATen code.
#include "common/softmax_stats_aten.h"

#include "common/messages.h"

namespace knnfast {

std::tuple<at::Tensor, at::Tensor> softmax_stats_aten(const at::Tensor& logits, int64_t top,
                                                      bool with_entropy) {
  const at::Tensor x = logits.to(at::kFloat).contiguous();  // one reduction order per row
  const at::Tensor bad = x.isnan().logical_or_(x.isposinf()).any(1).nonzero();
  if (bad.size(0) > 0) raise_bad_logits_row("softmax_stats", bad[0][0].item<int64_t>());
  const at::Tensor max = std::get<0>(x.max(1, /*keepdim=*/true));
  const at::Tensor dead = max.isneginf();  // rows of only -inf stay -inf below, never NaN
  const at::Tensor shifted = x - max.masked_fill(dead, 0.0);
  const at::Tensor log_sum = shifted.exp().sum(1, /*keepdim=*/true).log().masked_fill(dead, 0.0);
  const at::Tensor logp = shifted - log_sum;
  const at::Tensor top_logp = std::get<0>(logp.topk(top, 1));
  if (!with_entropy) return {at::empty({0}, x.options()), top_logp};
  const at::Tensor terms = at::where(logp.isneginf(), at::zeros({}, x.options()), logp.exp() * logp);
  return {terms.sum(1).neg(), top_logp};
}

}  // namespace knnfast
