// The scan primitives of knn_search_lists (csrc/cpu/knn_search_lists_cpu.cpp): a few queries
// against 16-key tiles, and the filter of each query's scores against its heap. Each has an
// AVX-512 body and a portable one, chosen at run time like vec_math's.
#pragma once

#include <c10/core/ScalarType.h>
#include <cstdint>

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

// In place, dots[j] <- ranking_key(metric, dots[j], key_sq[j]) for j < n (key_sq unread for
// ip), bitwise as the scalar ranking_key; then writes to `above` the positions j, increasing,
// whose key is > threshold (NaN never is) and returns how many. A search loop visits only those
// instead of testing n keys one by one against its heap's root.
int64_t rank_above(Metric metric, float* dots, const float* key_sq, int64_t n, float threshold,
                   int32_t* above);

}  // namespace knnfast::cpu
