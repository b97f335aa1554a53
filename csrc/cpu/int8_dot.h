// int8 dot products for knn_search_lists' plan "int8" (knn_search_lists_int8.cpp): codes
// multiplied exactly in int32 (vpdpbusd on AVX512-VNNI, a plain loop elsewhere; the same
// integers either way), the float scales applied afterwards by the caller.
#pragma once

#include <cstdint>

namespace knnfast::cpu {

// The CPU runs vpdpbusd (AVX512-VNNI) and this binary was built with it.
bool int8_dot_available();

// Query code rows are D rounded up to 64 bytes (zero padded).
int64_t int8_query_stride(int64_t D);

// The largest D whose worst-case sum, 255 * 127 * D (query codes offset by 128 times key
// codes), still fits an int32.
constexpr int64_t kInt8MaxDim = 65536;

// One query row quantized: out[d] = code_d + 128 for d < D, where code_d in [-127, 127] rounds
// y_d / scale, y = x - minus in fp32 (or x, minus == nullptr), scale = max |y_d| / 127 (0 when
// y = 0); out is zero from D to Dq. norm >= |y| and err >= |y - scale * code| (fp32 sums,
// rounded up past their error): the bounds of the plan's error model.
struct QueryCode {
  float scale, norm, err;
};
QueryCode quantize_row_int8(const float* x, const float* minus, int64_t D, int64_t Dq,
                            uint8_t* out);

// acc[b * ld + j] = sum_d q[b][d] * k[j][d] over d < D, exactly in int32: q uint8 [B, Dq]
// (quantize_row_int8's rows), k int8 [n_keys, D]. spare: scratch of 16 * D bytes.
void dot_tile16_int8(const uint8_t* q, int64_t B, int64_t Dq, const int8_t* k, int64_t n_keys,
                     int64_t D, int32_t* acc, int64_t ld, int8_t* spare);

}  // namespace knnfast::cpu
