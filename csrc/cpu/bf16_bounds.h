// The error model of knn_search's bf16 plans (csrc/cpu/knn_search_bf16.cpp): how far an
// approximate rank from bf16 dots can lie from the exact one. Every bound here is rigorous
// (worst case), so the search that prunes with it stays exact; configure("debug", 1) checks
// each one against the float64 rank.
#pragma once

#include <cstdint>

#include "common/knn_math.h"

namespace knnfast::cpu {

constexpr float kUnitRoundoffBf16 = 1.0f / 256.0f;
constexpr float kEpsF32 = 1.0f / 16777216.0f;

// Per-row constants of the error bound E(b, j) = a[b] * s[j] + c_t[b] * t[j] + c0[b] of query
// b and key j, where s, t are per-key factors computed in fp32 from the stored key:
//   l2:  s = |k - c|,         t = |k - c|^2   (rank = 2 (q - c).(k - c) - |k - c|^2)
//   ip:  s = |k - c|,         t = |k|         (rank = q.(k - c) + q.c)
//   cos: s = |k - c| / |k|,   t = 1 / |k|     (rank = (q.(k - c) + q.c) / |k|)
struct RowBound {
  float a, c_t, c0;
  float query_center_dot;  // ip / cos: q . c
};

// Relative error of one approximate dot q'.k' in units of |q'| |k'| for D terms: gemm = false
// for our vdpbf16ps kernel (fp32 out), true for at::mm's bf16 output (bf16_gemm).
float dot_error_factor(bool gemm, int64_t D);

// The bound's constants for query q [D] against keys centered by c [D] (|c| = center_norm).
RowBound row_bound(Metric metric, const float* q, const float* c, float center_norm, int64_t D,
                   float dot_factor);

// The same from the query's sums, each in fp32 in any order: qq = |q|^2, qc = q.c and (l2
// only) cq = |q - c|^2, and the norms qn = |q|, cn = |q - c| (l2 only) from norm_of
// (row_bound computes them; a caller that has them already passes them).
struct QuerySums {
  float qq, qc, cq, qn, cn;
};
RowBound row_bound_from_sums(Metric metric, const QuerySums& sums, float center_norm, int64_t D,
                             float dot_factor);

// x as a float no smaller than x (bounds formed in float64 stay bounds in fp32).
float round_up(double x);

// sum of x[d]^2 in fp32, in order (the order the bounds assume for |q|^2, |c|^2).
float norm2(const float* x, int64_t D);

// |x - minus| (or |x|, minus == nullptr) given sq, its fp32 square sum: sqrt(sq), unless sq is
// so small that squares below fp32's normal range may have vanished from it (|x| < 2^-30):
// then from float64, rounded up. A bound's norms must not underflow to 0 while the vector
// they bound is not 0.
float norm_of(const float* x, const float* minus, int64_t D, float sq);

}  // namespace knnfast::cpu
