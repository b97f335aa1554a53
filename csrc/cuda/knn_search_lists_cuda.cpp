// knn_search_lists on CUDA: argument checks (common/op_checks.h), then plan "rescore", the
// ATen composition in common/lists_rescore.h around knn_rescore's CUDA wrapper (no kernel of
// its own yet): each row's distinct probed lists packed into candidate rows, scored exactly,
// the k best taken by one topk. The CPU tests run the same composition (plan="rescore" on
// CPU); only the guard and the rescoring kernel underneath are CUDA's. A fused kernel (one
// block per list and its queries, as the CPU kernel groups them) is the next step; this path
// has never run on a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/lists_rescore.h"
#include "cuda/cuda_utils.h"
#include "cuda/knn_rescore_cuda.h"

namespace knnfast::cuda {

std::tuple<at::Tensor, at::Tensor> knn_search_lists_cuda(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& list_offsets,
    const at::Tensor& probes, int64_t k, const std::string& metric,
    const c10::optional<at::Tensor>& exclude, const std::string& plan,
    const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& residuals,
    const c10::optional<at::Tensor>& residual_norms) {
  // a bf16 pack is checked but unused: the CPU's plan bf16 has no CUDA twin yet
  check_knn_search_lists_args(queries, keys, list_offsets, probes, k, metric, exclude, plan,
                              {centers, residuals, residual_norms}, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(queries.device());
  return knn_search_lists_rescore(as_float32(queries), keys.contiguous(), as_int64(list_offsets),
                                  as_int64(probes), k, metric,
                                  exclude.has_value() ? as_int64(*exclude) : at::Tensor(),
                                  &knn_rescore_cuda);
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("knn_search_lists", &knn_search_lists_cuda); }

}  // namespace knnfast::cuda
