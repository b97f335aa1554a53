// knn_gold_logprob CUDA launcher (kernel in knn_gold_logprob.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace knnfast::cuda {

// logits [B, V] (contiguous, `type`), targets [B] int64 (in [0, V) or ignore_index),
// neighbours nb ([B, k], tokens < V), lam per row -> out [B] float32:
// log((1 - lam) softmax(logits)[y] + lam P_kNN[y]), 0 where targets == ignore_index.
void launch_knn_gold_logprob(const void* logits, FloatType type, int64_t B, int64_t V,
                             const int64_t* targets, int64_t ignore_index,
                             const NeighbourArgs& nb, RowScalarArg lam, float* out,
                             unsigned long long* status, cudaStream_t stream);

}  // namespace knnfast::cuda
