#include "cpu/bf16_dot.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>

#include "cpu/simd_load.h"

namespace knnfast::cpu {
namespace {

inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }  // round to nearest even

template <typename T>
KNNFAST_AVX512_BF16 void pack_keys_typed(const T* keys, int64_t n, int64_t D, const float* center,
                                         uint16_t* packed, float* centered_sq, float* full_sq) {
  const int64_t row = 2 * ((D + 1) / 2);
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = keys + j * D;
    uint16_t* out = packed + j * row;
    __m512 csq = _mm512_setzero_ps(), fsq = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask16 m0 = tail_mask(D - d);
      const __mmask16 m1 = D - d > 16 ? tail_mask(D - d - 16) : 0;
      const __m512 k0 = load16(kr + d, m0);
      const __m512 k1 = m1 ? load16(kr + d + 16, m1) : _mm512_setzero_ps();
      const __m512 c0 = _mm512_maskz_loadu_ps(m0, center + d);
      const __m512 c1 = _mm512_maskz_loadu_ps(m1, center + d + 16);
      const __m512 x0 = _mm512_sub_ps(k0, c0), x1 = _mm512_sub_ps(k1, c1);
      csq = _mm512_fmadd_ps(x0, x0, _mm512_fmadd_ps(x1, x1, csq));
      if (full_sq) fsq = _mm512_fmadd_ps(k0, k0, _mm512_fmadd_ps(k1, k1, fsq));
      const __m512bh pair = _mm512_cvtne2ps_pbh(x1, x0);  // low half from x0: natural order
      const int64_t left = std::min<int64_t>(32, row - d);
      const __mmask32 store = left >= 32 ? ~__mmask32(0) : ((__mmask32(1) << left) - 1);
      _mm512_mask_storeu_epi16(out + d, store, reinterpret_cast<__m512i>(pair));
    }
    centered_sq[j] = _mm512_reduce_add_ps(csq);
    if (full_sq) full_sq[j] = _mm512_reduce_add_ps(fsq);
  }
}

// NR keys x 32 queries, accumulators in 2*NR registers. Each step p broadcasts one bf16 pair
// of every key and multiplies it with the pair p of 32 queries (two vdpbf16ps per key).
template <int NR>
KNNFAST_AVX512_BF16 void dot_block(const uint32_t* qp, int64_t B_padded, int64_t b0,
                                   const uint32_t* keys_u32, int64_t key_stride, int64_t P,
                                   int64_t B, float* dots, int64_t ld, int64_t j0) {
  __m512 acc[NR][2];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t* q = qp + b0;
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh q0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + p * B_padded));
    const __m512bh q1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + p * B_padded + 16));
    for (int r = 0; r < NR; ++r) {
      const __m512bh kb = reinterpret_cast<__m512bh>(
          _mm512_set1_epi32(static_cast<int>(keys_u32[r * key_stride + p])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], kb, q0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], kb, q1);
    }
  }
  // Scatter the 32 query results of each key into dots rows (row-major [B, ld]).
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(ld)));
  for (int h = 0; h < 2; ++h) {
    const int64_t first = b0 + 16 * h;
    if (first >= B) break;
    const __mmask16 valid = tail_mask(B - first);
    float* base = dots + first * ld + j0;
    for (int r = 0; r < NR; ++r) _mm512_mask_i32scatter_ps(base + r, valid, rows, acc[r][h], 4);
  }
}

template <int NR>
KNNFAST_AVX512_BF16 void dot_keys_tail(const uint32_t* qp, int64_t B_padded, int64_t b0,
                                       const uint32_t* keys_u32, int64_t key_stride, int64_t P,
                                       int64_t B, float* dots, int64_t ld, int64_t j0,
                                       int64_t count) {
  if constexpr (NR > 1) {
    if (count < NR) {
      dot_keys_tail<NR - 1>(qp, B_padded, b0, keys_u32, key_stride, P, B, dots, ld, j0, count);
      return;
    }
  }
  dot_block<NR>(qp, B_padded, b0, keys_u32, key_stride, P, B, dots, ld, j0);
}

}  // namespace

bool bf16_dot_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

void pack_queries_bf16(const float* queries, int64_t B, int64_t D, const float* center,
                       uint32_t* packed, int64_t B_padded) {
  const int64_t P = (D + 1) / 2;
  std::memset(packed, 0, sizeof(uint32_t) * P * B_padded);
  for (int64_t b = 0; b < B; ++b) {
    const float* q = queries + b * D;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t d = 2 * p;
      const float lo = q[d] - (center ? center[d] : 0.0f);
      const float hi = d + 1 < D ? q[d + 1] - (center ? center[d + 1] : 0.0f) : 0.0f;
      packed[p * B_padded + b] = uint32_t(bf16_bits(lo)) | (uint32_t(bf16_bits(hi)) << 16);
    }
  }
}

void pack_keys_bf16(const void* keys, c10::ScalarType key_type, int64_t n, int64_t D,
                    const float* center, uint16_t* packed, float* centered_sq, float* full_sq) {
  switch (key_type) {
    case c10::ScalarType::Half:
      return pack_keys_typed(static_cast<const c10::Half*>(keys), n, D, center, packed,
                             centered_sq, full_sq);
    case c10::ScalarType::BFloat16:
      return pack_keys_typed(static_cast<const c10::BFloat16*>(keys), n, D, center, packed,
                             centered_sq, full_sq);
    default:
      return pack_keys_typed(static_cast<const float*>(keys), n, D, center, packed, centered_sq,
                             full_sq);
  }
}

void dot_tile_bf16(const uint32_t* packed_queries, int64_t B, int64_t B_padded,
                   const uint16_t* packed_keys, int64_t n, int64_t D, float* dots, int64_t ld) {
  const int64_t P = (D + 1) / 2;
  const uint32_t* keys_u32 = reinterpret_cast<const uint32_t*>(packed_keys);
  for (int64_t b0 = 0; b0 < B; b0 += kBf16QueryBlock) {
    int64_t j0 = 0;
    for (; j0 + kBf16KeyBlock <= n; j0 += kBf16KeyBlock)
      dot_block<kBf16KeyBlock>(packed_queries, B_padded, b0, keys_u32 + j0 * P, P, P, B, dots,
                               ld, j0);
    if (j0 < n)
      dot_keys_tail<kBf16KeyBlock - 1>(packed_queries, B_padded, b0, keys_u32 + j0 * P, P, P, B,
                                       dots, ld, j0, n - j0);
  }
}

}  // namespace knnfast::cpu
