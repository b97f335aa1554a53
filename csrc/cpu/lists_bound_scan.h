// What knn_search_lists' packed plans share (bf16: knn_search_lists_bf16.cpp, int8:
// knn_search_lists_int8.cpp): a pack of per-list residuals r = k - c_l scanned list by list,
// an approximate rank with a rigorous bound per (query, key) (bound_topk.h), the survivors
// rescored exactly. The plans differ only in how a list's queries and keys meet (the dot
// kernel and its error terms); the rank terms, the per-key factors, the debug check and the
// parallel run over the lists are here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/op_inputs.h"
#include "common/settings.h"
#include "cpu/bf16_bounds.h"
#include "cpu/bound_topk.h"
#include "cpu/list_scan.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {

// The rank terms of one (query, list) from the query's sums against the list's center c
// (p = pair_sums(q, c): |q - c|^2 and q.c; qq = |q|^2, c_norm = |c| from norm_of; q and c
// give the norms where their fp32 sums underflowed): add = -|q'|^2 for l2
// (q' = q - c), q.c for ip and cos; a, c_t, c0 bound a dot of relative error dot_factor
// (bf16_bounds.h) plus, for l2, the fp32 error of |q'|^2 and one more subtraction.
RankTerms list_rank_terms(Metric metric, const float* q, const float* c, const PairSums& p,
                          float qq, float c_norm, int64_t D, float dot_factor);

// Per-key factors of a tile of n keys (bound_topk.h's KeyTerms) from the pack's per-key
// floats at stride `stride`: n1 = |r|, n2 = |k| and, when err != nullptr, the int8 plan's
// quantization error |r - r~| (u = err, over |k| for cos).
struct TileFactors {
  std::vector<float> s, t, inv, u;
  explicit TileFactors(int64_t n) : s(n), t(n), inv(n), u(n) {}
  KeyTerms terms(bool with_u) const {
    return {s.data(), t.data(), inv.data(), with_u ? u.data() : nullptr};
  }
};
void tile_factors(Metric metric, const float* n1, const float* n2, const float* err,
                  int64_t stride, int64_t n, TileFactors& f);

// configure("debug", 1): every approximate rank of the tile against float64, for query rows
// `rows` [m]; raises if a bound fails (the error model is what makes the plan exact).
template <Metric M>
void verify_tile(const SearchInputs& in, const char* plan, const int64_t* rows, int64_t m,
                 const RankTerms* consts, const float* dots, const KeyTerms& f, int64_t first,
                 int64_t n) {
  const at::Tensor idx = at::from_blob(const_cast<int64_t*>(rows), {m}, at::kLong);
  const at::Tensor q = in.queries.index_select(0, idx).to(at::kDouble);
  const at::Tensor keys = in.keys.narrow(0, first, n).to(at::kDouble);
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
      TORCH_CHECK(std::fabs(double(rank) - truth) <= double(err), "knn_search_lists[", plan,
                  "]: the error bound failed for query ", rows[i], ", key ", first + j,
                  ": approximate rank ", rank, ", exact ", truth, ", bound ", err,
                  ". Check that the pack came from pack_lists_", plan, " over these keys; "
                  "otherwise please report it with knnfast.build_info().");
    }
}

// The lists [l0, l1) that have keys and queries: visit(list_rows, m, c, c_norm, begin, end)
// with the list's query rows [m], its center c [D] (of centers [L, D]), |c| (norm_of) and its
// key rows [begin, end).
template <class Visit>
void for_each_probed_list(const ListQueries& lq, const int64_t* offsets, const float* centers,
                          int64_t D, int64_t l0, int64_t l1, const Visit& visit) {
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t m = lq.start[l + 1] - lq.start[l];
    if (m == 0 || offsets[l + 1] == offsets[l]) continue;
    const float* c = centers + l * D;
    visit(lq.rows.data() + lq.start[l], m, c, norm_of(c, nullptr, D, norm2(c, D)), offsets[l],
          offsets[l + 1]);
  }
}

