#include "cpu/bound_topk.h"

#include <algorithm>
#include <functional>

#include "cpu/bf16_bounds.h"
#include "cpu/topk_merge.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {

BoundRow::BoundRow(int64_t k) : prune_at(std::max<size_t>(4 * size_t(k), 256)) {
  lower.reserve(2 * k);
}

// Selecting down to k whenever 2k accumulate costs amortized O(1) per key, unlike a heap's
// log k.
void bound_select_lower(BoundRow& row, int64_t k) {
  std::nth_element(row.lower.begin(), row.lower.begin() + (k - 1), row.lower.end(),
                   std::greater<float>());
  row.lower.resize(k);
  row.threshold = row.lower[k - 1];
}

void bound_prune(BoundRow& row) {
  const float threshold = row.threshold;
  size_t w = 0;
  for (size_t i = 0; i < row.upper.size(); ++i) {
    if (row.upper[i] >= threshold) {
      row.upper[w] = row.upper[i];
      row.index[w++] = row.index[i];
    }
  }
  row.upper.resize(w);
  row.index.resize(w);
  // prune again when the list doubles, but no later than one past the cap (overflow check)
  row.prune_at =
      std::min<size_t>(std::max<size_t>(2 * w, row.prune_at), kMaxBoundCandidates + 1);
}

int64_t finish_bound_row(const BoundRow* const* parts, int64_t n_parts, int64_t k,
                         const float* q, const ExactKeys& keys, float* out_s, int64_t* out_i) {
  std::vector<float> lowers;
  for (int64_t p = 0; p < n_parts; ++p) {
    if (parts[p]->overflow) return -1;
    lowers.insert(lowers.end(), parts[p]->lower.begin(), parts[p]->lower.end());
  }
  // k-th best lower bound over all parts (-inf while fewer than k keys were seen)
  float threshold = -INFINITY;
  if (lowers.size() >= size_t(k)) {
    std::nth_element(lowers.begin(), lowers.begin() + (k - 1), lowers.end(),
                     std::greater<float>());
    threshold = lowers[k - 1];
  }
  std::vector<float> s;
  std::vector<int64_t> idx;
  TopkMerger merger(k);
  int64_t rescored = 0;
  const float qq = norm2(q, keys.D);
  const char* base = static_cast<const char*>(keys.data);
  const int64_t row_bytes = keys.D * int64_t(c10::elementSize(keys.type));
  for (int64_t p = 0; p < n_parts; ++p) {
    const BoundRow& r = *parts[p];
    s.clear();
    idx.clear();
    for (size_t i = 0; i < r.upper.size(); ++i) {
      if (!(r.upper[i] >= threshold)) continue;
      const PairSums ps = pair_sums(q, base + r.index[i] * row_bytes, keys.type, keys.D);
      const float score = exact_score(keys.metric, ps.diff_sq, ps.dot, qq, ps.key_sq);
      if (score == -INFINITY || score != score) continue;
      s.push_back(score);
      idx.push_back(r.index[i]);
    }
    merger.add(s.data(), idx.data(), int64_t(s.size()));
    rescored += int64_t(s.size());
  }
  merger.write(out_s, out_i);
  return rescored;
}

}  // namespace knnfast::cpu
