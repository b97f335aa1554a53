// The error model of knn_search's bf16 plans; see bf16_bounds.h and, for how the bounds are
// used, the comment at the top of knn_search_bf16.cpp.
#include "cpu/bf16_bounds.h"

#include <cmath>
#include <vector>

namespace knnfast::cpu {
namespace {

// Twice the smallest normal fp32 (= bf16) number: what one flushed subnormal can cost, with room
// for the rounding of the terms it is added to.
constexpr float kFlushUnit = 2.0f * 1.17549435e-38f;

// Absolute error of one dot from flushed subnormals (row_bound_from_sums): an input x_i
// flushed to zero drops |x_i y_i| < 2^-126 |y_i|, so at most 2^-126 sqrt(D) (|q'| + |k'|) over
// the row (Cauchy-Schwarz); each of the D partial sums and the output can lose 2^-126 more:
// err = kFlushUnit sqrt(D) |k'| + kFlushUnit (sqrt(D) |q'| + D + 1).

}  // namespace

float norm2(const float* x, int64_t D) {
  float s = 0.0f;
  for (int64_t d = 0; d < D; ++d) s += x[d] * x[d];
  return s;
}

float norm_of(const float* x, const float* minus, int64_t D, float sq) {
  if (!(sq < 0x1p-60f)) return std::sqrt(sq);  // lost squares (< 2^-126 each) are negligible
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double v = minus ? double(x[d] - minus[d]) : double(x[d]);  // the fp32 difference
    s += v * v;
  }
  return std::nextafter(float(std::sqrt(s) * (1.0 + 0x1p-40)), INFINITY);
}

// bf16 rounding of both factors, fp32 accumulation over D terms (Cauchy-Schwarz turns
// sum |q_i| |k_i| into |q| |k|) and, for bf16_gemm, the bf16 output (see the file comment of
// knn_search_bf16.cpp). tests/test_knn_search_plans.py pins each term with a D = 1 worst case.
float dot_error_factor(bool gemm, int64_t D) {
  const float u = kUnitRoundoffBf16;
  if (!gemm) return (2 * u + u * u + (D + 4) * kEpsF32) * 1.0001f;
  const float accumulation = 2 * (D + 4) * kEpsF32;
  const float output = 2 * u * (1 + u) * (1 + u) * (1 + accumulation);
  return (2 * u + u * u + accumulation + output) * 1.0001f;
}

// The dot's error (dot_error_factor, the flush terms above) and a relative slack for the fp32
// arithmetic that forms and compares ranks (exact rescoring included). Formed in float64 and
// rounded up (round_up): in fp32, products such as slack |q| underflow to 0 for tiny queries.
RowBound row_bound_from_sums(Metric metric, const QuerySums& sums, float center_norm, int64_t D,
                             float dot_factor) {
  const double eps = kEpsF32, slack = (D + 16) * 2 * eps, kf = kFlushUnit;
  const double qn = sums.qn, root = std::sqrt(double(D)), df = dot_factor;
  const double flush_per_key = kf * root;
  const auto flush_rest = [&](double query_norm) { return kf * (root * query_norm + (D + 1)); };
  const double qc_error = 2 * D * eps * qn * double(center_norm);  // fp32 error of q . c
  RowBound rb;
  rb.query_center_dot = sums.qc;
  switch (metric) {
    case Metric::L2: {  // rank = 2 q'.k' - |k'|^2, q' = q - c, k' = k - c
      const double cn = sums.cn;
      rb.a = round_up(2 * (df * cn + flush_per_key));    // s = |k'|
      rb.c_t = round_up((D + 2) * eps + slack);          // t = |k'|^2 (its fp32 error + slack)
      rb.c0 = round_up(slack * double(sums.cq) + 2 * flush_rest(cn));
      break;
    }
    case Metric::IP: {  // rank = q.(k - c) + q.c
      rb.a = round_up(df * qn + flush_per_key);  // s = |k - c|
      rb.c_t = round_up(slack * qn);             // t = |k|
      rb.c0 = round_up(qc_error + flush_rest(qn));
      break;
    }
    default: {  // rank = (q.(k - c) + q.c) / |k|
      rb.a = round_up(df * qn + flush_per_key);       // s = |k - c| / |k|
      rb.c_t = round_up(qc_error + flush_rest(qn));   // t = 1 / |k|
      rb.c0 = round_up(slack * qn);
      break;
    }
  }
  return rb;
}

float round_up(double x) {
  const float f = float(x);
  return double(f) >= x ? f : std::nextafter(f, INFINITY);
}

RowBound row_bound(Metric metric, const float* q, const float* c, float center_norm, int64_t D,
                   float dot_factor) {
  QuerySums sums{norm2(q, D), 0.0f, 0.0f, 0.0f, 0.0f};
  sums.qn = norm_of(q, nullptr, D, sums.qq);
  for (int64_t d = 0; d < D; ++d) sums.qc += q[d] * c[d];
  if (metric == Metric::L2) {
    std::vector<float> centered(q, q + D);
    for (int64_t d = 0; d < D; ++d) centered[d] -= c[d];
    sums.cq = norm2(centered.data(), D);
    sums.cn = norm_of(q, c, D, sums.cq);
  }
  return row_bound_from_sums(metric, sums, center_norm, D, dot_factor);
}

}  // namespace knnfast::cpu
