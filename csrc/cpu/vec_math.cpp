#include "cpu/vec_math.h"

#include <ATen/cpu/Utils.h>
#include <unordered_map>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "cpu/simd_load.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace knnfast::cpu {
namespace {

// ---------------------------------------------------------------- portable bodies

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

RowLogSumExp row_logsumexp_generic(const float* x, int64_t n) {
  float m = -INFINITY;
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    bad |= std::isnan(x[i]) || x[i] == INFINITY;
    m = x[i] > m ? x[i] : m;
  }
  if (bad) return {NAN, NAN, true};
  if (m == -INFINITY) return {-INFINITY, -INFINITY, false};
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
  return {m, std::log(s), false};
}

float row_entropy_generic(const float* x, int64_t n, float max, float log_sum) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] == -INFINITY) continue;  // p = 0: 0 log 0 = 0
    const float d = x[i] - max;
    s += std::exp(d - log_sum) * d;
  }
  return log_sum - s;
}

// v into out[top] (descending, v > out[top - 1]): equal values stay ahead of it.
inline void insert_descending(float* out, int64_t top, float v) {
  int64_t j = top - 1;
  for (; j > 0 && out[j - 1] < v; --j) out[j] = out[j - 1];
  out[j] = v;
}

void row_top_values_generic(const float* x, int64_t n, int64_t top, float* out) {
  std::fill(out, out + top, -INFINITY);
  for (int64_t i = 0; i < n; ++i)
    if (x[i] > out[top - 1]) insert_descending(out, top, x[i]);
}

template <typename T>
void dot_tile_generic(const float* q, int64_t B, const T* k, int64_t n, int64_t D, float* dots,
                      int64_t ld, float* key_sq) {
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + j * D;
    if (key_sq) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += to_float(kr[d]) * to_float(kr[d]);
      key_sq[j] = s;
    }
    for (int64_t b = 0; b < B; ++b) {
      const float* qr = q + b * D;
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += qr[d] * to_float(kr[d]);
      dots[b * ld + j] = s;
    }
  }
}

template <typename T>
PairSums pair_sums_generic(const float* q, const T* k, int64_t D) {
  PairSums r{0.0f, 0.0f, 0.0f};
  for (int64_t d = 0; d < D; ++d) {
    const float kv = to_float(k[d]);
    const float diff = q[d] - kv;
    r.diff_sq += diff * diff;
    r.dot += q[d] * kv;
    r.key_sq += kv * kv;
  }
  return r;
}

// ---------------------------------------------------------------- AVX-512 bodies

// exp(x) for x <= 0 (log-sum-exp only feeds x - max): Cody-Waite reduction x = n ln2 + r,
// degree-7 Taylor polynomial on |r| <= ln2/2 (error < 2 ulp), 2^n applied by scalef.
// x = -inf (and anything below -104) gives exactly 0.
KNNFAST_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.0f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// Per-lane online log-sum-exp over blocks small enough to stay in L1: block max first, then
// one exp per element against the running max (the running sum is rescaled once per block).
KNNFAST_AVX512 RowLogSumExp row_logsumexp_avx512(const float* x, int64_t n) {
  constexpr int64_t kBlock = 2048;
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  __m512 run_max = neg_inf;
  __m512 run_sum = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = start + kBlock < n ? start + kBlock : n;
    __m512 bmax = neg_inf;
    for (int64_t i = start; i < end; i += 16) {
      const __mmask16 m = tail_mask(end - i);
      const __m512 v = _mm512_mask_loadu_ps(neg_inf, m, x + i);
      bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      bmax = _mm512_max_ps(bmax, v);
    }
    const __m512 new_max = _mm512_max_ps(run_max, bmax);
    // lanes whose max is still -inf keep sum 0 (avoid -inf - -inf = NaN)
    const __mmask16 finite = _mm512_cmp_ps_mask(new_max, neg_inf, _CMP_NEQ_OQ);
    run_sum = _mm512_maskz_mul_ps(finite, run_sum,
                                  exp_nonpositive(_mm512_sub_ps(run_max, new_max)));
    __m512 s0 = _mm512_setzero_ps();
    for (int64_t i = start; i < end; i += 16) {
      const __mmask16 m = tail_mask(end - i);
      const __m512 v = _mm512_mask_loadu_ps(neg_inf, m, x + i);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(v, new_max));
      s0 = _mm512_add_ps(s0, _mm512_maskz_mov_ps(finite, e));
    }
    run_sum = _mm512_add_ps(run_sum, s0);
    run_max = new_max;
  }
  const float m = _mm512_reduce_max_ps(run_max);
  if (bad || m == INFINITY) return {NAN, NAN, true};
  if (m == -INFINITY) return {-INFINITY, -INFINITY, false};
  const __m512 scaled = _mm512_mul_ps(run_sum, exp_nonpositive(_mm512_sub_ps(run_max,
                                                                             _mm512_set1_ps(m))));
  return {m, std::log(_mm512_reduce_add_ps(scaled)), false};
}

