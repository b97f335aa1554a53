// Exact top-k from approximate ranks that carry rigorous error bounds (|r - r_exact| <= E):
// the candidate bookkeeping shared by knn_search's bf16 plans (knn_search_bf16.cpp) and
// knn_search_lists' bf16 plan (knn_search_lists_bf16.cpp). Per query row and scan part:
//   - the k best lower bounds r - E (selected down to k whenever 2k accumulate); their k-th,
//     the threshold T, is a floor under the exact k-th rank (k keys reach it) and only grows;
//   - every key whose upper bound r + E reached T when it was scanned.
// A key of the true top k ranks >= the exact k-th >= every T, so it is never dropped; the
// survivors are rescored exactly from the stored keys (finish_bound_row).
#pragma once

#include <c10/core/ScalarType.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/knn_math.h"

namespace knnfast::cpu {

// Candidates per row and part; a row beyond it is reported unfinished (searched exactly).
constexpr size_t kMaxBoundCandidates = size_t(1) << 16;

struct BoundRow {
  std::vector<float> lower;  // lower bounds above the threshold (at most 2k)
  float threshold = -INFINITY;
  std::vector<float> upper;  // candidates: upper bound and key row
  std::vector<int64_t> index;
  size_t prune_at = 0;
  bool overflow = false;
  explicit BoundRow(int64_t k = 1);
};

// Keeps the k best lower bounds and raises the threshold to their k-th.
void bound_select_lower(BoundRow& row, int64_t k);
// Drops the candidates whose upper bound fell below the threshold.
void bound_prune(BoundRow& row);

// Adds key `id` with approximate rank `rank` and error bound `err` (its upper bound has
// passed the threshold test).
inline void bound_insert(BoundRow& row, int64_t k, float rank, float err, int64_t id) {
  const float lower = rank - err;
  if (lower > row.threshold) {
    row.lower.push_back(lower);
    if (row.lower.size() >= size_t(2 * k)) bound_select_lower(row, k);
  }
  row.upper.push_back(rank + err);
  row.index.push_back(id);
  if (row.upper.size() >= row.prune_at) {
    bound_prune(row);
    row.overflow = row.upper.size() > kMaxBoundCandidates;
  }
}

// Approximate ranks and their bounds, for one query row against one tile of keys:
//   rank(j) = l2: 2 dot_j - t_j + add;  ip: dot_j + add;  cos: (dot_j + add) inv_j
//   E(j)    = a s_j + c_t t_j + c0 (+ b u_j where u is given)
// (a, c_t, c0 from bf16_bounds.h's row_bound; add = q.c for ip/cos, 0 or -|q - c|^2 for l2;
// b, u: the int8 plan's per-key quantization error, knn_search_lists_int8.cpp.)
struct RankTerms {
  float a, c_t, c0, add;
  float b = 0.0f;
};
struct KeyTerms {
  const float* s;
  const float* t;
  const float* inv;  // cos only
  const float* u = nullptr;
};

inline float bound_rank(Metric metric, float dot, const RankTerms& r, const KeyTerms& f,
                        int64_t j) {
  if (metric == Metric::L2) return (dot + dot) - f.t[j] + r.add;
  if (metric == Metric::IP) return dot + r.add;
  return (dot + r.add) * f.inv[j];
}
inline float bound_error(const RankTerms& r, const KeyTerms& f, int64_t j) {
  const float e = std::fma(r.a, f.s[j], std::fma(r.c_t, f.t[j], r.c0));
  return f.u ? std::fma(r.b, f.u[j], e) : e;
}

// Inserts every key j < n of the tile (row id first + j, never `skip`) whose upper bound
// rank + E reaches the row's threshold; 16 at a time on AVX-512 (only passing keys leave the
// vector loop), bound_rank / bound_error one by one elsewhere. dots[j]: the approximate dots.
void bound_push_tile(Metric metric, BoundRow& row, int64_t k, const RankTerms& r,
                     const float* dots, const KeyTerms& f, int64_t n, int64_t first,
                     int64_t skip);

// The stored keys the survivors are rescored from: [N, D] rows of `type`.
struct ExactKeys {
  const void* data;
  c10::ScalarType type;
  int64_t D;
  Metric metric;
};

// Combines the parts' states of one query row q [D] (fp32), rescores the surviving candidates
// exactly and writes the top k to out_s / out_i (descending, ties to the smaller row, padded
// with (-inf, -1)). Returns how many were rescored, or -1 if a part overflowed.
int64_t finish_bound_row(const BoundRow* const* parts, int64_t n_parts, int64_t k,
                         const float* q, const ExactKeys& keys, float* out_s, int64_t* out_i);

}  // namespace knnfast::cpu
