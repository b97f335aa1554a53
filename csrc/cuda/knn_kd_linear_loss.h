// knn_kd_linear_loss CUDA launchers (kernels in knn_kd_linear_loss.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"
#include "cuda/knn_kd_loss.h"

namespace knnfast::cuda {

// One call's inputs: hidden [T, D] and weight [V, D] contiguous, both of `type` (F32, F16 or
// BF16), bias [V] float32 or null, targets [T] int64, teacher nb ([T, k], k may be 0).
struct LinearKdArgs {
  const void* hidden;
  const void* weight;
  FloatType type;
  const float* bias;
  int64_t T, V, D;
  const int64_t* targets;
  int64_t ignore_index;
  NeighbourArgs nb;
  KdWeights w;
};

// Column spans of the forward: it needs a float32 scratch `part` of
// 3 * knn_kd_linear_loss_spans(V) * T floats, and x_target [T], x_teacher [T, k].
int64_t knn_kd_linear_loss_spans(int64_t V);

// -> loss [T], lse [T] float32 (0 for ignored rows).
void launch_knn_kd_linear_loss(const LinearKdArgs& a, bool kl, float* part, float* x_target,
                               float* x_teacher, float* loss, float* lse,
                               unsigned long long* status, cudaStream_t stream);

// grad_rows [T], lse [T] float32 -> accumulated (+=) into zeroed float32 grad_hidden [T, D],
// grad_weight [V, D], grad_bias [V] (or null). Scratch: slot_w [T, k], mass [T] float32.
void launch_knn_kd_linear_loss_backward(const LinearKdArgs& a, const float* grad_rows,
                                        const float* lse, float* slot_w, float* mass,
                                        float* grad_hidden, float* grad_weight, float* grad_bias,
                                        unsigned long long* status, cudaStream_t stream);

}  // namespace knnfast::cuda
