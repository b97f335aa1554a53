#include "cpu/bound_topk.h"

#include <algorithm>
#include <functional>

#include "cpu/bf16_bounds.h"
#include "cpu/simd_load.h"
#include "cpu/topk_merge.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

// A threshold that grows inside a vector is picked up at the next one: a stale (lower)
// threshold only admits more.
template <Metric M>
KNNFAST_AVX512 void push_avx512(BoundRow& row, int64_t k, const RankTerms& r, const float* dots,
                                const KeyTerms& f, int64_t n, int64_t first, int64_t skip) {
  const __m512 a = _mm512_set1_ps(r.a), c_t = _mm512_set1_ps(r.c_t);
  const __m512 c0 = _mm512_set1_ps(r.c0), add = _mm512_set1_ps(r.add);
  const __m512 b = _mm512_set1_ps(r.b);
  alignas(64) float rank_buf[16], err_buf[16];
  for (int64_t j = 0; j < n && !row.overflow; j += 16) {
    const __mmask16 live = tail_mask(n - j);
    const __m512 dot = _mm512_maskz_loadu_ps(live, dots + j);
    const __m512 t = _mm512_maskz_loadu_ps(live, f.t + j);
    __m512 rank;
    if constexpr (M == Metric::L2) rank = _mm512_add_ps(_mm512_sub_ps(_mm512_add_ps(dot, dot), t), add);
    else if constexpr (M == Metric::IP) rank = _mm512_add_ps(dot, add);
    else rank = _mm512_mul_ps(_mm512_add_ps(dot, add), _mm512_maskz_loadu_ps(live, f.inv + j));
    __m512 err = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(live, f.s + j),
                                 _mm512_fmadd_ps(c_t, t, c0));
    if (f.u) err = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(live, f.u + j), err);
    // ordered >= : NaN ranks (NaN keys) never pass
    __mmask16 pass = _mm512_mask_cmp_ps_mask(live, _mm512_add_ps(rank, err),
                                             _mm512_set1_ps(row.threshold), _CMP_GE_OQ);
    if (!pass) continue;
    _mm512_store_ps(rank_buf, rank);
    _mm512_store_ps(err_buf, err);
    while (pass && !row.overflow) {
      const int lane = __builtin_ctz(pass);
      pass &= pass - 1;
      const int64_t id = first + j + lane;
      if (id != skip && rank_buf[lane] + err_buf[lane] >= row.threshold)
        bound_insert(row, k, rank_buf[lane], err_buf[lane], id);
    }
  }
}

void push_generic(Metric metric, BoundRow& row, int64_t k, const RankTerms& r,
                  const float* dots, const KeyTerms& f, int64_t n, int64_t first,
                  int64_t skip) {
  for (int64_t j = 0; j < n && !row.overflow; ++j) {
    const float rank = bound_rank(metric, dots[j], r, f, j);
    const float err = bound_error(r, f, j);
    if (first + j != skip && rank + err >= row.threshold)  // NaN never passes
      bound_insert(row, k, rank, err, first + j);
  }
}

}  // namespace

void bound_push_tile(Metric metric, BoundRow& row, int64_t k, const RankTerms& r,
                     const float* dots, const KeyTerms& f, int64_t n, int64_t first,
                     int64_t skip) {
  if (!use_avx512()) return push_generic(metric, row, k, r, dots, f, n, first, skip);
  switch (metric) {
    case Metric::L2: return push_avx512<Metric::L2>(row, k, r, dots, f, n, first, skip);
    case Metric::IP: return push_avx512<Metric::IP>(row, k, r, dots, f, n, first, skip);
    default: return push_avx512<Metric::COS>(row, k, r, dots, f, n, first, skip);
  }
}

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
