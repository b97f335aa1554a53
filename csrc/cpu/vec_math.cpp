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

}  // namespace

// ---------------------------------------------------------------- dispatch

bool use_avx512() {
  static const bool value = [] {
    const char* force = std::getenv("KNNFAST_SIMD");
    if (force && std::strcmp(force, "generic") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  }();
  return value;
}

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
  const char* names[][2] = {{"avx512f", "avx512_f"},         {"avx512_bf16", "avx512_bf16"},
                            {"avx512_vnni", "avx512_vnni"}, {"avx512_fp16", "avx512_fp16"},
                            {"amx_tile", "amx_tile"},       {"amx_bf16", "amx_bf16"},
                            {"amx_fp16", "amx_fp16"}};
  for (const auto& name : names)
    if (torch_cpu_capability(caps, name[1])) out += std::string(out.empty() ? "" : ",") + name[0];
  return out;
}

}  // namespace knnfast::cpu