KNNFAST_AVX512 float row_entropy_avx512(const float* x, int64_t n, float max, float log_sum) {
  const __m512 m = _mm512_set1_ps(max), ls = _mm512_set1_ps(log_sum);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_mask_loadu_ps(neg_inf, tail_mask(n - i), x + i);
    const __mmask16 live = _mm512_cmp_ps_mask(v, neg_inf, _CMP_NEQ_OQ);  // p = 0 adds 0
    const __m512 d = _mm512_sub_ps(v, m);
    // d - log_sum <= 0: d <= 0 and the sum is >= 1 (the max contributes exp(0))
    acc = _mm512_mask3_fmadd_ps(exp_nonpositive(_mm512_sub_ps(d, ls)), d, acc, live);
  }
  return log_sum - _mm512_reduce_add_ps(acc);
}

KNNFAST_AVX512 void row_top_values_avx512(const float* x, int64_t n, int64_t top, float* out) {
  std::fill(out, out + top, -INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
    __mmask16 pass = _mm512_mask_cmp_ps_mask(tail_mask(n - i), v, _mm512_set1_ps(out[top - 1]),
                                             _CMP_GT_OQ);
    while (pass) {
      const float c = x[i + __builtin_ctz(pass)];
      pass &= pass - 1;
      if (c > out[top - 1]) insert_descending(out, top, c);  // the bar may have risen
    }
  }
}

KNNFAST_AVX512 void row_shift_avx512(const float* x, float shift, float add, float* out,
                                     int64_t n) {
  const __m512 sv = _mm512_set1_ps(shift), av = _mm512_set1_ps(add);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), sv), av));
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_add_ps(_mm512_sub_ps(v, sv), av));
  }
}

KNNFAST_AVX512 void row_softmax_affine_avx512(const float* x, float max, float log_sum,
                                              float scale, float add, float* out, int64_t n) {
  const __m512 mv = _mm512_set1_ps(max), lv = _mm512_set1_ps(log_sum);
  const __m512 sv = _mm512_set1_ps(scale), av = _mm512_set1_ps(add);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, x + i);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_sub_ps(v, mv), lv));
    _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(sv, e, av));
  }
}

KNNFAST_AVX512 float row_sum_avx512(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(tail_mask(n - i), x + i));
  return _mm512_reduce_add_ps(acc);
}

// NB queries at a time against one key row, accumulators in registers; the key row is read
// from memory once (first group) and from L1 for the other groups.
template <int NB, typename T>
KNNFAST_AVX512 inline void dot_group_avx512(const float* q, const T* kr, int64_t D, float* dots,
                                            int64_t ld, float* key_sq_out) {
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  __m512 ksq = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 kv = load16(kr + d, m);
    if (key_sq_out) ksq = _mm512_fmadd_ps(kv, kv, ksq);
    for (int b = 0; b < NB; ++b)
      acc[b] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + b * D + d), kv, acc[b]);
  }
  for (int b = 0; b < NB; ++b) dots[b * ld] = _mm512_reduce_add_ps(acc[b]);
  if (key_sq_out) *key_sq_out = _mm512_reduce_add_ps(ksq);
}

