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
// error of |q'|^2 and of one more subtraction (list_row below). configure("debug", 1) checks
// every approximate rank against float64, so a wrong bound fails loudly in the tests.
#include "cpu/knn_search_lists_bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "common/settings.h"
#include "cpu/bf16_bounds.h"
#include "cpu/bound_topk.h"
#include "cpu/list_scan.h"
#include "cpu/vec_math.h"

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

// The rank terms (bound_topk.h) of one (query, list): add = -|q'|^2 for l2, q.c_l for ip, cos.
// The constants of query q (|q|^2 = qq) for list center c (|c| = c_norm); l2 also packs
// q - c into `packed`.
RankTerms list_row(const Setup& st, Metric metric, const float* q, float qq, const float* c,
                 float c_norm, uint16_t* packed) {
  const PairSums p = pair_sums(q, c, at::kFloat, st.D);  // |q - c|^2, q.c
  const RowBound rb = row_bound_from_sums(metric, {qq, p.dot, p.diff_sq}, c_norm, st.D,
                                          st.dot_factor);
  if (metric != Metric::L2) return {rb.a, rb.c_t, rb.c0, rb.query_center_dot};
  pack_bf16_row(q, c, st.D, st.Dq, packed);
  // -|q'|^2 in fp32 (D terms) and one more subtraction, |rank| <= 2 (|q'|^2 + |r|^2)
  return {rb.a, rb.c_t + 2 * kEpsF32, rb.c0 + float(st.D + 6) * kEpsF32 * p.diff_sq, -p.diff_sq};
}

// Per-key factors of a tile, from the packed norms (n1 = |r|, n2 = |k|): see bf16_bounds.h.
struct TileFactors {
  std::vector<float> s, t, inv;
  explicit TileFactors(int64_t n) : s(n), t(n), inv(n) {}
};

void tile_factors(Metric metric, const float* norms, int64_t n, TileFactors& f) {
  for (int64_t j = 0; j < n; ++j) {
    const float n1 = norms[2 * j], n2 = norms[2 * j + 1];
    if (metric == Metric::L2) {
      f.s[j] = n1;
      f.t[j] = n1 * n1;
    } else if (metric == Metric::IP) {
      f.s[j] = n1;
      f.t[j] = n2;
    } else {
      f.inv[j] = 1.0f / std::max(n2, kNormEps);
      f.s[j] = n1 * f.inv[j];
      f.t[j] = f.inv[j];
    }
  }
}

// configure("debug", 1): every approximate rank of the tile against float64, for query rows
// `rows` [m]; raises if a bound fails (the error model is what makes the plan exact).
template <Metric M>
void verify_tile(const Setup& st, const int64_t* rows, int64_t m, const RankTerms* consts,
                 const float* dots, const KeyTerms& f, int64_t first, int64_t n) {
  const at::Tensor idx = at::from_blob(const_cast<int64_t*>(rows), {m}, at::kLong);
  const at::Tensor q = st.in.queries.index_select(0, idx).to(at::kDouble);
  const at::Tensor keys = st.in.keys.narrow(0, first, n).to(at::kDouble);
  at::Tensor exact;
  if constexpr (M == Metric::L2) exact = -at::cdist(q, keys).square();
  else if constexpr (M == Metric::IP) exact = at::mm(q, keys.t());
  else exact = at::mm(q, keys.t()) / keys.norm(2, {1}).clamp_min(kNormEps);
  const double* e = exact.data_ptr<double>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float rank = bound_rank(M, dots[i * n + j], consts[i], f, j);
      const float err = bound_error(consts[i], f, j);
      const double truth = e[i * n + j];
      if (!std::isfinite(truth)) continue;  // non-finite keys are never returned
      TORCH_CHECK(std::fabs(double(rank) - truth) <= double(err),
                  "knn_search_lists[bf16]: the error bound failed for query ", rows[i], ", key ",
                  first + j, ": approximate rank ", rank, ", exact ", truth, ", bound ", err,
                  ". Check that the pack came from pack_lists_bf16 over these keys; otherwise "
                  "please report it with knnfast.build_info().");
    }
}

