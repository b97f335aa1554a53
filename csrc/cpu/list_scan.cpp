#include "cpu/list_scan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include "cpu/bf16_dot.h"

#include "cpu/simd_load.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

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

// dot_tile16_bf16: as dot_tile16, but keys are already bf16 rows (no conversion block) and each
// vdpbf16ps multiplies 16 pairs: half the instructions of the fp32 FMAs over the same D.
KNNFAST_AVX512_BF16 void dot_tile16_bf16_avx512(const uint16_t* q, int64_t B, int64_t Dq,
                                                const uint16_t* k, int64_t n, int64_t D,
                                                float* dots, int64_t ld, uint16_t* spare) {
  const int64_t full = D / 32 * 32;
  const __mmask32 tail = D > full ? (__mmask32(1) << (D - full)) - 1 : 0;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nn = n - j0 < 16 ? n - j0 : 16;
    const __mmask16 live = tail_mask(nn);
    const uint16_t* kt = k + j0 * D;
    if (nn < 16) {  // the last rows, zero padded to 16: the loops below stay uniform
      std::memcpy(spare, kt, nn * D * sizeof(uint16_t));
      std::memset(spare + nn * D, 0, (16 - nn) * D * sizeof(uint16_t));
      kt = spare;
    }
    // the next tile's rows are wanted after this one's queries: ask for them now (a list
    // read once per call comes from memory, and its queries are few)
    const char* next = reinterpret_cast<const char*>(k + (j0 + 16) * D);
    const int64_t ahead = (n - j0 - 16 < 16 ? n - j0 - 16 : 16) * D * int64_t(sizeof(uint16_t));
    for (int64_t byte = 0; byte < ahead; byte += 64) _mm_prefetch(next + byte, _MM_HINT_T0);
    for (int64_t b = 0; b < B; ++b) {
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      const uint16_t* qb = q + b * Dq;
      for (int64_t d = 0; d < full; d += 32) {
        const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qb + d));
        // one pointer stepping down the rows: 16 row pointers would not fit the registers
        const uint16_t* kp = kt + d;
        for (int t = 0; t < 16; ++t, kp += D)
          acc[t] = _mm512_dpbf16_ps(acc[t], reinterpret_cast<__m512bh>(_mm512_loadu_si512(kp)), qv);
      }
      if (tail) {  // masked 16-bit loads are slow on Zen 4: only for the last partial chunk
        const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qb + full));
        for (int t = 0; t < 16; ++t)
          acc[t] = _mm512_dpbf16_ps(acc[t], reinterpret_cast<__m512bh>(
                                                _mm512_maskz_loadu_epi16(tail, kt + t * D + full)),
                                    qv);
      }
      _mm512_mask_storeu_ps(dots + b * ld + j0, live, reduce16(acc));
    }
  }
}

// pack_bf16_row: (x - minus) rounded to nearest even, 32 at a time.
KNNFAST_AVX512_BF16 void pack_bf16_row_avx512(const float* x, const float* minus, int64_t D,
                                              int64_t Dq, uint16_t* out) {
  for (int64_t d = 0; d < Dq; d += 32) {
    const __mmask16 m0 = tail_mask(D - d), m1 = D - d > 16 ? tail_mask(D - d - 16) : 0;
    __m512 x0 = _mm512_maskz_loadu_ps(m0, x + d), x1 = _mm512_maskz_loadu_ps(m1, x + d + 16);
    if (minus) {
      x0 = _mm512_sub_ps(x0, _mm512_maskz_loadu_ps(m0, minus + d));
      x1 = _mm512_sub_ps(x1, _mm512_maskz_loadu_ps(m1, minus + d + 16));
    }
    _mm512_storeu_si512(out + d, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0)));
  }
}

void dot_tile16_bf16_generic(const uint16_t* q, int64_t B, int64_t Dq, const uint16_t* k,
                             int64_t n, int64_t D, float* dots, int64_t ld) {
  const auto widen = [](uint16_t x) {
    const uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.0f;
      for (int64_t d = 0; d < D; ++d) sum += widen(q[b * Dq + d]) * widen(k[j * D + d]);
      dots[b * ld + j] = sum;
    }
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

}  // namespace