template <typename T>
KNNFAST_AVX512 void dot_tile_avx512(const float* q, int64_t B, const T* k, int64_t n, int64_t D,
                                    float* dots, int64_t ld, float* key_sq) {
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + j * D;
    for (int64_t b0 = 0; b0 < B; b0 += 8) {
      float* ksq = (b0 == 0 && key_sq) ? key_sq + j : nullptr;
      float* out = dots + b0 * ld + j;
      const float* qb = q + b0 * D;
      switch (B - b0 >= 8 ? 8 : B - b0) {
        case 8: dot_group_avx512<8>(qb, kr, D, out, ld, ksq); break;
        case 7: dot_group_avx512<7>(qb, kr, D, out, ld, ksq); break;
        case 6: dot_group_avx512<6>(qb, kr, D, out, ld, ksq); break;
        case 5: dot_group_avx512<5>(qb, kr, D, out, ld, ksq); break;
        case 4: dot_group_avx512<4>(qb, kr, D, out, ld, ksq); break;
        case 3: dot_group_avx512<3>(qb, kr, D, out, ld, ksq); break;
        case 2: dot_group_avx512<2>(qb, kr, D, out, ld, ksq); break;
        default: dot_group_avx512<1>(qb, kr, D, out, ld, ksq); break;
      }
    }
    if (B == 0 && key_sq) {
      __m512 ksq = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 kv = load16(kr + d, tail_mask(D - d));
        ksq = _mm512_fmadd_ps(kv, kv, ksq);
      }
      key_sq[j] = _mm512_reduce_add_ps(ksq);
    }
  }
}

// r[t] = sum of the 16 lanes of a[t], t < 16: a transpose-and-add tree (46 shuffles and adds
// for 16 sums, against ~8 each for _mm512_reduce_add_ps). Each level halves the vectors and
// doubles the sums each one carries: 256-bit halves, then 128-bit quarters, then pairs inside
// quarters; the last level leaves sum a[4e + q] in slot 4q + e, which one permute undoes.
KNNFAST_AVX512 inline __m512 reduce16(__m512 a[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, r);
}

// dot_tile16: 16 keys at a time, converted once into an fp32 block that stays in L1 while
// every query runs over it with 16 accumulators, reduced together by reduce16 (the 16 squared
// norms too). The block is chunk-major, block[(d / 16) * 256 + t * 16 + lane] for key t and
// dimension d (zero for rows past the tile's end and columns past D), so the 16 loads of a
// chunk are one pointer plus constant offsets: no per-key pointer to keep in a register.
template <typename T>
KNNFAST_AVX512 void dot_tile16_avx512(const float* q, int64_t B, const T* k, int64_t n,
                                      int64_t D, float* dots, int64_t ld, float* key_sq,
                                      float* block) {
  const int64_t Dp = (D + 15) / 16 * 16;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nn = n - j0 < 16 ? n - j0 : 16;
    // the next tile's rows are wanted after this one's queries: ask for them now
    const char* next = reinterpret_cast<const char*>(k + (j0 + 16) * D);
    const int64_t ahead = (n - j0 - 16 < 16 ? n - j0 - 16 : 16) * D * int64_t(sizeof(T));
    for (int64_t byte = 0; byte < ahead; byte += 64) _mm_prefetch(next + byte, _MM_HINT_T0);
    for (int64_t t = 0; t < 16; ++t)
      for (int64_t d = 0; d < Dp; d += 16)
        _mm512_storeu_ps(block + d * 16 + t * 16,
                         t < nn ? load16(k + (j0 + t) * D + d, tail_mask(D - d))
                                : _mm512_setzero_ps());
    const __mmask16 live = tail_mask(nn);
    __m512 acc[16];
    if (key_sq) {
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t d = 0; d < Dp; d += 16)
        for (int t = 0; t < 16; ++t) {
          const __m512 kv = _mm512_loadu_ps(block + d * 16 + t * 16);
          acc[t] = _mm512_fmadd_ps(kv, kv, acc[t]);
        }
      _mm512_mask_storeu_ps(key_sq + j0, live, reduce16(acc));
    }
    for (int64_t b = 0; b < B; ++b) {
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t d = 0; d < Dp; d += 16) {
        const __m512 qv = _mm512_maskz_loadu_ps(tail_mask(D - d), q + b * D + d);
        for (int t = 0; t < 16; ++t)
          acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(block + d * 16 + t * 16), qv, acc[t]);
      }
      _mm512_mask_storeu_ps(dots + b * ld + j0, live, reduce16(acc));
    }
  }
}

