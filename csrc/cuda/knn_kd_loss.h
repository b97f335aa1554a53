// knn_kd_loss CUDA launchers (kernels in knn_kd_loss.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace knnfast::cuda {

// Loss weights: ce * label-smoothed CE + kd * KD (KD = H or KL, see knn_kd_loss.cu).
struct KdWeights {
  float ce;
  float kd;
  float smoothing;
};

// logits [B, V] (contiguous, `type`), targets [B] int64, teacher nb ([B, k], tokens < V)
// -> out [B] float32 per-row loss (0 where targets == ignore_index).
void launch_knn_kd_loss(const void* logits, FloatType type, int64_t B, int64_t V,
                        const int64_t* targets, int64_t ignore_index, const NeighbourArgs& nb,
                        KdWeights w, bool kl, float* out, unsigned long long* status,
                        cudaStream_t stream);

// grad_rows [B] float32 -> grad [B, V] float32 = d sum_r grad_rows[r] loss[r] / d logits.
void launch_knn_kd_loss_backward(const float* grad_rows, const void* logits, FloatType type,
                                 int64_t B, int64_t V, const int64_t* targets,
                                 int64_t ignore_index, const NeighbourArgs& nb, KdWeights w,
                                 float* grad, unsigned long long* status, cudaStream_t stream);

}  // namespace knnfast::cuda
