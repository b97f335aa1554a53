// knn_search_lists, plan "int8": exact by construction, from int8 residual codes packed once.
//
// Plan bf16 reads 2 bytes per key dimension on every call, and at a decoding step's sizes
// that read is most of its time. Here each residual r = k - c_l is stored as int8 codes with
// a per-key scale s_r (r~ = s_r code) and the exact norm of what rounding lost, e_r = |r - r~|
// (float64, rounded up): 1 byte per dimension. The query side q' (q - c_l for l2, q for ip and
// cos) is quantized per (query, list) the same way (scale s_q, loss e_q, |q'| rounded up);
// vpdpbusd multiplies the codes exactly in int32 (the query's codes offset by 128, so the key's
// code sum corrects the product), and dot = float(I) (s_q s_r).
//
// Error of that dot against q'.r (Cauchy-Schwarz on q'.r - q~.r~ = q'.(r - r~) + (q' - q~).r~,
// |r~| <= |r| + e_r, and three fp32 roundings of s_q s_r I, |I s_q s_r| <= |q~| |r~|):
//   |q'.r - dot| <= (|q'| + beta) e_r + beta |r|,   beta = e_q + 4 eps (|q'| + e_q),
// on top of the fp32 terms of list_rank_terms (the rounding of q - c and of the ranks). The
// rank terms (bound_topk.h) carry it as b u_j with u = e_r and an addition to a (s = |r|);
// l2 doubles both (its rank holds 2 dot), cos divides by |k| (u = e_r / |k|).
// configure("debug", 1) checks every approximate rank against float64, as plan bf16 does.
#include "cpu/knn_search_lists_int8.h"

#include <algorithm>
#include <cmath>

#include "cpu/bf16_bounds.h"
#include "cpu/int8_dot.h"
#include "cpu/lists_bound_scan.h"

namespace knnfast::cpu {
namespace {

constexpr int64_t kTile = 256;  // keys per dot_tile16_int8 call
// The dot's own fp32 error in list_rank_terms' model: the rounding of q - c and of the sums
// that give |q'|; the quantization is the separate b u_j term.
constexpr float kInt8DotFactor = 8 * kEpsF32;

struct Setup {
  const SearchInputs& in;
  const int64_t* offsets;
  const ListsInt8Pack& pack;
  int64_t B, D, Dq, k;
  std::vector<uint8_t> plain_codes;   // ip, cos: every query quantized once, [B, Dq]
  std::vector<QueryCode> plain;       // their scales and bounds
  std::vector<float> qq;              // |q|^2 per row
};

// The rank terms of query q for the list centered at c, with the quantization's terms; l2
// quantizes q - c into `codes` (ip, cos take the row's plain code: `code`).
RankTerms list_row(const Setup& st, Metric metric, const float* q, float qq, const float* c,
                   float c_norm, const QueryCode* plain, uint8_t* codes, float* scale) {
  const PairSums p = pair_sums(q, c, at::kFloat, st.D);
  RankTerms r = list_rank_terms(metric, q, c, p, qq, c_norm, st.D, kInt8DotFactor);
  const QueryCode qc = metric == Metric::L2 ? quantize_row_int8(q, c, st.D, st.Dq, codes) : *plain;
  // in float64, rounded up: in fp32, 4 eps |q'| underflows for tiny queries
  const double beta = (qc.err + 4 * double(kEpsF32) * (double(qc.norm) + qc.err)) * (1 + 1e-5);
  const double times = metric == Metric::L2 ? 2.0 : 1.0;
  r.a = round_up(double(r.a) + times * beta);
  r.b = round_up(times * (qc.norm + beta) * (1 + 1e-5));
  *scale = qc.scale;
  return r;
}

// dots[i * n + j] = float(acc - 128 code_sum_j) (scale_i s_j): the approximate q'.r.
// (bias, s_r: scratch of n.)
void int8_dots(const int32_t* acc, const float* scales, int64_t m, const float* terms,
               int64_t n, float* dots, int32_t* bias, float* s_r) {
  for (int64_t j = 0; j < n; ++j) {
    bias[j] = 128 * int32_t(terms[j * kInt8KeyTerms + kCodeSum]);
    s_r[j] = terms[j * kInt8KeyTerms + kScale];
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      dots[i * n + j] = float(acc[i * n + j] - bias[j]) * (scales[i] * s_r[j]);
}

// Plan int8's scan of lists [l0, l1) into rows (run_bound_scan_for_metric's part).
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
  const int8_t* codes = st.pack.codes.data_ptr<int8_t>();
  const float* terms = st.pack.key_terms.data_ptr<float>();
  std::vector<uint8_t> group;
  std::vector<int8_t> spare(16 * st.D);
  std::vector<int32_t> acc;
  std::vector<float> dots, scales, s_r(kTile);
  std::vector<int32_t> bias(kTile);
  std::vector<RankTerms> consts;
  TileFactors f(kTile);
  const auto scan_list = [&](const int64_t* list_rows, int64_t m, const float* c, float c_norm,
                              int64_t begin, int64_t end) {
    group.resize(m * st.Dq);
    consts.resize(m);
    scales.resize(m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t b = list_rows[i];
      const QueryCode* plain = M == Metric::L2 ? nullptr : &st.plain[b];
      consts[i] = list_row(st, M, q + b * st.D, st.qq[b], c, c_norm, plain,
                           group.data() + i * st.Dq, &scales[i]);
      if constexpr (M != Metric::L2)
        std::copy_n(st.plain_codes.data() + b * st.Dq, st.Dq, group.data() + i * st.Dq);
    }
    acc.resize(m * kTile);
    dots.resize(m * kTile);
    for (int64_t first = begin; first < end; first += kTile) {
      const int64_t n = std::min(kTile, end - first);
      const float* key_terms = terms + first * kInt8KeyTerms;
      dot_tile16_int8(group.data(), m, st.Dq, codes + first * st.D, n, st.D, acc.data(), n,
                      spare.data());
      int8_dots(acc.data(), scales.data(), m, key_terms, n, dots.data(), bias.data(),
                s_r.data());
      tile_factors(M, key_terms + kResidualNorm, key_terms + kKeyNorm, key_terms + kError,
                   kInt8KeyTerms, n, f);
      const KeyTerms kt = f.terms(true);
      push_list_tile<M>(st.in, "int8", list_rows, m, consts.data(), dots.data(), kt, first, n,
                        rows);
    }
  };
  for_each_probed_list(lq, st.offsets, centers, st.D, l0, l1, scan_list);
}

}  // namespace

std::vector<int64_t> knn_search_lists_int8(const SearchInputs& in, const at::Tensor& offsets,
                                           const at::Tensor& probes, const ListsInt8Pack& pack,
                                           float* out_s, int64_t* out_i) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1);
  Setup st{in, offsets.data_ptr<int64_t>(), pack, B, D, int8_query_stride(D), in.k, {}, {},
           query_sq_norms(in.queries)};
  const float* q = in.queries.data_ptr<float>();
  if (in.metric != Metric::L2) {
    st.plain_codes.resize(B * st.Dq);
    st.plain.resize(B);
    for (int64_t b = 0; b < B; ++b)
      st.plain[b] = quantize_row_int8(q + b * D, nullptr, D, st.Dq,
                                      st.plain_codes.data() + b * st.Dq);
  }
  return run_bound_scan_for_metric<ScanPart>(st, st.offsets, pack.centers.size(0), probes, out_s,
                                             out_i);
}

}  // namespace knnfast::cpu