template <typename T>
KNNFAST_AVX512 PairSums pair_sums_avx512(const float* q, const T* k, int64_t D) {
  __m512 diff_sq = _mm512_setzero_ps(), dot = _mm512_setzero_ps(), ksq = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 kv = load16(k + d, m);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
    const __m512 diff = _mm512_sub_ps(qv, kv);
    diff_sq = _mm512_fmadd_ps(diff, diff, diff_sq);
    dot = _mm512_fmadd_ps(qv, kv, dot);
    ksq = _mm512_fmadd_ps(kv, kv, ksq);
  }
  return {_mm512_reduce_add_ps(diff_sq), _mm512_reduce_add_ps(dot), _mm512_reduce_add_ps(ksq)};
}

// rank_above: 16 keys at a time; the passing positions are compressed in a register and stored
// with a mask (a compress straight to memory is microcoded, and slow, on Zen 4).
template <Metric M>
KNNFAST_AVX512 int64_t rank_above_avx512(float* dots, const float* key_sq, int64_t n,
                                         float threshold, int32_t* above) {
  const __m512 floor = _mm512_set1_ps(threshold), eps = _mm512_set1_ps(kNormEps);
  __m512i position = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t count = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = tail_mask(n - j);
    __m512 v = _mm512_maskz_loadu_ps(live, dots + j);
    if constexpr (M == Metric::L2) {  // 2 dot - |k|^2, as ranking_key (v + v is exact)
      v = _mm512_sub_ps(_mm512_add_ps(v, v), _mm512_maskz_loadu_ps(live, key_sq + j));
    } else if constexpr (M == Metric::COS) {  // max_ps(NaN, eps) = eps, like fmaxf
      const __m512 norm = _mm512_sqrt_ps(_mm512_maskz_loadu_ps(live, key_sq + j));
      v = _mm512_div_ps(v, _mm512_max_ps(norm, eps));
    }
    _mm512_mask_storeu_ps(dots + j, live, v);
    const __mmask16 pass = _mm512_mask_cmp_ps_mask(live, v, floor, _CMP_GT_OQ);
    if (pass) {
      const int passed = __builtin_popcount(pass);
      _mm512_mask_storeu_epi32(above + count, __mmask16((1u << passed) - 1),
                               _mm512_maskz_compress_epi32(pass, position));
      count += passed;
    }
    position = _mm512_add_epi32(position, _mm512_set1_epi32(16));
  }
  return count;
}

int64_t rank_above_generic(Metric metric, float* dots, const float* key_sq, int64_t n,
                           float threshold, int32_t* above) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    dots[j] = ranking_key(metric, dots[j], metric == Metric::IP ? 0.0f : key_sq[j]);
    if (dots[j] > threshold) above[count++] = int32_t(j);
  }
  return count;
}

// ---------------------------------------------------------------- dispatch

