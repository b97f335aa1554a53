// The scan primitives of knn_search_lists (csrc/cpu/knn_search_lists_cpu.cpp): a few queries
// against 16-key tiles, and the filter of each query's scores against its heap. Each has an
// AVX-512 body and a portable one, chosen at run time like vec_math's.
#pragma once

#include <c10/core/ScalarType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "common/knn_math.h"

namespace knnfast::cpu {

// dot_tile's contract for a few queries per key tile (2 <= B <= ~16, e.g. the queries that
// probe one inverted list): keys are converted 16 at a time into `block` (fp32, see
// dot_tile16_block_floats(D)) and each query's 16 dots are summed by one transpose tree instead
// of 16 horizontal reductions. The same sums in another order than dot_tile (not bitwise equal).
void dot_tile16(const float* queries, int64_t B, const void* keys, c10::ScalarType key_type,
                int64_t n_keys, int64_t D, float* dots, int64_t ld, float* key_sq,
                float* block);
int64_t dot_tile16_block_floats(int64_t D);

// dots[b * ld + j] = sum_d q[b][d] k[j][d] in fp32 for bf16 queries [B, Dq] (Dq =
// bf16_query_stride(D): rows zero padded) and bf16 keys [n_keys, D] (raw bits): knn_search_lists'
// bf16 plan. Products of bf16 numbers are exact in fp32; the sums run in an order of the
// body's choosing (vdpbf16ps pairs and a transpose tree on AVX512-BF16, a plain loop
// elsewhere), which bf16_bounds.h's error model allows. spare: scratch of 16 * D.
void dot_tile16_bf16(const uint16_t* queries, int64_t B, int64_t Dq, const uint16_t* keys,
                     int64_t n_keys, int64_t D, float* dots, int64_t ld, uint16_t* spare);
int64_t bf16_query_stride(int64_t D);
// out [Dq] <- x - minus (or x, minus == nullptr) over D, rounded to bf16 (nearest even; the
// AVX512-BF16 body flushes subnormals, as vdpbf16ps would), zero padded to Dq.
void pack_bf16_row(const float* x, const float* minus, int64_t D, int64_t Dq, uint16_t* out);

// In place, dots[j] <- ranking_key(metric, dots[j], key_sq[j]) for j < n (key_sq unread for
// ip), bitwise as the scalar ranking_key; then writes to `above` the positions j, increasing,
// whose key is > threshold (NaN never is) and returns how many. A search loop visits only those
// instead of testing n keys one by one against its heap's root.
int64_t rank_above(Metric metric, float* dots, const float* key_sq, int64_t n, float threshold,
                   int32_t* above);

// list -> the query rows that probe it (CSR over probes [B, P] int64; a row probing a list
// twice is listed once; each list's rows increase).
struct ListQueries {
  std::vector<int64_t> start;  // [L + 1]
  std::vector<int64_t> rows;
};
ListQueries invert_probes(const at::Tensor& probes, int64_t L);

// Runs of lists [cut[p], cut[p + 1]) with about equal work (queries x keys + keys) each, one
// per thread (one run for searches too small to pay for waking the threads).
std::vector<int64_t> split_lists(const ListQueries& lq, const int64_t* offsets, int64_t L,
                                 int64_t D);

}  // namespace knnfast::cpu
