// Top-k of one row over several candidate sets (knn_search's per-thread heaps, the bf16
// path's per-part survivors): each set's best k are sorted by better() and merged into the
// running list with merge_sorted_topk (common/knn_math.h), the merge the CPU and CUDA
// searches share. better() is a total order, so the result is the top k of the union
// whatever the order of the sets.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common/knn_math.h"

namespace knnfast::cpu {

class TopkMerger {
 public:
  explicit TopkMerger(int64_t k) : k_(k) {}

  void clear() { n_ = 0; }

  // Adds n candidates (score s[j], index i[j]) in any order; padding (-inf, -1) sorts last.
  void add(const float* s, const int64_t* i, int64_t n) {
    order_.resize(n);
    std::iota(order_.begin(), order_.end(), int64_t(0));
    const int64_t top = std::min(k_, n);
    std::partial_sort(order_.begin(), order_.begin() + top, order_.end(),
                      [&](int64_t a, int64_t b) { return better(s[a], i[a], s[b], i[b]); });
    set_s_.resize(top);
    set_i_.resize(top);
    for (int64_t j = 0; j < top; ++j) {
      set_s_[j] = s[order_[j]];
      set_i_[j] = i[order_[j]];
    }
    const int64_t merged = std::min(k_, n_ + top);
    out_s_.resize(merged);
    out_i_.resize(merged);
    merge_sorted_topk(s_.data(), i_.data(), n_, set_s_.data(), set_i_.data(), top, merged,
                      out_s_.data(), out_i_.data());
    s_.swap(out_s_);
    i_.swap(out_i_);
    n_ = merged;
  }

  // The k best so far, sorted by better(), padded with (-inf, -1).
  void write(float* out_s, int64_t* out_i) const {
    for (int64_t j = 0; j < k_; ++j) {
      out_s[j] = j < n_ ? s_[j] : -INFINITY;
      out_i[j] = j < n_ ? i_[j] : -1;
    }
  }

 private:
  int64_t k_, n_ = 0;
  std::vector<float> s_, set_s_, out_s_;
  std::vector<int64_t> i_, set_i_, out_i_, order_;
};

}  // namespace knnfast::cpu
