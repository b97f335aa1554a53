// knn_search_lists' plan "rescore": the probed lists expanded into candidate rows and scored by
// knn_rescore, then the k best taken by one topk, in ATen ops alone. It is what CUDA runs (no
// fused kernel there yet) and a CPU plan, so the CPU tests cover the very code CUDA runs
// (except the rescoring kernel underneath). Memory: B x C candidates (C = the most keys a row
// probes); host syncs for the value checks and for C.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace knnfast {

// knn_rescore on one backend: queries [B, D], keys [N, D], ids [B, C] in [-1, N) -> [B, C].
using Rescorer = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::string&);

// After check_knn_search_lists_args: queries float32 [B, D], keys [N, D] contiguous, offsets
// [L + 1] and probes [B, P] int64, exclude [B] int64 or undefined. Checks the values (the CPU
// kernel's messages), then returns (scores [B, k] descending, rows [B, k]) in knn_search's
// order: ties to the smaller row, NaN-scored keys never, padding (-inf, -1).
std::tuple<at::Tensor, at::Tensor> knn_search_lists_rescore(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& offsets,
    const at::Tensor& probes, int64_t k, const std::string& metric, const at::Tensor& exclude,
    Rescorer rescore);

}  // namespace knnfast
