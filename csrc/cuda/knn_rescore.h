// knn_rescore CUDA launcher (kernel in knn_rescore.cu); also used by knn_search's
// tensor-core path to score its candidates exactly.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace knnfast::cuda {

// queries [B, D] float32, keys [N, D] (`key_type`, contiguous), indices [B, k] int64 in
// [-1, N) -> scores [B, k] float32, exact_score() of knn_math.h (fp32 sums), -inf for -1.
// metric: knnfast::Metric as int. Bad ids and non-finite queries are reported in `status`.
void launch_knn_rescore(const float* queries, const void* keys, FloatType key_type,
                        int64_t B, int64_t N, int64_t D, const int64_t* indices, int64_t k,
                        int metric, float* scores, unsigned long long* status,
                        cudaStream_t stream);

}  // namespace knnfast::cuda
