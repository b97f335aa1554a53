// The read pass shared by knn_interpolate and knn_gold_logprob: one block reads row r of the
// logits once (VEC-wide loads), keeps an online log-sum-exp per thread and merges it over the
// block; NaN / +inf in the row is reported as kBadLogitsRow. With a non-null `cache`, the row
// is also stored there as float32 (shared memory) for a second pass.
#pragma once

#include "cuda/cuda_common.cuh"
#include "cuda/vec_load.cuh"

namespace knnfast::cuda {

template <typename T, int VEC>
__device__ __forceinline__ SoftmaxState block_row_logsumexp(const T* x, int64_t V, float* cache,
                                                            SoftmaxState* scratch, int64_t r,
                                                            unsigned long long* status) {
  SoftmaxState state = softmax_state_empty();
  bool bad = false;
#pragma unroll 2
  for (int64_t c = threadIdx.x; c < V / VEC; c += blockDim.x) {
    float v[VEC];
    load_vec<T, VEC>(x + c * VEC, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      bad |= isnan(v[e]) || v[e] == INFINITY;
      online_add(state, v[e]);
    }
    if (cache) store_vec<VEC>(cache + c * VEC, v);  // 16-byte stores
  }
  state = block_merge(state, scratch);
  if (block_any(bad) && threadIdx.x == 0) report(status, kBadLogitsRow, r);
  return state;
}

}  // namespace knnfast::cuda