bool detect_avx512() {
  const char* force = std::getenv("KNNFAST_SIMD");
  if (force && std::strcmp(force, "generic") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

bool use_avx512() {
  static const bool value = detect_avx512();
  return value;
}

template <typename Fn>
auto visit_key_type(c10::ScalarType t, const void* keys, Fn&& fn) {
  switch (t) {
    case c10::ScalarType::Half: return fn(static_cast<const c10::Half*>(keys));
    case c10::ScalarType::BFloat16: return fn(static_cast<const c10::BFloat16*>(keys));
    default: return fn(static_cast<const float*>(keys));
  }
}

}  // namespace

RowLogSumExp row_logsumexp(const float* x, int64_t n) {
  return use_avx512() ? row_logsumexp_avx512(x, n) : row_logsumexp_generic(x, n);
}

void row_shift(const float* x, float shift, float add, float* out, int64_t n) {
  if (use_avx512()) return row_shift_avx512(x, shift, add, out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - shift) + add;
}

void row_softmax_affine(const float* x, float max, float log_sum, float scale, float add,
                        float* out, int64_t n) {
  if (use_avx512()) return row_softmax_affine_avx512(x, max, log_sum, scale, add, out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = scale * std::exp((x[i] - max) - log_sum) + add;
}

float row_entropy(const float* x, int64_t n, float max, float log_sum) {
  return use_avx512() ? row_entropy_avx512(x, n, max, log_sum)
                      : row_entropy_generic(x, n, max, log_sum);
}

void row_top_values(const float* x, int64_t n, int64_t top, float* out) {
  if (use_avx512()) return row_top_values_avx512(x, n, top, out);
  row_top_values_generic(x, n, top, out);
}

float row_sum(const float* x, int64_t n) {
  if (use_avx512()) return row_sum_avx512(x, n);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

void dot_tile(const float* queries, int64_t B, const void* keys, c10::ScalarType key_type,
              int64_t n_keys, int64_t D, float* dots, int64_t ld, float* key_sq) {
  visit_key_type(key_type, keys, [&](auto* k) {
    if (use_avx512())
      dot_tile_avx512(queries, B, k, n_keys, D, dots, ld, key_sq);
    else
      dot_tile_generic(queries, B, k, n_keys, D, dots, ld, key_sq);
  });
}

void dot_tile16(const float* queries, int64_t B, const void* keys, c10::ScalarType key_type,
                int64_t n_keys, int64_t D, float* dots, int64_t ld, float* key_sq,
                float* block) {
  visit_key_type(key_type, keys, [&](auto* k) {
    if (use_avx512())
      dot_tile16_avx512(queries, B, k, n_keys, D, dots, ld, key_sq, block);
    else
      dot_tile_generic(queries, B, k, n_keys, D, dots, ld, key_sq);
  });
}

int64_t dot_tile16_block_floats(int64_t D) { return 16 * ((D + 15) / 16 * 16); }

int64_t rank_above(Metric metric, float* dots, const float* key_sq, int64_t n, float threshold,
                   int32_t* above) {
  if (!use_avx512()) return rank_above_generic(metric, dots, key_sq, n, threshold, above);
  switch (metric) {
    case Metric::L2: return rank_above_avx512<Metric::L2>(dots, key_sq, n, threshold, above);
    case Metric::IP: return rank_above_avx512<Metric::IP>(dots, key_sq, n, threshold, above);
    default: return rank_above_avx512<Metric::COS>(dots, key_sq, n, threshold, above);
  }
}

void key_sq_norms(const void* keys, c10::ScalarType key_type, int64_t n_keys, int64_t D,
                  float* key_sq) {
  dot_tile(nullptr, 0, keys, key_type, n_keys, D, nullptr, 0, key_sq);
}

PairSums pair_sums(const float* query, const void* key, c10::ScalarType key_type, int64_t D) {
  return visit_key_type(key_type, key, [&](auto* k) {
    return use_avx512() ? pair_sums_avx512(query, k, D) : pair_sums_generic(query, k, D);
  });
}

const char* simd_level() { return use_avx512() ? "avx512" : "generic"; }

bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

namespace {
bool torch_cpu_capability(const std::unordered_map<std::string, c10::IValue>& caps,
                          const char* name) {
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}
}  // namespace

bool cpu_has_amx_bf16() {
  // cpuinfo's flag; oneDNN asks the OS for the tile state itself before it uses AMX
  static const bool amx = torch_cpu_capability(at::cpu::get_cpu_capabilities(), "amx_bf16") &&
                          torch_cpu_capability(at::cpu::get_cpu_capabilities(), "amx_tile");
  return amx;
}

std::string cpu_isa_flags() {
  const auto caps = at::cpu::get_cpu_capabilities();
  std::string out;
  const char* names[][2] = {{"avx512f", "avx512_f"},     {"avx512_bf16", "avx512_bf16"},
                            {"avx512_fp16", "avx512_fp16"}, {"amx_tile", "amx_tile"},
                            {"amx_bf16", "amx_bf16"},     {"amx_fp16", "amx_fp16"}};
  for (const auto& name : names)
    if (torch_cpu_capability(caps, name[1])) out += std::string(out.empty() ? "" : ",") + name[0];
  return out;
}

}  // namespace knnfast::cpu
