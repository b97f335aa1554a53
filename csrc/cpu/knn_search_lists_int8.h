// knn_search_lists' plan "int8" (CPU): the probed lists scanned from int8 residual codes packed
// once (knnfast.ops.pack_lists_int8), every approximate rank with a rigorous error bound, the
// survivors rescored exactly from the stored keys (see the .cpp).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/op_inputs.h"

namespace knnfast::cpu {

// Per-key floats of the int8 pack (key_terms [N, kInt8KeyTerms]).
enum Int8KeyTerm : int64_t { kScale = 0, kError, kResidualNorm, kKeyNorm, kCodeSum };
constexpr int64_t kInt8KeyTerms = 5;

// The pack, after check_knn_search_lists_args: centers float32 [L, D] (finite), codes int8
// [N, D] (round((k - c) / scale) per key), key_terms float32 [N, 5]: scale, |r - scale code|
// (rounded up), |r| = |k - c|, |k|, the sum of the key's codes; all contiguous.
struct ListsInt8Pack {
  at::Tensor centers, codes, key_terms;
};

// As knn_search_lists_bf16 (same inputs, outputs and unfinished rows), from the int8 pack.
std::vector<int64_t> knn_search_lists_int8(const SearchInputs& in, const at::Tensor& offsets,
                                           const at::Tensor& probes, const ListsInt8Pack& pack,
                                           float* out_s, int64_t* out_i);

}  // namespace knnfast::cpu