// One scanned tile of a list (keys first .. first + n, dots [m, n] of its query rows
// list_rows [m]) into those rows' candidates; configure("debug", 1) checks it first.
template <Metric M>
void push_list_tile(const SearchInputs& in, const char* plan, const int64_t* list_rows,
                    int64_t m, const RankTerms* consts, const float* dots, const KeyTerms& kt,
                    int64_t first, int64_t n, std::vector<BoundRow>& rows) {
  if (settings().debug.load(std::memory_order_relaxed) != 0)
    verify_tile<M>(in, plan, list_rows, m, consts, dots, kt, first, n);
  const int64_t* exclude = in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t b = list_rows[i];
    bound_push_tile(M, rows[b], in.k, consts[i], dots + i * n, kt, n, first,
                    exclude ? exclude[b] : -1);
  }
}

// The lists cut into one run per thread, scan_part(lq, l0, l1, rows) pushing the candidates
// of lists [l0, l1) into rows [B]; then each row's survivors rescored exactly into out_s /
// out_i [B, k]. Returns the rows left unfinished (a candidate set over its cap).
template <class ScanPart>
std::vector<int64_t> run_bound_scan(const SearchInputs& in, const int64_t* offsets, int64_t L,
                                    const at::Tensor& probes, const ScanPart& scan_part,
                                    float* out_s, int64_t* out_i) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1), k = in.k;
  const ListQueries lq = invert_probes(probes, L);
  const std::vector<int64_t> cut = split_lists(lq, offsets, L, D);
  const int64_t parts = int64_t(cut.size()) - 1;
  std::vector<std::vector<BoundRow>> states(parts, std::vector<BoundRow>(B, BoundRow(k)));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) scan_part(lq, cut[p], cut[p + 1], states[p]);
  });
  const ExactKeys keys{in.keys.data_ptr(), in.keys.scalar_type(), D, in.metric};
  std::vector<int64_t> rescored(B);
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<const BoundRow*> row_parts(parts);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = 0; p < parts; ++p) row_parts[p] = &states[p][b];
      rescored[b] = finish_bound_row(row_parts.data(), parts, k,
                                     in.queries.data_ptr<float>() + b * D, keys,
                                     out_s + b * k, out_i + b * k);
    }
  });
  std::vector<int64_t> unfinished;
  for (int64_t b = 0; b < B; ++b)
    if (rescored[b] < 0) unfinished.push_back(b);
  return unfinished;
}

// run_bound_scan with a scan part for in's metric: ScanPart<M>::run(st, lq, l0, l1, rows).
template <template <Metric> class ScanPart, class Setup>
std::vector<int64_t> run_bound_scan_for_metric(const Setup& st, const int64_t* offsets, int64_t L,
                                               const at::Tensor& probes, float* out_s,
                                               int64_t* out_i) {
  const auto part = [&st](auto metric) {
    return [&st](const ListQueries& lq, int64_t l0, int64_t l1, std::vector<BoundRow>& rows) {
      ScanPart<decltype(metric)::value>::run(st, lq, l0, l1, rows);
    };
  };
  using L2 = std::integral_constant<Metric, Metric::L2>;
  using IP = std::integral_constant<Metric, Metric::IP>;
  using COS = std::integral_constant<Metric, Metric::COS>;
  switch (st.in.metric) {
    case Metric::L2: return run_bound_scan(st.in, offsets, L, probes, part(L2{}), out_s, out_i);
    case Metric::IP: return run_bound_scan(st.in, offsets, L, probes, part(IP{}), out_s, out_i);
    default: return run_bound_scan(st.in, offsets, L, probes, part(COS{}), out_s, out_i);
  }
}

// |q|^2 of every query row (fp32, in order: the sums the bounds assume).
std::vector<float> query_sq_norms(const at::Tensor& queries);

}  // namespace knnfast::cpu
