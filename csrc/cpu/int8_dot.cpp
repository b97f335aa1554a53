#include "cpu/int8_dot.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/simd_load.h"

namespace knnfast::cpu {
namespace {

#define KNNFAST_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// x and y's 64-bit pairs picked by lo and hi within each 128-bit lane, added.
template <int lo, int hi>
KNNFAST_AVX512 inline __m512i add_pairs(__m512i x, __m512i y) {
  const __m512 fx = _mm512_castsi512_ps(x), fy = _mm512_castsi512_ps(y);
  return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(fx, fy, lo)),
                          _mm512_castps_si512(_mm512_shuffle_ps(fx, fy, hi)));
}

// r[t] = sum of the 16 int32 lanes of a[t], t < 16: list_scan.cpp's transpose-and-add tree in
// integers (exact, so any order gives the same sums).
KNNFAST_AVX512 inline __m512i reduce16_epi32(__m512i a[16]) {
  __m512i b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_i32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)
    d[i] = add_pairs<_MM_SHUFFLE(1, 0, 1, 0), _MM_SHUFFLE(3, 2, 3, 2)>(c[2 * i], c[2 * i + 1]);
  const __m512i r = add_pairs<_MM_SHUFFLE(2, 0, 2, 0), _MM_SHUFFLE(3, 1, 3, 1)>(d[0], d[1]);
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_epi32(order, r);
}

// 16 keys at a time, each query's 16 sums kept in 16 accumulators (as dot_tile16_bf16).
KNNFAST_AVX512_VNNI void dot_tile16_int8_avx512(const uint8_t* q, int64_t B, int64_t Dq,
                                                const int8_t* k, int64_t n, int64_t D,
                                                int32_t* out, int64_t ld, int8_t* spare) {
  const int64_t full = D / 64 * 64;
  const __mmask64 tail = D > full ? (~__mmask64(0)) >> (64 - (D - full)) : 0;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nn = n - j0 < 16 ? n - j0 : 16;
    const int8_t* kt = k + j0 * D;
    if (nn < 16) {  // the last rows, zero padded to 16
      std::memcpy(spare, kt, nn * D);
      std::memset(spare + nn * D, 0, (16 - nn) * D);
      kt = spare;
    }
    const char* next = reinterpret_cast<const char*>(k + (j0 + 16) * D);
    const int64_t ahead = (n - j0 - 16 < 16 ? n - j0 - 16 : 16) * D;
    for (int64_t byte = 0; byte < ahead; byte += 64) _mm_prefetch(next + byte, _MM_HINT_T0);
    for (int64_t b = 0; b < B; ++b) {
      __m512i acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_si512();
      const uint8_t* qb = q + b * Dq;
      for (int64_t d = 0; d < full; d += 64) {
        const __m512i qv = _mm512_loadu_si512(qb + d);
        const int8_t* kp = kt + d;
        for (int t = 0; t < 16; ++t, kp += D)
          acc[t] = _mm512_dpbusd_epi32(acc[t], qv, _mm512_loadu_si512(kp));
      }
      if (tail) {  // the query row is padded to 64 bytes; the keys' tail is masked
        const __m512i qv = _mm512_loadu_si512(qb + full);
        for (int t = 0; t < 16; ++t)
          acc[t] = _mm512_dpbusd_epi32(acc[t], qv,
                                       _mm512_maskz_loadu_epi8(tail, kt + t * D + full));
      }
      _mm512_mask_storeu_epi32(out + b * ld + j0, tail_mask(nn), reduce16_epi32(acc));
    }
  }
}

void dot_tile16_int8_generic(const uint8_t* q, int64_t B, int64_t Dq, const int8_t* k,
                             int64_t n, int64_t D, int32_t* out, int64_t ld) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j) {
      int32_t sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += int32_t(q[b * Dq + d]) * int32_t(k[j * D + d]);
      out[b * ld + j] = sum;
    }
}

// The fp32 bounds of quantize_row_int8: each term y_d^2, (y_d - scale code_d)^2 is formed with
// one or two roundings (fma), and D non-negative terms summed in any order lose at most
// (D - 1) eps of their sum; a square root and the product with this factor cost 2 eps more.
// (1 + 2 (D + 16) eps) covers it all for any D the plan takes.
float sum_bound_factor(int64_t D) { return 1.0f + float(2 * D + 32) * 0x1p-24f; }

