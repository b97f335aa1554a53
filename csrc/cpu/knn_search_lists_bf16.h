// knn_search_lists' plan "bf16" (CPU): the probed lists scanned from bf16 residuals packed once
// (knnfast.ops.pack_lists_bf16), every approximate rank with a rigorous error bound, the
// survivors rescored exactly from the stored keys: exact by construction, as knn_search's bf16
// plan (see the .cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/op_inputs.h"

namespace knnfast::cpu {

// The pack, after check_knn_search_lists_args: centers float32 [L, D] (finite), residuals
// bf16 [N, D] (keys minus their list's center, rounded), residual_norms float32 [N, 2]
// (|key - center|, |key|), all contiguous.
struct ListsBf16Pack {
  at::Tensor centers, residuals, residual_norms;
};

// in: float32 queries [B, D], keys [N, D] in list order (the exact scores), exclude; offsets
// int64 [L + 1]; probes int64 [B, P]. Writes out_s / out_i [B, k] as plan scan would (exact
// scores, ties to the smaller row) and returns the rows it could not finish (a candidate set
// over its cap), which the caller searches with plan scan.
std::vector<int64_t> knn_search_lists_bf16(const SearchInputs& in, const at::Tensor& offsets,
                                           const at::Tensor& probes, const ListsBf16Pack& pack,
                                           float* out_s, int64_t* out_i);

}  // namespace knnfast::cpu
