// The ValueError texts of the value rules in common/knn_math.h (valid_id, valid_target, ...),
// in one place: the CPU wrappers raise them from their host-side loops, the CUDA wrappers
// from the status buffer the kernels fill (cuda/cuda_utils.h raise_on_status), so both
// backends word a bad value the same way. Torch side only (never included by a .cu file).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace knnfast {

// id outside [-1, bound) (bound < 0: no upper bound) at flat position `pos` of tensor `name`.
[[noreturn]] inline void raise_bad_id(const char* op, const char* name, int64_t bound,
                                      int64_t value, int64_t pos) {
  TORCH_CHECK_VALUE(false, op, ": ", name, " must hold ids in [-1, ",
                    bound < 0 ? std::string("inf") : std::to_string(bound), "), got ", value,
                    " at flat position ", pos);
}

// exclude id outside [-1, entries) at row `row` (exclude is [B]: one id per query).
[[noreturn]] inline void raise_bad_exclude(const char* op, int64_t entries, int64_t value,
                                           int64_t row) {
  TORCH_CHECK_VALUE(false, op, ": exclude must hold ids in [-1, ", entries, "), got ", value,
                    " at row ", row);
}

[[noreturn]] inline void raise_bad_target(const char* op, int64_t vocab, int64_t ignore_index,
                                          int64_t value, int64_t row) {
  TORCH_CHECK_VALUE(false, op, ": targets must be in [0, ", vocab, ") or ignore_index (",
                    ignore_index, "), got ", value, " at row ", row);
}

// NaN or +inf among neighbour scores or weights (`name`).
[[noreturn]] inline void raise_bad_score(const char* op, const char* name, float value,
                                         int64_t pos) {
  TORCH_CHECK_VALUE(false, op, ": ", name, " must be finite or -inf, got ", value,
                    " at flat position ", pos);
}

// A negative (or -inf) given neighbour weight.
[[noreturn]] inline void raise_bad_weight(const char* op, const char* name, float value,
                                          int64_t pos) {
  TORCH_CHECK_VALUE(false, op, ": ", name, " must be finite and >= 0, got ", value,
                    " at flat position ", pos);
}

// The two per-row parameters and their ranges (valid_temperature, valid_lam).
enum class ParamRange { Positive, UnitInterval };

// `row`: the position in the parameter tensor (0 when one value serves all rows).
[[noreturn]] inline void raise_bad_row_param(const char* op, const char* name, ParamRange range,
                                             float value, int64_t row) {
  if (range == ParamRange::Positive)
    TORCH_CHECK_VALUE(false, op, ": ", name, " must be > 0 and finite, got ", value, " (row ",
                      row, ")");
  TORCH_CHECK_VALUE(false, op, ": ", name, " must be in [0, 1], got ", value, " (row ", row, ")");
}

[[noreturn]] inline void raise_bad_logits_row(const char* op, int64_t row) {
  TORCH_CHECK_VALUE(false, op, ": logits row ", row,
                    " contains NaN or +inf (log_softmax is undefined)");
}

// list_offsets not a partition of the N key rows: offsets[0] = 0, non-decreasing,
// offsets[L] = N; `pos` is the first position that breaks it.
[[noreturn]] inline void raise_bad_offsets(const char* op, int64_t entries, int64_t value,
                                           int64_t pos) {
  TORCH_CHECK_VALUE(false, op, ": list_offsets must start at 0, never decrease and end at N = ",
                    entries, " (the keys' rows), got ", value, " at position ", pos);
}

[[noreturn]] inline void raise_bad_queries(const char* op) {
  TORCH_CHECK_VALUE(false, op, ": queries contain NaN or inf");
}

}  // namespace knnfast