// The bounds again from float64 (rounded up), for rows whose fp32 square sums are so small
// that squares may have underflowed out of them (see bf16_bounds.h's norm_of).
QueryCode code_bounds_f64(const float* x, const float* minus, int64_t D, float scale,
                          const uint8_t* out) {
  double norm = 0.0, err = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double y = minus ? double(x[d] - minus[d]) : double(x[d]);
    const double miss = y - double(scale) * double(int(out[d]) - 128);  // exact product
    norm += y * y;
    err += miss * miss;
  }
  const auto up = [](double v) { return std::nextafter(float(v * (1.0 + 0x1p-40)), INFINITY); };
  return {scale, up(std::sqrt(norm)), up(std::sqrt(err))};
}

// fp32 square sums below this may have lost squares to underflow.
constexpr float kSmallSum = 0x1p-60f;

KNNFAST_AVX512 inline __m512 row_part(const float* x, const float* minus, int64_t d,
                                      __mmask16 m) {
  const __m512 v = _mm512_maskz_loadu_ps(m, x + d);
  return minus ? _mm512_sub_ps(v, _mm512_maskz_loadu_ps(m, minus + d)) : v;
}

KNNFAST_AVX512 QueryCode quantize_row_int8_avx512(const float* x, const float* minus, int64_t D,
                                                  int64_t Dq, uint8_t* out) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16)
    amax = _mm512_max_ps(amax, _mm512_abs_ps(row_part(x, minus, d, tail_mask(D - d))));
  const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
  const __m512 vs = _mm512_set1_ps(scale), inv = _mm512_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  __m512 norm = _mm512_setzero_ps(), err = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 y = row_part(x, minus, d, m);
    const __m512 code = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(
        _mm512_mul_ps(y, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    const __m512 miss = _mm512_fnmadd_ps(vs, code, y);  // y - scale code, one rounding
    norm = _mm512_fmadd_ps(y, y, norm);
    err = _mm512_fmadd_ps(miss, miss, err);
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(code), _mm512_set1_epi32(128));
    _mm_mask_storeu_epi8(out + d, m, _mm512_cvtepi32_epi8(biased));
  }
  std::fill(out + D, out + Dq, uint8_t(0));
  const float norm_sq = _mm512_reduce_add_ps(norm), err_sq = _mm512_reduce_add_ps(err);
  if (norm_sq < kSmallSum || err_sq < kSmallSum) return code_bounds_f64(x, minus, D, scale, out);
  const float up = sum_bound_factor(D);
  return {scale, std::sqrt(norm_sq) * up, std::sqrt(err_sq) * up};
}

QueryCode quantize_row_int8_generic(const float* x, const float* minus, int64_t D, int64_t Dq,
                                    uint8_t* out) {
  float amax = 0.0f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(minus ? x[d] - minus[d] : x[d]));
  const float scale = amax / 127.0f, inv = scale > 0 ? 1.0f / scale : 0.0f;
  float norm = 0.0f, err = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float y = minus ? x[d] - minus[d] : x[d];  // the same fp32 value as above
    const float code = std::clamp(std::nearbyint(y * inv), -127.0f, 127.0f);
    const float miss = std::fma(-scale, code, y);
    out[d] = uint8_t(int(code) + 128);
    norm = std::fma(y, y, norm);
    err = std::fma(miss, miss, err);
  }
  std::fill(out + D, out + Dq, uint8_t(0));
  if (norm < kSmallSum || err < kSmallSum) return code_bounds_f64(x, minus, D, scale, out);
  const float up = sum_bound_factor(D);
  return {scale, std::sqrt(norm) * up, std::sqrt(err) * up};
}

}  // namespace

bool int8_dot_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
}

int64_t int8_query_stride(int64_t D) { return (D + 63) / 64 * 64; }

QueryCode quantize_row_int8(const float* x, const float* minus, int64_t D, int64_t Dq,
                            uint8_t* out) {
  if (use_avx512()) return quantize_row_int8_avx512(x, minus, D, Dq, out);
  return quantize_row_int8_generic(x, minus, D, Dq, out);
}

void dot_tile16_int8(const uint8_t* q, int64_t B, int64_t Dq, const int8_t* k, int64_t n_keys,
                     int64_t D, int32_t* acc, int64_t ld, int8_t* spare) {
  if (int8_dot_available() && use_avx512())
    return dot_tile16_int8_avx512(q, B, Dq, k, n_keys, D, acc, ld, spare);
  dot_tile16_int8_generic(q, B, Dq, k, n_keys, D, acc, ld);
}

}  // namespace knnfast::cpu
