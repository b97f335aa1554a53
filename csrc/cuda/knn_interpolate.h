// knn_interpolate CUDA launcher (kernels in knn_interpolate.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace knnfast::cuda {

// logits [B, V] (contiguous, `type`), neighbours nb ([B, k], tokens < V), lam per row ->
// out [B, V] float32 = log((1 - lam) softmax(logits) + lam P_kNN). `out` may alias `logits`
// when logits are float32. cache_rows: keep each row in shared memory between the two
// passes when it fits (else the second pass re-reads it, mostly from L2).
void launch_knn_interpolate(const void* logits, FloatType type, int64_t B, int64_t V,
                            const NeighbourArgs& nb, RowScalarArg lam, float* out,
                            bool cache_rows, unsigned long long* status, cudaStream_t stream);

}  // namespace knnfast::cuda
