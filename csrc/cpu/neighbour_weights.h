// Log-weights of the k neighbours of one row: log softmax(scores / tau) over the valid slots,
// or log(weights) when the caller supplies the weights (adaptive methods). Shared by
// knn_probs, knn_probs_sparse, knn_interpolate and knn_gold_logprob.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/knn_math.h"

namespace knnfast::cpu {

// Source of neighbour weights for a batch: exactly one of scores / weights is non-null.
struct NeighbourSource {
  const float* scores = nullptr;   // [B, k]
  const float* weights = nullptr;  // [B, k]
  int64_t k = 0;
};

// Fills log_w[j] (-inf for invalid slots) and returns whether any slot is valid (has a token
// and positive weight). A slot is valid when token >= 0 and its score is > -inf (scores) or
// its weight is > 0 (weights).
inline bool neighbour_log_weights(const NeighbourSource& src, int64_t row, const int64_t* tokens,
                                  float temperature, float* log_w) {
  const int64_t k = src.k;
  if (src.scores) {
    const float* s = src.scores + row * k;
    SoftmaxState state = softmax_state_empty();
    for (int64_t j = 0; j < k; ++j) {
      log_w[j] = tokens[j] >= 0 ? s[j] / temperature : -INFINITY;
      state = softmax_state_add(state, log_w[j]);
    }
    if (state.max == -INFINITY) return false;
    // (x - max) - log(sum) rather than x - lse: exact for large |scores / tau|
    const float log_sum = std::log(state.sum);
    for (int64_t j = 0; j < k; ++j) log_w[j] = (log_w[j] - state.max) - log_sum;  // -inf stays
    return true;
  }
  const float* w = src.weights + row * k;
  bool any = false;
  for (int64_t j = 0; j < k; ++j) {
    const bool valid = tokens[j] >= 0 && w[j] > 0.0f;
    log_w[j] = valid ? std::log(w[j]) : -INFINITY;
    any |= valid;
  }
  return any;
}

}  // namespace knnfast::cpu
