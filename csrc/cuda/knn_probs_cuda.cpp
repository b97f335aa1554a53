// knn_probs / knn_probs_sparse on CUDA: argument checks and launch (kernels in knn_probs.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"
#include "cuda/knn_probs.h"

namespace knnfast::cuda {

at::Tensor knn_probs_cuda(const at::Tensor& scores, const at::Tensor& tokens, int64_t vocab_size,
                          const at::Tensor& temperature) {
  constexpr const char* kOp = "knn_probs";
  check_is_cuda(scores, kOp, "scores");
  TORCH_CHECK_VALUE(vocab_size > 0, kOp, ": vocab_size must be > 0, got ", vocab_size);
  check_dim(tokens, 2, kOp, "tokens");
  const at::Device device = scores.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t B = tokens.size(0);
  NeighbourTensors n = neighbour_tensors(tokens, scores, c10::nullopt, temperature, B,
                                         vocab_size, device, kOp);
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
  check_is_cuda(scores, kOp, "scores");
  check_dim(tokens, 2, kOp, "tokens");
  const at::Device device = scores.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t B = tokens.size(0);
  NeighbourTensors n = neighbour_tensors(tokens, scores, c10::nullopt, temperature, B, -1,
                                         device, kOp);
  at::Tensor out_tokens = at::full(n.tokens.sizes(), -1, n.tokens.options());
  at::Tensor out_probs = at::zeros(n.tokens.sizes(), scores.options().dtype(at::kFloat));
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