template <Metric M>
void scan_part(const Setup& st, const ListQueries& lq, int64_t l0, int64_t l1,
               std::vector<BoundRow>& rows) {
  const float* q = st.in.queries.data_ptr<float>();
  const float* centers = st.pack.centers.data_ptr<float>();
  const uint16_t* residuals = reinterpret_cast<const uint16_t*>(st.pack.residuals.data_ptr());
  const float* norms = st.pack.residual_norms.data_ptr<float>();
  const int64_t* exclude = st.in.exclude.defined() ? st.in.exclude.data_ptr<int64_t>() : nullptr;
  const bool debug = settings().debug.load(std::memory_order_relaxed) != 0;
  std::vector<uint16_t> group, spare(16 * st.D);
  std::vector<float> dots;
  std::vector<RankTerms> consts;
  TileFactors f(kTile);
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t m = lq.start[l + 1] - lq.start[l];
    if (m == 0 || st.offsets[l + 1] == st.offsets[l]) continue;
    const int64_t* list_rows = lq.rows.data() + lq.start[l];
    const float* c = centers + l * st.D;
    const float c_norm = std::sqrt(norm2(c, st.D));
    group.resize(m * st.Dq);
    consts.resize(m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t b = list_rows[i];
      consts[i] = list_row(st, M, q + b * st.D, st.qq[b], c, c_norm, group.data() + i * st.Dq);
      if constexpr (M != Metric::L2)
        std::copy_n(st.plain_queries.data() + b * st.Dq, st.Dq, group.data() + i * st.Dq);
    }
    dots.resize(m * kTile);
    for (int64_t first = st.offsets[l]; first < st.offsets[l + 1]; first += kTile) {
      const int64_t n = std::min(kTile, st.offsets[l + 1] - first);
      dot_tile16_bf16(group.data(), m, st.Dq, residuals + first * st.D, n, st.D, dots.data(), n,
                      spare.data());
      tile_factors(M, norms + 2 * first, n, f);
      const KeyTerms terms{f.s.data(), f.t.data(), f.inv.data()};
      if (debug) verify_tile<M>(st, list_rows, m, consts.data(), dots.data(), terms, first, n);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t b = list_rows[i];
        bound_push_tile(M, rows[b], st.k, consts[i], dots.data() + i * n, terms, n, first,
                        exclude ? exclude[b] : -1);
      }
    }
  }
}

template <Metric M>
std::vector<int64_t> run(const Setup& st, const at::Tensor& probes, float* out_s, int64_t* out_i) {
  const int64_t L = st.pack.centers.size(0);
  const ListQueries lq = invert_probes(probes, L);
  const std::vector<int64_t> cut = split_lists(lq, st.offsets, L, st.D);
  const int64_t parts = int64_t(cut.size()) - 1;
  std::vector<std::vector<BoundRow>> states(parts, std::vector<BoundRow>(st.B, BoundRow(st.k)));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) scan_part<M>(st, lq, cut[p], cut[p + 1], states[p]);
  });
  const ExactKeys keys{st.in.keys.data_ptr(), st.in.keys.scalar_type(), st.D, st.in.metric};
  std::vector<int64_t> rescored(st.B);
  at::parallel_for(0, st.B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<const BoundRow*> row_parts(parts);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = 0; p < parts; ++p) row_parts[p] = &states[p][b];
      rescored[b] = finish_bound_row(row_parts.data(), parts, st.k,
                                     st.in.queries.data_ptr<float>() + b * st.D, keys,
                                     out_s + b * st.k, out_i + b * st.k);
    }
  });
  std::vector<int64_t> unfinished;
  for (int64_t b = 0; b < st.B; ++b)
    if (rescored[b] < 0) unfinished.push_back(b);
  return unfinished;
}

}  // namespace

std::vector<int64_t> knn_search_lists_bf16(const SearchInputs& in, const at::Tensor& offsets,
                                           const at::Tensor& probes, const ListsBf16Pack& pack,
                                           float* out_s, int64_t* out_i) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1);
  Setup st{in, offsets.data_ptr<int64_t>(), pack, B, D, bf16_query_stride(D), in.k,
           dot_error_factor(false, D), {}, std::vector<float>(B)};
  const float* q = in.queries.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) st.qq[b] = norm2(q + b * D, D);
  if (in.metric != Metric::L2) {
    st.plain_queries.resize(B * st.Dq);
    for (int64_t b = 0; b < B; ++b)
      pack_bf16_row(q + b * D, nullptr, D, st.Dq, st.plain_queries.data() + b * st.Dq);
  }
  switch (in.metric) {
    case Metric::L2: return run<Metric::L2>(st, probes, out_s, out_i);
    case Metric::IP: return run<Metric::IP>(st, probes, out_s, out_i);
    default: return run<Metric::COS>(st, probes, out_s, out_i);
  }
}

}  // namespace knnfast::cpu
