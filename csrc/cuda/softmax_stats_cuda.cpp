// softmax_stats on CUDA: argument checks (common/op_checks.h), then a composition of ATen ops
// (no kernel of its own): log-softmax, the 0 log 0 terms masked, topk. It synchronizes once,
// for the value check; a row of only -inf gives (0, -inf) as on the CPU. This path has never
// run on a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"

namespace knnfast::cuda {

std::tuple<at::Tensor, at::Tensor> softmax_stats_cuda(const at::Tensor& logits, int64_t top,
                                                      bool with_entropy) {
  constexpr const char* kOp = "softmax_stats";
  check_softmax_stats_args(logits, top, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.to(at::kFloat);
  const at::Tensor bad = x.isnan().logical_or_(x.isposinf()).any(1).nonzero();
  if (bad.size(0) > 0) raise_bad_logits_row(kOp, bad[0][0].item<int64_t>());
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

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("softmax_stats", &softmax_stats_cuda); }

}  // namespace knnfast::cuda
