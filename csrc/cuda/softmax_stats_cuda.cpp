// softmax_stats on CUDA: argument checks (common/op_checks.h), then plan "aten", the ATen
// composition in common/softmax_stats_aten.h (no kernel of its own). The CPU tests run the
// same composition (plan="aten" on CPU); only the guard is CUDA's. This path has never run
// on a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/softmax_stats_aten.h"
#include "cuda/cuda_utils.h"

namespace knnfast::cuda {

std::tuple<at::Tensor, at::Tensor> softmax_stats_cuda(const at::Tensor& logits, int64_t top,
                                                      bool with_entropy,
                                                      const std::string& plan) {
  check_softmax_stats_args(logits, top, plan, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  return softmax_stats_aten(logits, top, with_entropy);
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("softmax_stats", &softmax_stats_cuda); }

}  // namespace knnfast::cuda
