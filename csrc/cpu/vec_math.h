// Vectorized row primitives of the CPU backend. Each has an AVX-512 body (compiled with a
// target attribute, chosen at run time) and a portable body, so one binary runs anywhere and
// KNNFAST_SIMD=generic forces the portable path (tests compare both).
#pragma once

#include <c10/core/ScalarType.h>
#include <cstdint>
#include <string>

namespace knnfast::cpu {

// log(sum(exp(x))) = max + log_sum over n floats, in one read of x (blocks of it are
// revisited from L1). Kept as two parts so callers can form (x - max) - log_sum, which stays
// accurate when |x| is large (x - lse would round at the magnitude of x).
// `bad` is set when x holds a NaN or +inf (the log-softmax would be NaN); max is -inf when
// every element is -inf.
struct RowLogSumExp {
  float max;
  float log_sum;
  bool bad;
};
RowLogSumExp row_logsumexp(const float* x, int64_t n);

// out[i] = (x[i] - shift) + add
void row_shift(const float* x, float shift, float add, float* out, int64_t n);

// out[i] = scale * exp((x[i] - max) - log_sum) + add: a scaled softmax plus a constant, the
// dense part of a cross-entropy gradient (max, log_sum from row_logsumexp of the same x).
void row_softmax_affine(const float* x, float max, float log_sum, float scale, float add,
                        float* out, int64_t n);

// -sum p log p of p = softmax(x) over n floats, given row_logsumexp(x) = (max, log_sum) of a
// row whose max is finite: log_sum - sum p_i (x_i - max), -inf entries (p = 0) adding 0.
float row_entropy(const float* x, int64_t n, float max, float log_sum);

// The `top` (<= n) largest of n floats (no NaN), descending, into out[top]. Each block of 16 is
// compared with the current top-th value at once; only the rare larger ones are inserted.
void row_top_values(const float* x, int64_t n, int64_t top, float* out);

// sum of x[i] (fp32 accumulation in 16 lanes).
float row_sum(const float* x, int64_t n);

// Small-batch distance tile, one pass over the keys (memory bound for B <= ~32):
//   dots[b * ld + j] = sum_d queries[b, d] * keys[j, d]   for b < B, j < n_keys
//   key_sq[j] = |keys[j]|^2                              (when key_sq != nullptr)
// queries: float32 [B, D]; keys: [n_keys, D] of key_type (float32, float16 or bfloat16).
void dot_tile(const float* queries, int64_t B, const void* keys, c10::ScalarType key_type,
              int64_t n_keys, int64_t D, float* dots, int64_t ld, float* key_sq);

// key_sq[j] = |keys[j]|^2 in fp32 for j < n_keys.
void key_sq_norms(const void* keys, c10::ScalarType key_type, int64_t n_keys, int64_t D,
                  float* key_sq);

// Exact sums of one (query, key) pair for rescoring: sum (q-k)^2, q.k, |k|^2.
struct PairSums {
  float diff_sq, dot, key_sq;
};
PairSums pair_sums(const float* query, const void* key, c10::ScalarType key_type, int64_t D);

// "avx512" or "generic": the body the dispatch above uses in this process.
const char* simd_level();
// The CPU has AVX512-BF16 dot products (used through oneDNN's bf16 GEMM).
bool cpu_has_avx512_bf16();
// The CPU (and OS) offer AMX-BF16 tiles, which oneDNN's bf16 matmul uses (plan bf16_gemm).
bool cpu_has_amx_bf16();
// The CPU's x86 extensions that matter to the kernels, as "name,name,...": avx512f,
// avx512_bf16, avx512_vnni, avx512_fp16, amx_tile, amx_bf16, amx_fp16 (those present; torch's
// cpuinfo).
std::string cpu_isa_flags();

}  // namespace knnfast::cpu
