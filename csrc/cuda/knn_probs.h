// knn_probs / knn_probs_sparse CUDA launchers (kernels in knn_probs.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace knnfast::cuda {

// nb: tokens/scores [B, k] (scores mode), tokens checked against vocab = V.
// probs [B, V] float32, zero-filled by the caller; row b gets M . softmax(scores_b / tau_b).
void launch_knn_probs(const NeighbourArgs& nb, int64_t B, int64_t V, float* probs,
                      unsigned long long* status, cudaStream_t stream);

// tokens_u [B, k] int64 prefilled with -1 and probs [B, k] float32 prefilled with 0 by the
// caller; the first valid slot of every token gets the token and its summed probability.
void launch_knn_probs_sparse(const NeighbourArgs& nb, int64_t B, int64_t* tokens_u,
                             float* probs, unsigned long long* status, cudaStream_t stream);

}  // namespace knnfast::cuda
