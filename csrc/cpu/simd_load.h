// AVX-512 loads of 16 keys/queries elements as fp32, shared by the SIMD kernels. Functions
// carry a target attribute so the library still builds for (and runs on) any x86-64 CPU;
// callers dispatch at run time.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

namespace knnfast::cpu {

// The run-time dispatch: the CPU has the AVX-512 subset these kernels use, and
// KNNFAST_SIMD=generic does not force the portable bodies (decided once; vec_math.cpp).
bool use_avx512();

// fn(keys as const float* / c10::Half* / c10::BFloat16*), by the stored key dtype.
template <typename Fn>
auto visit_key_type(c10::ScalarType t, const void* keys, Fn&& fn) {
  switch (t) {
    case c10::ScalarType::Half: return fn(static_cast<const c10::Half*>(keys));
    case c10::ScalarType::BFloat16: return fn(static_cast<const c10::BFloat16*>(keys));
    default: return fn(static_cast<const float*>(keys));
  }
}

#define KNNFAST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
// Bodies that also use vdpbf16ps / vcvtne2ps2bf16: call them only where bf16_dot_available().
#define KNNFAST_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

KNNFAST_AVX512 inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
KNNFAST_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
// A full block takes a plain load: GCC keeps the masked 16-bit load even under an all-ones mask
// here (unlike the fp16 load, which it folds into vcvtph2ps), and on Zen 4 that load made
// knn_search's bf16 stream scan 3x slower than fp16's.
KNNFAST_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}

}  // namespace knnfast::cpu
