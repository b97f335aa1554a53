// bf16 dot-product tiles for knn_search's large-batch path (AVX512-BF16, fp32 accumulation and
// fp32 output; at::mm on bf16 would round every score to 8 bits). Inputs are centered by a
// vector c before rounding, so the rounding error scales with |x - c| rather than |x|.
#pragma once

#include <c10/core/ScalarType.h>
#include <cstdint>

namespace knnfast::cpu {

// The CPU runs vdpbf16ps (and this binary was built with it).
bool bf16_dot_available();

// Query block width of the kernel: queries are packed in blocks of this many.
constexpr int64_t kBf16QueryBlock = 32;
// Keys per register block; tiles are best a multiple of it.
constexpr int64_t kBf16KeyBlock = 12;

// Packs queries [B, D] (minus `center`, or as they are when center == nullptr) as bf16 pairs,
// pair-major: packed[p * B_padded + b] = (q[b][2p], q[b][2p+1]), zero beyond B and D.
// B_padded = B rounded up to kBf16QueryBlock; packed holds ceil(D/2) * B_padded entries.
void pack_queries_bf16(const float* queries, int64_t B, int64_t D, const float* center,
                       uint32_t* packed, int64_t B_padded);

// Centers a tile of keys [n, D] (any float type) and rounds it to bf16 rows of 2*ceil(D/2)
// (zero padded). Also writes, in fp32 from the unrounded values: centered_sq[j] = |k_j - c|^2
// and, when full_sq != nullptr, full_sq[j] = |k_j|^2.
void pack_keys_bf16(const void* keys, c10::ScalarType key_type, int64_t n, int64_t D,
                    const float* center, uint16_t* packed, float* centered_sq, float* full_sq);

// dots[b * ld + j] = sum_p <queries pair p of b, keys pair p of j> in fp32, for b < B, j < n.
void dot_tile_bf16(const uint32_t* packed_queries, int64_t B, int64_t B_padded,
                   const uint16_t* packed_keys, int64_t n, int64_t D, float* dots, int64_t ld);

}  // namespace knnfast::cpu