void dot_tile16(const float* queries, int64_t B, const void* keys, c10::ScalarType key_type,
                int64_t n_keys, int64_t D, float* dots, int64_t ld, float* key_sq,
                float* block) {
  if (!use_avx512())  // dot_tile's portable loop
    return dot_tile(queries, B, keys, key_type, n_keys, D, dots, ld, key_sq);
  visit_key_type(key_type, keys, [&](auto* k) {
    dot_tile16_avx512(queries, B, k, n_keys, D, dots, ld, key_sq, block);
  });
}

void dot_tile16_bf16(const uint16_t* queries, int64_t B, int64_t Dq, const uint16_t* keys,
                     int64_t n_keys, int64_t D, float* dots, int64_t ld, uint16_t* spare) {
  if (bf16_dot_available() && use_avx512())
    return dot_tile16_bf16_avx512(queries, B, Dq, keys, n_keys, D, dots, ld, spare);
  dot_tile16_bf16_generic(queries, B, Dq, keys, n_keys, D, dots, ld);
}

void pack_bf16_row(const float* x, const float* minus, int64_t D, int64_t Dq, uint16_t* out) {
  if (bf16_dot_available() && use_avx512()) return pack_bf16_row_avx512(x, minus, D, Dq, out);
  for (int64_t d = 0; d < D; ++d) out[d] = c10::BFloat16(minus ? x[d] - minus[d] : x[d]).x;
  std::fill(out + D, out + Dq, uint16_t(0));
}

int64_t bf16_query_stride(int64_t D) { return (D + 31) / 32 * 32; }

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

ListQueries invert_probes(const at::Tensor& probes, int64_t L) {
  const int64_t B = probes.size(0), P = probes.size(1);
  const int64_t* p = probes.data_ptr<int64_t>();
  std::vector<int64_t> unique(B * P, -1);  // each row's distinct lists, -1 padded
  ListQueries out;
  out.start.assign(L + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t* u = unique.data() + b * P;
    std::copy(p + b * P, p + (b + 1) * P, u);
    std::sort(u, u + P);
    int64_t previous = -1;
    for (int64_t j = 0; j < P; ++j) {
      const int64_t list = u[j];
      if (list >= 0 && list != previous) ++out.start[list + 1];
      else u[j] = -1;  // -1 or a repeat: searched once
      previous = list;
    }
  }
  for (int64_t l = 0; l < L; ++l) out.start[l + 1] += out.start[l];
  out.rows.resize(out.start[L]);
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  for (int64_t b = 0; b < B; ++b)  // increasing b: each list's rows come out sorted
    for (int64_t j = 0; j < P; ++j)
      if (unique[b * P + j] >= 0) out.rows[fill[unique[b * P + j]]++] = b;
  return out;
}

std::vector<int64_t> split_lists(const ListQueries& lq, const int64_t* offsets, int64_t L,
                                 int64_t D) {
  std::vector<double> work(L + 1, 0.0);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t m = lq.start[l + 1] - lq.start[l];
    work[l + 1] = work[l] + (m ? double(offsets[l + 1] - offsets[l]) * double(m + 1) : 0.0);
  }
  // small searches stay on one thread: an OpenMP wake-up costs more than they do
  const int64_t parts = work[L] * double(D) < double(int64_t(1) << 20)
                            ? 1
                            : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), L));
  std::vector<int64_t> cut(parts + 1, L);
  cut[0] = 0;
  for (int64_t p = 1; p < parts; ++p)
    cut[p] = std::lower_bound(work.begin(), work.end(), work[L] * double(p) / double(parts)) -
             work.begin();
  for (int64_t p = 1; p <= parts; ++p) cut[p] = std::max(cut[p], cut[p - 1]);
  return cut;
}

}  // namespace knnfast::cpu
