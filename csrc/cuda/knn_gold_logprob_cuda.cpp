// knn_gold_logprob on CUDA: argument checks (common/op_checks.h) and launch (kernel in
// knn_gold_logprob.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"
#include "cuda/knn_gold_logprob.h"

namespace knnfast::cuda {

at::Tensor knn_gold_logprob_cuda(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                 const at::Tensor& tokens,
                                 const c10::optional<at::Tensor>& scores,
                                 const c10::optional<at::Tensor>& weights,
                                 const at::Tensor& temperature, const at::Tensor& lam,
                                 int64_t ignore_index) {
  constexpr const char* kOp = "knn_gold_logprob";
  check_knn_gold_logprob_args(logits_in, targets_in, tokens, scores, weights, temperature, lam,
                              Backend::CUDA);
  const at::Device device = logits_in.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  const at::Tensor targets = as_int64(targets_in);
  NeighbourCall n = neighbour_call(tokens, scores, weights, temperature, V);
  at::Tensor lam_storage;
  const RowScalarArg lam_arg = row_scalar(lam_storage, lam);
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kFloat));
  const at::Tensor status = new_status(device);
  launch_knn_gold_logprob(logits.data_ptr(), float_type(logits), B, V,
                          targets.data_ptr<int64_t>(), ignore_index, n.args, lam_arg,
                          out.data_ptr<float>(), status_ptr(status), current_stream());
  StatusContext c = neighbour_context(kOp, n, V);
  c.lam = lam_storage;
  c.targets = targets;
  c.vocab = V;
  c.ignore_index = ignore_index;
  raise_on_status(status, c);
  return out;
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("knn_gold_logprob", &knn_gold_logprob_cuda); }

}  // namespace knnfast::cuda
