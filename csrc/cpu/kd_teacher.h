// The sparse kNN-KD teacher terms of one row, shared by knn_kd_loss and knn_kd_linear_loss
// (CPU). log_w: the row's k slot log-weights from neighbour_log_weights (-inf: invalid).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace knnfast::cpu {

// sum_v P_v log P_v over the teacher's distinct tokens (duplicate slots merged by sorting):
// KL(p_T || p) = H(p_T, p) + this.
inline float teacher_neg_entropy(const int64_t* tokens, const float* log_w, int64_t k,
                                 std::vector<std::pair<int64_t, float>>& pairs) {
  pairs.clear();
  for (int64_t j = 0; j < k; ++j)
    if (tokens[j] >= 0 && log_w[j] > -INFINITY) pairs.emplace_back(tokens[j], std::exp(log_w[j]));
  std::sort(pairs.begin(), pairs.end());
  float acc = 0.0f;
  for (size_t i = 0; i < pairs.size();) {
    float mass = 0.0f;
    const int64_t tok = pairs[i].first;
    for (; i < pairs.size() && pairs[i].first == tok; ++i) mass += pairs[i].second;
    if (mass > 0.0f) acc += mass * std::log(mass);
  }
  return acc;
}

// sum of the valid slots' weights: the teacher mass M that d KD / d logits = M softmax - P
// scales the softmax by. 1 for scores; teacher_probs are used as given, so mass on padded
// (-1) slots or an unnormalised row makes it differ from 1. 0 without a teacher (`has`).
inline float valid_mass(const int64_t* tokens, const float* log_w, int64_t k, bool has) {
  if (!has) return 0.0f;
  float mass = 0.0f;
  for (int64_t j = 0; j < k; ++j)
    if (tokens[j] >= 0 && log_w[j] > -INFINITY) mass += std::exp(log_w[j]);
  return mass;
}

}  // namespace knnfast::cpu
