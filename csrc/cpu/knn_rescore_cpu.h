// knn_rescore's CPU kernel, callable from other kernels (knn_search_lists' plan "rescore"
// scores its candidates with it).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace knnfast::cpu {

// queries [B, D], keys [N, D], indices [B, k] (ids in [-1, N)) -> exact scores [B, k] float32.
at::Tensor knn_rescore_cpu(const at::Tensor& queries, const at::Tensor& keys,
                           const at::Tensor& indices, const std::string& metric);

}  // namespace knnfast::cpu
