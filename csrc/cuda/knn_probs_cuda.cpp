// knn_probs / knn_probs_sparse on CUDA: argument checks (common/op_checks.h) and launch
// (kernels in knn_probs.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"
#include "cuda/knn_probs.h"

namespace knnfast::cuda {

at::Tensor knn_probs_cuda(const at::Tensor& scores, const at::Tensor& tokens, int64_t vocab_size,
                          const at::Tensor& temperature) {
  constexpr const char* kOp = "knn_probs";
  check_knn_probs_args(scores, tokens, vocab_size, temperature, Backend::CUDA, kOp);
  const at::Device device = scores.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t B = tokens.size(0);
  NeighbourCall n = neighbour_call(tokens, scores, c10::nullopt, temperature, vocab_size);
  at::Tensor out = at::zeros({B, vocab_size}, scores.options().dtype(at::kFloat));
  const at::Tensor status = new_status(device);
  launch_knn_probs(n.args, B, vocab_size, out.data_ptr<float>(), status_ptr(status),
                   current_stream());
  raise_on_status(status, neighbour_context(kOp, n, vocab_size));
  return out;
}

std::tuple<at::Tensor, at::Tensor> knn_probs_sparse_cuda(const at::Tensor& scores,
                                                         const at::Tensor& tokens,
                                                         const at::Tensor& temperature) {
  constexpr const char* kOp = "knn_probs_sparse";
  check_knn_probs_args(scores, tokens, c10::nullopt, temperature, Backend::CUDA, kOp);
  const at::Device device = scores.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t B = tokens.size(0);
  NeighbourCall n = neighbour_call(tokens, scores, c10::nullopt, temperature, -1);
  at::Tensor out_tokens = at::full(n.t.tokens.sizes(), -1, n.t.tokens.options());
  at::Tensor out_probs = at::zeros(n.t.tokens.sizes(), scores.options().dtype(at::kFloat));
  const at::Tensor status = new_status(device);
  launch_knn_probs_sparse(n.args, B, out_tokens.data_ptr<int64_t>(), out_probs.data_ptr<float>(),
                          status_ptr(status), current_stream());
  raise_on_status(status, neighbour_context(kOp, n, -1));
  return {out_tokens, out_probs};
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) {
  m.impl("knn_probs", &knn_probs_cuda);
  m.impl("knn_probs_sparse", &knn_probs_sparse_cuda);
}

}  // namespace knnfast::cuda
