// Row helpers of the kNN-KD CUDA kernels (knn_kd_loss.cu, knn_kd_linear_loss.cu): a block
// sum, the target check and the valid teacher mass. CUDA headers only.
#pragma once

#include "cuda/neighbour_weights.cuh"

namespace knnfast::cuda {

// Sum over the block; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  v = threadIdx.x < warps ? scratch[threadIdx.x] : 0.0f;
  return warp == 0 ? warp_sum(v) : 0.0f;
}

// Target check of the kNN-KD kernels: false (and 0 written by the caller) when the row is
// ignored or its target is out of range (reported).
__device__ __forceinline__ bool live_target(int64_t y, int64_t V, int64_t ignore_index, int64_t r,
                                            unsigned long long* status) {
  if (y == ignore_index) return false;
  if (valid_target(y, V, ignore_index)) return true;
  if (threadIdx.x == 0) report(status, kBadTarget, r);
  return false;
}

// The valid teacher mass M of row r (sum of the valid slots' weights; 0 without a teacher),
// returned to every thread: d KD / d logits = M softmax - P. 1 for scores; teacher_probs are
// used as given, so mass on padded (-1) slots or an unnormalised row makes it differ from 1.
// Every thread of the block must call it.
__device__ __forceinline__ float teacher_mass(const NeighbourArgs& nb, int64_t r,
                                              const NeighbourRow& row, float* scratch) {
  if (!row.any) return 0.0f;
  if (nb.scores) return 1.0f;
  float m = 0.0f;
  for (int64_t j = threadIdx.x; j < nb.k; j += blockDim.x) {
    const float lw = slot_log_weight(nb, r, j, row);
    if (lw != -INFINITY) m += expf(lw);
  }
  m = block_sum(m, scratch);
  __syncthreads();  // every thread has read scratch inside block_sum
  if (threadIdx.x == 0) scratch[0] = m;
  __syncthreads();
  return scratch[0];
}

}  // namespace knnfast::cuda
