// knn_search's large-batch paths: exact top-k through bf16 dot products whose every approximate
// score carries a rigorous error bound (see the .cpp). Two scorers: our vdpbf16ps kernel
// (plan bf16, AVX512-BF16 only) or ATen's bf16 matmul (plan bf16_gemm: oneDNN, AMX tiles where
// the CPU has them; runs on every CPU).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/knn_math.h"

namespace knnfast::cpu {

enum class Bf16Scorer { Kernel, Gemm };

// queries: float32 [B, D] contiguous, finite; keys: [N, D] contiguous (any float type);
// exclude: B ids or nullptr. Writes out_scores / out_indices [B, k] (exact fp32 scores,
// descending, ties to the smaller index, padded with (-inf, -1)). Returns the rows it could not
// finish (a row whose candidate set outgrew its cap); the caller searches those exactly.
std::vector<int64_t> knn_search_bf16(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                     Metric metric, const int64_t* exclude, float* out_scores,
                                     int64_t* out_indices, Bf16Scorer scorer);

}  // namespace knnfast::cpu
