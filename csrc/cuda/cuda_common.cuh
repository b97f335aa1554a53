// Device helpers shared by the knnfast CUDA kernels: element loads, the status flag, warp and
// block reductions. CUDA headers only (no torch), so every .cu compiles in about a second.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/knn_math.h"
#include "cuda/kernel_args.h"

namespace knnfast::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }

// Records a bad value: the smallest flat position per code wins, so the report does not
// depend on block scheduling.
__device__ __forceinline__ void report(unsigned long long* status, int code, int64_t position) {
  if (status) atomicMin(status + code, static_cast<unsigned long long>(position));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ int warp_count(bool flag) { return __popc(__ballot_sync(kFullMask, flag)); }

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    SoftmaxState other{__shfl_xor_sync(kFullMask, s.max, offset),
                       __shfl_xor_sync(kFullMask, s.sum, offset)};
    s = softmax_state_merge(s, other);
  }
  return s;
}

__device__ __forceinline__ float warp_logaddexp(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v = logaddexp(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Online log-sum-exp of one thread's elements with one expf per element (the shared
// softmax_state_add needs two); -inf elements are skipped, so an all -inf row stays empty.
__device__ __forceinline__ void online_add(SoftmaxState& s, float x) {
  if (x == -INFINITY) return;
  if (x > s.max) {
    s.sum = s.max == -INFINITY ? 1.0f : s.sum * expf(s.max - x) + 1.0f;
    s.max = x;
  } else {
    s.sum += expf(x - s.max);
  }
}

// Block-wide reductions (any blockDim that is a multiple of 32, up to 1024). `scratch` holds
// 32 entries in shared memory; the result reaches every thread. The reduction order is fixed
// by blockDim, so results are deterministic.
__device__ __forceinline__ SoftmaxState block_merge(SoftmaxState s, SoftmaxState* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  s = warp_merge(s);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < warps ? scratch[lane] : softmax_state_empty();
  return warp_merge(s);
}

__device__ __forceinline__ bool block_any(bool flag) { return __syncthreads_or(flag) != 0; }

__device__ __forceinline__ int64_t load_token(const int64_t* tokens, int64_t i) {
  return __ldg(tokens + i);
}

// lam of row r, validated (a bad value is reported and treated as 0).
__device__ __forceinline__ float row_lam(RowScalarArg lam, int64_t r,
                                         unsigned long long* status) {
  const float v = lam.data[r * lam.stride];
  if (valid_lam(v)) return v;
  if (threadIdx.x == 0) report(status, kBadLam, r);
  return 0.0f;
}

}  // namespace knnfast::cuda
