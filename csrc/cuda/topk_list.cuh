// A running top-K list maintained by one warp: K entries (score, index) in memory (global or
// shared), sorted best first by knnfast::better() (larger score, then smaller index; padding
// (-inf, -1) last). The warp caches the worst entry in registers, so a candidate that cannot
// enter costs one compare; the rare insertions are done cooperatively (position by a warp
// count, shift by rounds of 32 from the tail). better() is a total order, so the final list
// does not depend on the order candidates arrive in: results are deterministic.
#pragma once

#include "cuda/cuda_common.cuh"

namespace knnfast::cuda {

struct TopkList {
  float* scores;
  int64_t* indices;
  int K;
  float worst_score;  // == scores[K - 1], warp-uniform
  int64_t worst_index;

  __device__ __forceinline__ void load_worst() {
    worst_score = scores[K - 1];
    worst_index = indices[K - 1];
  }

  __device__ __forceinline__ bool admits(float s, int64_t i) const {
    return better(s, i, worst_score, worst_index);
  }

  // Every lane offers (s, i) when `offered`; all that beat the worst entry at their turn are
  // inserted (in lane order). Returns the lanes that passed the first test (a warp whose
  // sorted input produces an empty mask can stop: later inputs are worse). All 32 lanes
  // must call it.
  __device__ unsigned offer(float s, int64_t i, bool offered) {
    const int lane = threadIdx.x % kWarp;
    const unsigned pass = __ballot_sync(kFullMask, offered && admits(s, i));
    unsigned todo = pass;
    while (todo) {
      const int src = __ffs(todo) - 1;
      todo &= todo - 1;
      const float cs = __shfl_sync(kFullMask, s, src);
      const int64_t ci = __shfl_sync(kFullMask, i, src);
      if (!admits(cs, ci)) continue;  // an earlier insertion raised the bar (warp-uniform)
      int ahead = 0;  // entries that stay in front of the candidate
      for (int p = lane; p < K; p += kWarp) ahead += better(scores[p], indices[p], cs, ci) ? 1 : 0;
      for (int offset = kWarp / 2; offset > 0; offset /= 2)
        ahead += __shfl_xor_sync(kFullMask, ahead, offset);
      const int pos = ahead;  // < K because the candidate beats the worst entry
      // entries [pos, K - 2] move one slot down, in rounds of 32 from the tail: each round
      // reads before it writes, and the next round only writes slots this one has read
      for (int hi = K - 1; hi > pos; hi -= kWarp) {
        const int q = hi - lane;
        const bool moves = q > pos;
        float ms = 0.0f;
        int64_t mi = 0;
        if (moves) {
          ms = scores[q - 1];
          mi = indices[q - 1];
        }
        __syncwarp();
        if (moves) {
          scores[q] = ms;
          indices[q] = mi;
        }
        __syncwarp();
      }
      if (lane == 0) {
        scores[pos] = cs;
        indices[pos] = ci;
      }
      __syncwarp();
      load_worst();
    }
    return pass;
  }
};

__device__ __forceinline__ TopkList make_list(float* scores, int64_t* indices, int K) {
  TopkList list{scores, indices, K, 0.0f, 0};
  list.load_worst();
  return list;
}

// Fills a list with padding (-inf, -1); the whole warp calls it.
__device__ __forceinline__ void clear_list(float* scores, int64_t* indices, int K) {
  for (int p = threadIdx.x % kWarp; p < K; p += kWarp) {
    scores[p] = -INFINITY;
    indices[p] = -1;
  }
  __syncwarp();
}

}  // namespace knnfast::cuda
