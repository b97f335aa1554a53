// Vectorized row loads for the row kernels: VEC consecutive elements of a float32 / float16 /
// bfloat16 row in one 16-byte transaction (VEC = 4 or 8), converted to float. Callers check
// that the row start is 16-byte aligned and VEC divides the row length; VEC = 1 is the
// scalar fallback for any type (float64 included). Plain loads, not __ldg: knn_interpolate.out
// may write the rows it reads (out aliasing logits), which the read-only path does not allow.
#pragma once

#include "cuda/cuda_common.cuh"

namespace knnfast::cuda {

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};
template <>
struct VecWidth<double> {
  static constexpr int value = 1;
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(p[0]);
  } else if constexpr (sizeof(T) == 4) {
    static_assert(VEC == 4, "float rows load 4 at a time");
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    static_assert(sizeof(T) == 2 && VEC == 8, "half rows load 8 at a time");
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&q);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = to_float(h[e]);
  }
}

// VEC floats (16-byte aligned when VEC % 4 == 0), e.g. from a shared-memory row cache.
template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + e);
      v[e] = q.x, v[e + 1] = q.y, v[e + 2] = q.z, v[e + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = p[e];
  }
}

template <int VEC>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VEC; e += 4)
      *reinterpret_cast<float4*>(p + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = v[e];
  }
}

}  // namespace knnfast::cuda
