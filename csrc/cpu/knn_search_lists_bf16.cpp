// knn_search_lists, plan "bf16": exact by construction, from bf16 residuals packed once.
//
// Plan scan converts every probed key to fp32 on every call and multiplies in fp32; at the
// sizes of a decoding step (a few queries per list, D ~ 128-1024) that conversion and the
// FMAs are the whole cost. Here the keys were packed once (knnfast.ops.pack_lists_bf16) as
// residuals r = k - c_l from their list's center c_l, rounded to bf16, with |k - c_l| and |k|
// in fp32. The scan multiplies bf16 queries by them with vdpbf16ps (dot_tile16_bf16: no
// conversion, half the instructions) and gives each (query, key) an approximate rank with a
// rigorous error bound (bf16_bounds.h: both factors' rounding, fp32 accumulation); the
// candidate bookkeeping and exact rescoring from the stored keys are bound_topk.h's, shared
// with knn_search's bf16 plan. Centering by the list's own center keeps the bound small
// (|q - c_l| |k - c_l|): a list is a tight cluster.
//
// Ranks are in one unit per row across lists with different centers:
//   l2:  -|q - k|^2 = 2 q'.r - |r|^2 - |q'|^2 with q' = q - c_l (rounded to bf16 for the dot);
//   ip:  q.k        = q.r + q.c_l            (q rounded to bf16 for the dot, q.c_l in fp32);
//   cos: q.k / |k|  = (q.r + q.c_l) / |k|.
// row_bound gives the bound of the first two terms of l2 (and of ip, cos); l2 adds the fp32
// error of |q'|^2 and of one more subtraction (list_rank_terms, lists_bound_scan.h).
// configure("debug", 1) checks every approximate rank against float64, so a wrong bound fails
// loudly in the tests.
#include "cpu/knn_search_lists_bf16.h"

#include <algorithm>
#include <cmath>

#include "cpu/bf16_bounds.h"
#include "cpu/lists_bound_scan.h"

namespace knnfast::cpu {
namespace {

constexpr int64_t kTile = 256;  // keys per dot_tile16_bf16 call

struct Setup {
  const SearchInputs& in;
  const int64_t* offsets;
  const ListsBf16Pack& pack;
  int64_t B, D, Dq, k;
  float dot_factor;
  std::vector<uint16_t> plain_queries;  // ip, cos: every query rounded once, [B, Dq]
  std::vector<float> qq;                // |q|^2 per row
};

// The rank terms of query q (|q|^2 = qq) for list center c (|c| = c_norm); l2 also packs
// q - c into `packed`.
RankTerms list_row(const Setup& st, Metric metric, const float* q, float qq, const float* c,
                   float c_norm, uint16_t* packed) {
  const PairSums p = pair_sums(q, c, at::kFloat, st.D);  // |q - c|^2, q.c
  if (metric == Metric::L2) pack_bf16_row(q, c, st.D, st.Dq, packed);
  return list_rank_terms(metric, q, c, p, qq, c_norm, st.D, st.dot_factor);
}

// Plan bf16's scan of lists [l0, l1) into rows (run_bound_scan_for_metric's part).
template <Metric M>
struct ScanPart {
  static void run(const Setup& st, const ListQueries& lq, int64_t l0, int64_t l1,
                  std::vector<BoundRow>& rows);
};

template <Metric M>
void ScanPart<M>::run(const Setup& st, const ListQueries& lq, int64_t l0, int64_t l1,
                      std::vector<BoundRow>& rows) {
  const float* q = st.in.queries.data_ptr<float>();
  const float* centers = st.pack.centers.data_ptr<float>();
  const uint16_t* residuals = reinterpret_cast<const uint16_t*>(st.pack.residuals.data_ptr());
  const float* norms = st.pack.residual_norms.data_ptr<float>();
  std::vector<uint16_t> group, spare(16 * st.D);
  std::vector<float> dots;
  std::vector<RankTerms> consts;
  TileFactors f(kTile);
  const auto scan_list = [&](const int64_t* list_rows, int64_t m, const float* c, float c_norm,
                              int64_t begin, int64_t end) {
    group.resize(m * st.Dq);
    consts.resize(m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t b = list_rows[i];
      consts[i] = list_row(st, M, q + b * st.D, st.qq[b], c, c_norm, group.data() + i * st.Dq);
      if constexpr (M != Metric::L2)
        std::copy_n(st.plain_queries.data() + b * st.Dq, st.Dq, group.data() + i * st.Dq);
    }
    dots.resize(m * kTile);
    for (int64_t first = begin; first < end; first += kTile) {
      const int64_t n = std::min(kTile, end - first);
      dot_tile16_bf16(group.data(), m, st.Dq, residuals + first * st.D, n, st.D, dots.data(), n,
                      spare.data());
      tile_factors(M, norms + 2 * first, norms + 2 * first + 1, nullptr, 2, n, f);
      const KeyTerms terms = f.terms(false);
      push_list_tile<M>(st.in, "bf16", list_rows, m, consts.data(), dots.data(), terms, first, n,
                        rows);
    }
  };
  for_each_probed_list(lq, st.offsets, centers, st.D, l0, l1, scan_list);
}

}  // namespace

std::vector<int64_t> knn_search_lists_bf16(const SearchInputs& in, const at::Tensor& offsets,
                                           const at::Tensor& probes, const ListsBf16Pack& pack,
                                           float* out_s, int64_t* out_i) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1);
  Setup st{in, offsets.data_ptr<int64_t>(), pack, B, D, bf16_query_stride(D), in.k,
           dot_error_factor(false, D), {}, query_sq_norms(in.queries)};
  const float* q = in.queries.data_ptr<float>();
  if (in.metric != Metric::L2) {
    st.plain_queries.resize(B * st.Dq);
    for (int64_t b = 0; b < B; ++b)
      pack_bf16_row(q + b * D, nullptr, D, st.Dq, st.plain_queries.data() + b * st.Dq);
  }
  return run_bound_scan_for_metric<ScanPart>(st, st.offsets, pack.centers.size(0), probes, out_s,
                                             out_i);
}

}  // namespace knnfast::cpu
