#include "cpu/lists_bound_scan.h"

#include <algorithm>

#include "cpu/bf16_bounds.h"

namespace knnfast::cpu {

RankTerms list_rank_terms(Metric metric, const float* q, const float* c, const PairSums& p,
                          float qq, float c_norm, int64_t D, float dot_factor) {
  const QuerySums sums{qq, p.dot, p.diff_sq, norm_of(q, nullptr, D, qq),
                       metric == Metric::L2 ? norm_of(q, c, D, p.diff_sq) : 0.0f};
  const RowBound rb = row_bound_from_sums(metric, sums, c_norm, D, dot_factor);
  if (metric != Metric::L2) return {rb.a, rb.c_t, rb.c0, rb.query_center_dot};
  // -|q'|^2 in fp32 (D terms) and one more subtraction, |rank| <= 2 (|q'|^2 + |r|^2)
  return {rb.a, round_up(double(rb.c_t) + 2 * double(kEpsF32)),
          round_up(double(rb.c0) + double(D + 6) * kEpsF32 * double(p.diff_sq)), -p.diff_sq};
}

std::vector<float> query_sq_norms(const at::Tensor& queries) {
  const int64_t B = queries.size(0), D = queries.size(1);
  const float* q = queries.data_ptr<float>();
  std::vector<float> qq(B);
  for (int64_t b = 0; b < B; ++b) qq[b] = norm2(q + b * D, D);
  return qq;
}

void tile_factors(Metric metric, const float* n1s, const float* n2s, const float* err,
                  int64_t stride, int64_t n, TileFactors& f) {
  for (int64_t j = 0; j < n; ++j) {
    const float n1 = n1s[j * stride], n2 = n2s[j * stride];
    const float e = err ? err[j * stride] : 0.0f;
    if (metric == Metric::L2) {
      f.s[j] = n1;
      f.t[j] = n1 * n1;
      f.u[j] = e;
    } else if (metric == Metric::IP) {
      f.s[j] = n1;
      f.t[j] = n2;
      f.u[j] = e;
    } else {
      f.inv[j] = 1.0f / std::max(n2, kNormEps);
      f.s[j] = n1 * f.inv[j];
      f.t[j] = f.inv[j];
      f.u[j] = e * f.inv[j];
    }
  }
}

}  // namespace knnfast::cpu
