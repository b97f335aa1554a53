// Math shared by the CPU and CUDA backends. Everything here is __host__ __device__ so the
// CPU test suite exercises the exact code the GPU kernels run, and includes nothing from torch.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KNNFAST_HD __host__ __device__ __forceinline__
#else
#define KNNFAST_HD inline
#endif

namespace knnfast {

// Metric ids, in the order the Python layer maps "l2" / "ip" / "cos".
enum class Metric : int { L2 = 0, IP = 1, COS = 2 };

constexpr float kNormEps = 1e-8f;  // cos: s = q.k / (max(|q|, eps) * max(|k|, eps))

KNNFAST_HD float neg_inf() { return -INFINITY; }

// ---- value rules (DESIGN §2), checked on the host by the CPU wrappers and inside the CUDA
// kernels; common/messages.h words the error for each.

// A token / entry id: -1 (none) or in [0, bound); bound < 0: no upper bound.
KNNFAST_HD bool valid_id(int64_t id, int64_t bound) { return id >= -1 && (bound < 0 || id < bound); }

// A target: ignore_index or a token in [0, vocab).
KNNFAST_HD bool valid_target(int64_t y, int64_t vocab, int64_t ignore_index) {
  return y == ignore_index || (y >= 0 && y < vocab);
}

// A neighbour score (or weight, before the sign check): finite or -inf (an invalid slot).
// NaN / +inf would make the kNN softmax undefined.
KNNFAST_HD bool valid_score(float s) { return s == s && s != INFINITY; }

// A given neighbour weight: finite and >= 0 (NaN fails).
KNNFAST_HD bool valid_weight(float w) { return w >= 0.0f && w < INFINITY; }

// temperature: > 0 and finite (NaN fails).
KNNFAST_HD bool valid_temperature(float t) { return t > 0.0f && t < INFINITY; }

// lam: in [0, 1] (NaN fails).
KNNFAST_HD bool valid_lam(float lam) { return lam >= 0.0f && lam <= 1.0f; }

// log(exp(a) + exp(b)) without overflow; exact when one side is -inf (so -inf + -inf = -inf,
// never NaN, and logaddexp(x, -inf) == x bitwise).
KNNFAST_HD float logaddexp(float a, float b) {
  const float hi = a > b ? a : b;
  const float lo = a > b ? b : a;
  if (lo == -INFINITY) return hi;
  return hi + log1pf(expf(lo - hi));
}

// Ranking key of a candidate inside one query row. The query-only terms (|q|^2 for l2,
// 1/|q| for cos) are the same for every key of the row, so selection uses this cheaper
// key and final_score() adds them back for the k survivors only.
KNNFAST_HD float ranking_key(Metric metric, float dot, float key_sq_norm) {
  switch (metric) {
    case Metric::L2: return 2.0f * dot - key_sq_norm;           // = |q|^2 - |q-k|^2
    case Metric::IP: return dot;
    default: return dot / fmaxf(sqrtf(key_sq_norm), kNormEps);  // = cos * |q|
  }
}

KNNFAST_HD float final_score(Metric metric, float key, float query_sq_norm) {
  switch (metric) {
    case Metric::L2: return fminf(key - query_sq_norm, 0.0f);   // -|q-k|^2, clamped like FAISS
    case Metric::IP: return key;
    default: return key / fmaxf(sqrtf(query_sq_norm), kNormEps);
  }
}

// Exact score from the three sums of one (q, k) pair, accumulated in fp32:
// diff_sq = sum (q-k)^2, dot = sum q*k, qq = |q|^2, kk = |k|^2. l2 uses the direct
// difference (no cancellation), which is what "exact rescoring" promises.
KNNFAST_HD float exact_score(Metric metric, float diff_sq, float dot, float qq, float kk) {
  switch (metric) {
    case Metric::L2: return -diff_sq;
    case Metric::IP: return dot;
    default: return dot / (fmaxf(sqrtf(qq), kNormEps) * fmaxf(sqrtf(kk), kNormEps));
  }
}

// Total order on neighbours: larger score first, then smaller index. Index -1 (padding)
// sorts after every real index with the same score.
KNNFAST_HD bool better(float score_a, int64_t index_a, float score_b, int64_t index_b) {
  if (score_a != score_b) return score_a > score_b;
  const uint64_t ua = static_cast<uint64_t>(index_a);  // -1 -> UINT64_MAX: padding loses ties
  const uint64_t ub = static_cast<uint64_t>(index_b);
  return ua < ub;
}

// Min-heap (worst neighbour at the root) of a running top-k, stored as two arrays.
// Replace the root by (score, index) and restore the heap; caller checked it is better.
KNNFAST_HD void heap_replace_root(float* scores, int64_t* indices, int64_t k, float score,
                                  int64_t index) {
  int64_t i = 0;
  while (true) {
    const int64_t left = 2 * i + 1;
    if (left >= k) break;
    int64_t worst = left;
    const int64_t right = left + 1;
    if (right < k && better(scores[left], indices[left], scores[right], indices[right]))
      worst = right;
    if (better(score, index, scores[worst], indices[worst])) {
      // the new entry beats the worse child, so that child is the worst here: move it up
      scores[i] = scores[worst];
      indices[i] = indices[worst];
      i = worst;
    } else {
      break;
    }
  }
  scores[i] = score;
  indices[i] = index;
}

// Merge two lists sorted by better() into out (length k, padded with (-inf, -1)).
KNNFAST_HD void merge_sorted_topk(const float* sa, const int64_t* ia, int64_t na,
                                  const float* sb, const int64_t* ib, int64_t nb, int64_t k,
                                  float* out_s, int64_t* out_i) {
  int64_t a = 0, b = 0;
  for (int64_t j = 0; j < k; ++j) {
    const bool take_a = a < na && (b >= nb || better(sa[a], ia[a], sb[b], ib[b]));
    if (take_a) {
      out_s[j] = sa[a];
      out_i[j] = ia[a++];
    } else if (b < nb) {
      out_s[j] = sb[b];
      out_i[j] = ib[b++];
    } else {
      out_s[j] = -INFINITY;
      out_i[j] = -1;
    }
  }
}

// Online softmax state: running max m and sum s of exp(x - m). merge() combines two
// partial states (from two blocks, threads or warps) exactly.
struct SoftmaxState {
  float max;
  float sum;
};

KNNFAST_HD SoftmaxState softmax_state_empty() { return SoftmaxState{-INFINITY, 0.0f}; }

KNNFAST_HD SoftmaxState softmax_state_merge(SoftmaxState a, SoftmaxState b) {
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  const float m = a.max > b.max ? a.max : b.max;
  return SoftmaxState{m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

KNNFAST_HD SoftmaxState softmax_state_add(SoftmaxState a, float x) {
  return softmax_state_merge(a, SoftmaxState{x, x == -INFINITY ? 0.0f : 1.0f});
}

KNNFAST_HD float softmax_state_logsumexp(SoftmaxState a) {
  return a.max == -INFINITY ? -INFINITY : a.max + logf(a.sum);
}

// Interpolation in log space: log((1-lam) * p_model + lam * p_knn) from
// log_one_minus_lam + log p_model and log_lam + log p_knn (each may be -inf).
KNNFAST_HD float interpolate_log(float log_one_minus_lam_plus_logp_model,
                                 float log_lam_plus_logp_knn) {
  return logaddexp(log_one_minus_lam_plus_logp_model, log_lam_plus_logp_knn);
}

// Upper bound on |exact score - approximate score| for one query of the CUDA tensor-core
// search path. Its dot products use the query scaled by `scale` (a power of two) and rounded
// to the keys' 16-bit type (relative rounding `unit`, absolute underflow `tiny` in scaled
// units), multiplied by the stored keys with fp32 accumulation over D terms. qq = |q|^2 and
// kmax_sq = the largest |k|^2 of the datastore. The terms (all by Cauchy-Schwarz):
//   rounding of q:      unit |q| |k| + (tiny / scale) sqrt(D) |k|
//   fp32 accumulation:  D 2^-23 |q| |k|             (twice the classic gamma_D)
//   fp32 score algebra: D 2^-22 (|q|^2 + |k|^2 + 2 |q| |k|)
// and a 1.5x safety factor; a loose bound only costs an exact re-search of the row.
KNNFAST_HD float approx_score_error(Metric metric, int64_t D, float unit, float tiny,
                                    float scale, float qq, float kmax_sq) {
  const float d = static_cast<float>(D);
  const float qn = sqrtf(qq), kn = sqrtf(kmax_sq);
  const float relative = unit + d * 1.1920929e-7f;  // unit + D 2^-23
  const float algebra = d * 2.3841858e-7f;          // D 2^-22
  const float under = tiny / scale * sqrtf(d);
  float e;
  switch (metric) {
    case Metric::L2:
      e = 2.0f * (relative * qn * kn + under * kn) + algebra * (qq + kmax_sq + 2.0f * qn * kn);
      break;
    case Metric::IP:
      e = relative * qn * kn + under * kn + algebra * qn * kn;
      break;
    default:  // cos: the errors divide by max(|q|, eps) max(|k|, eps); scores are in [-1, 1]
      e = relative + under / fmaxf(qn, kNormEps) + algebra;
      break;
  }
  return 1.5f * e;
}

}  // namespace knnfast
