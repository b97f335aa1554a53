// Plain C++ types shared by the CUDA kernels (.cu, nvcc) and their torch-facing wrappers
// (_cuda.cpp, g++): element types, the per-call status buffer, and the neighbour inputs of
// the row ops. Nothing here includes torch or CUDA headers.
#pragma once

#include <stdint.h>

namespace knnfast::cuda {

// Element type of a float tensor handed to a kernel (logits may also be float64).
enum class FloatType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// Value checks run inside the kernels (DESIGN §2: "on CUDA check in the kernel and raise
// after it via a flag"). Each code owns one slot of a uint64 status buffer that starts at
// kStatusClear; a kernel that meets a bad value atomicMin's the flat position into the slot,
// so the wrapper can report the first bad position deterministically. Kernels never read
// out of bounds because of a bad value: they treat it as an invalid slot and go on.
enum StatusCode : int {
  kBadToken = 0,        // token / index id outside [-1, bound)
  kBadScore,            // NaN or +inf in neighbour scores
  kBadWeightNonFinite,  // NaN or +inf neighbour weight
  kBadWeight,           // negative (or -inf) neighbour weight
  kBadTemperature,      // temperature <= 0, NaN or inf (position = row)
  kBadLam,              // lam outside [0, 1] (position = row)
  kBadLogitsRow,        // NaN or +inf in a logits row (position = row)
  kBadTarget,           // target outside [0, V) and != ignore_index (position = row)
  kBadQuery,            // NaN or inf in a query row (position = row)
  kBadExclude,          // exclude id outside [-1, N) (position = row)
  kNumStatusCodes
};
constexpr uint64_t kStatusClear = ~uint64_t(0);

// Per-row scalar: data[row * stride], stride 0 when one value serves all rows.
struct RowScalarArg {
  const float* data;
  int64_t stride;
};

// Neighbour inputs of one call, [B, k] each. Exactly one of scores / weights is non-null.
struct NeighbourArgs {
  const int64_t* tokens;
  const float* scores;
  const float* weights;
  int64_t k;
  int64_t vocab;  // tokens must be < vocab; -1: no upper bound
  RowScalarArg temperature;
};

}  // namespace knnfast::cuda
