// knn_rescore's CUDA wrapper, callable from other wrappers (knn_search_lists scores its
// candidates with it). Torch side only.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace knnfast::cuda {

// queries [B, D], keys [N, D], indices [B, k] (ids in [-1, N)) -> exact scores [B, k] float32.
at::Tensor knn_rescore_cuda(const at::Tensor& queries, const at::Tensor& keys,
                            const at::Tensor& indices, const std::string& metric);

}  // namespace knnfast::cuda
