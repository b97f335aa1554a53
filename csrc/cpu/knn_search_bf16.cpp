// knn_search, large batches on AVX512-BF16 CPUs: exact by construction.
//
// Keys (and, for l2, queries) are centered by the keys' mean c and rounded to bf16; the
// vdpbf16ps kernel gives every (query, key) an approximate rank r in the units of
// ranking_key(). Each r comes with a rigorous bound |r - r_exact| <= E (bf16 rounding of both
// factors, fp32 accumulation, the fp32 arithmetic around it). Per query row the scan keeps
//   - the k best lower bounds r - E (a buffer, selected down to k whenever 2k accumulate);
//     their k-th, T, is a lower bound on the exact k-th rank (k keys are known to rank at
//     least that high), and only grows;
//   - every key whose upper bound r + E reaches the current T.
// A key of the true top k ranks >= the exact k-th >= every T, so its upper bound passed the
// test when it was scanned and it is never pruned. The survivors are rescored exactly in fp32
// from the stored keys and the best k returned: the same answer as an exact fp32 search.
// (That bookkeeping is shared with knn_search_lists' bf16 plan: bound_topk.h.)
//
// Centering keeps E small: the rounding error scales with |q - c| |k - c|, not |q| |k|, which
// matters for real hidden states (large common component). l2 ranks are translation invariant;
// ip and cos use q.k = q.(k - c) + q.c with q.c exact in fp32.
//
// Two scorers give the approximate dots; everything else (centering, bounds, candidates,
// rescoring) is shared:
//   bf16       our vdpbf16ps kernel (bf16_dot.h): fp32 accumulation in a known order, fp32 out.
//   bf16_gemm  ATen's bf16 matmul (at::mm) on tiles of kGemmTile centered keys, converted from
//              the stored dtype once per tile: oneDNN, which uses AMX tiles where the CPU has
//              them and AVX512-BF16 / AVX2 / reference code elsewhere. We do not know its
//              summation order or blocking, so its bound (bf16_bounds.h) assumes only what
//              holds for any of them: exact bf16 x bf16 products (8-bit significands), fp32
//              accumulation in any order (a sum of D terms in any tree has error <= gamma_D
//              sum |x_i y_i|; doubled to allow faithful rather than nearest rounding), the
//              result rounded to bf16 (at::mm's output dtype; <= 2u relative, again allowing
//              faithful rounding), and subnormals flushed on input and output (DAZ/FTZ, as AMX
//              and vdpbf16ps do: an absolute term, see bf16_bounds.cpp).
#include "cpu/knn_search_bf16.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "common/settings.h"
#include "cpu/bf16_bounds.h"
#include "cpu/bf16_dot.h"
#include "cpu/bound_topk.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

constexpr int64_t kTile = 21 * kBf16KeyBlock;  // 252 keys: a multiple of the register block
constexpr int64_t kGemmTile = 512;              // bf16_gemm: keys per at::mm
// Per-key factors of one tile.
struct KeyFactors {
  std::vector<float> centered_sq, full_sq, s, t, inv_norm;
  void resize(int64_t n) {
    centered_sq.resize(n), full_sq.resize(n), s.resize(n), t.resize(n), inv_norm.resize(n);
  }
};

struct Setup {
  const at::Tensor& queries;
  const at::Tensor& keys;
  int64_t B, D, N, k;
  Metric metric;
  const int64_t* exclude;
  Bf16Scorer scorer;
  int64_t tile;
  std::vector<float> center;
  std::vector<uint32_t> packed_queries;  // bf16: the kernel's layout
  int64_t B_padded;
  at::Tensor query_matrix;  // bf16_gemm: [B, D] bf16 (centered for l2)
  std::vector<RowBound> bounds;
};

Setup make_setup(const at::Tensor& queries, const at::Tensor& keys, int64_t k, Metric metric,
                 const int64_t* exclude, Bf16Scorer scorer) {
  const int64_t B = queries.size(0), D = queries.size(1), N = keys.size(0);
  const int64_t tile = scorer == Bf16Scorer::Gemm ? kGemmTile : kTile;
  Setup st{queries, keys, B, D, N, k, metric, exclude, scorer, tile, {}, {}, 0, {}, {}};
  // Center = mean of up to 4096 evenly spaced keys. Any fixed vector keeps the result exact
  // (the bound accounts for it); a good one makes the bound tight. Non-finite keys (never
  // returned) must not poison it.
  const int64_t samples = std::min<int64_t>(N, 4096);
  const at::Tensor rows =
      at::linspace(0, N - 1, samples, queries.options().dtype(at::kDouble)).to(at::kLong);
  const at::Tensor mean =
      keys.index_select(0, rows).to(at::kFloat).nan_to_num(0.0, 0.0, 0.0).mean(0).contiguous();
  st.center.assign(mean.data_ptr<float>(), mean.data_ptr<float>() + D);
  const float center_norm = norm_of(st.center.data(), nullptr, D, norm2(st.center.data(), D));

  const float* q = queries.data_ptr<float>();
  const bool center_queries = metric == Metric::L2;
  if (scorer == Bf16Scorer::Gemm) {
    st.query_matrix = center_queries ? queries - mean.unsqueeze(0) : queries;
    st.query_matrix = st.query_matrix.to(at::kBFloat16).contiguous();  // round to nearest even
  } else {
    st.B_padded = (B + kBf16QueryBlock - 1) / kBf16QueryBlock * kBf16QueryBlock;
    st.packed_queries.resize(((D + 1) / 2) * st.B_padded);
    pack_queries_bf16(q, B, D, center_queries ? st.center.data() : nullptr,
                      st.packed_queries.data(), st.B_padded);
  }

  const float dot_factor = dot_error_factor(scorer == Bf16Scorer::Gemm, D);
  st.bounds.resize(B);
  for (int64_t b = 0; b < B; ++b)
    st.bounds[b] = row_bound(metric, q + b * D, st.center.data(), center_norm, D, dot_factor);
  return st;
}

// The rank terms of row b (bound_topk.h): knn_search's l2 rank is 2 q'.k' - |k'|^2 (add = 0).
RankTerms rank_terms(const Setup& st, int64_t b) {
  const RowBound& rb = st.bounds[b];
  return {rb.a, rb.c_t, rb.c0, st.metric == Metric::L2 ? 0.0f : rb.query_center_dot};
}

KeyTerms key_terms(const KeyFactors& f) { return {f.s.data(), f.t.data(), f.inv_norm.data()}; }

// configure("debug", 1): checks every approximate rank of the tile against the real-number rank
// (float64, same center c) and raises if a bound fails. The bounds rest on assumptions about
// the scorer (bf16_gemm: whatever oneDNN does on this CPU), so this is how a new CPU is vetted.
template <Metric M>
void verify_tile(const Setup& st, const float* dots_all, const KeyFactors& f, int64_t n,
                 int64_t first) {
  const auto f64 = st.queries.options().dtype(at::kDouble);
  const at::Tensor q = st.queries.to(at::kDouble);
  const at::Tensor k = st.keys.narrow(0, first, n).to(at::kDouble);
  at::Tensor exact;
  if constexpr (M == Metric::L2) {
    const at::Tensor c = at::from_blob(const_cast<float*>(st.center.data()), {st.D}, at::kFloat)
                             .to(f64);
    const at::Tensor kc = k - c;
    exact = 2 * at::mm(q - c, kc.t()) - (kc * kc).sum(1);
  } else {
    exact = at::mm(q, k.t());
    if constexpr (M == Metric::COS) exact = exact / k.norm(2, {1}).clamp_min(kNormEps);
  }
  const double* e = exact.data_ptr<double>();
  const KeyTerms terms = key_terms(f);
  for (int64_t b = 0; b < st.B; ++b) {
    const RankTerms r = rank_terms(st, b);
    for (int64_t j = 0; j < n; ++j) {
      const float rank = bound_rank(M, dots_all[b * n + j], r, terms, j);
      const float err = bound_error(r, terms, j);
      const double truth = e[b * n + j];
      if (!std::isfinite(truth)) continue;  // non-finite keys are never returned
      TORCH_CHECK(std::fabs(double(rank) - truth) <= double(err),
                  "knn_search[", st.scorer == Bf16Scorer::Gemm ? "bf16_gemm" : "bf16",
                  "]: the error bound failed for query ", b, ", key ", first + j, ": approximate "
                  "rank ", rank, ", exact ", truth, ", bound ", err, ". Results may be "
                  "wrong on this CPU; please report it with knnfast.build_info().");
    }
  }
}

// The scratch of one part's tiles.
struct TileBuffers {
  std::vector<uint16_t> packed;  // bf16: the kernel's key layout
  at::Tensor centered, rounded, approx;  // bf16_gemm: [tile, D] fp32, [tile, D] bf16, [B, tile]
  std::vector<float> dots;  // [B, n] fp32
  TileBuffers(const Setup& st) : dots(st.B * st.tile) {
    if (st.scorer == Bf16Scorer::Kernel) {
      packed.resize(st.tile * 2 * ((st.D + 1) / 2));
      return;
    }
    const auto options = st.queries.options();
    centered = at::empty({st.tile, st.D}, options);
    rounded = at::empty({st.tile, st.D}, options.dtype(at::kBFloat16));
    approx = at::empty({st.B, st.tile}, options.dtype(at::kBFloat16));
  }
};

// Approximate dots [B, n] of keys [first, first + n) and their centered (and, with need_full,
// full) squared norms from the unrounded keys.
void score_tile(const Setup& st, TileBuffers& buf, int64_t first, int64_t n, KeyFactors& f,
                bool need_full) {
  const char* key_ptr =
      static_cast<const char*>(st.keys.data_ptr()) + first * st.D * st.keys.element_size();
  if (st.scorer == Bf16Scorer::Kernel) {
    pack_keys_bf16(key_ptr, st.keys.scalar_type(), n, st.D, st.center.data(), buf.packed.data(),
                   f.centered_sq.data(), need_full ? f.full_sq.data() : nullptr);
    dot_tile_bf16(st.packed_queries.data(), st.B, st.B_padded, buf.packed.data(), n, st.D,
                  buf.dots.data(), n);
    return;
  }
  // bf16_gemm: the tile converted once (stored dtype -> centered fp32 -> bf16), then at::mm
  at::Tensor centered = buf.centered.narrow(0, 0, n);
  at::sub_out(centered, st.keys.narrow(0, first, n),
              at::from_blob(const_cast<float*>(st.center.data()), {st.D}, at::kFloat));
  key_sq_norms(centered.data_ptr<float>(), at::kFloat, n, st.D, f.centered_sq.data());
  if (need_full) key_sq_norms(key_ptr, st.keys.scalar_type(), n, st.D, f.full_sq.data());
  const at::Tensor rounded = buf.rounded.narrow(0, 0, n).copy_(centered);  // nearest even
  at::Tensor approx = buf.approx.narrow(1, 0, n);
  at::mm_out(approx, st.query_matrix, rounded.t());
  at::from_blob(buf.dots.data(), {st.B, n}, at::kFloat).copy_(approx);
}

// The norm of key `row` (minus `center`, or whole) from its fp32 square sum sq, or from
// float64 where sq is small enough to have lost squares to underflow (bf16_bounds.h: norm_of).
float key_norm(const Setup& st, int64_t row, const float* center, float sq) {
  if (!(sq < 0x1p-60f)) return std::sqrt(sq);
  const at::Tensor key = st.keys[row].to(at::kFloat).contiguous();  // exact
  return norm_of(key.data_ptr<float>(), center, st.D, sq);
}

template <Metric M>
std::vector<BoundRow> scan_part(const Setup& st, int64_t begin, int64_t end) {
  std::vector<BoundRow> rows(st.B, BoundRow(st.k));
  TileBuffers buf(st);
  KeyFactors f;
  f.resize(st.tile);
  const bool need_full = M != Metric::L2;
  const bool debug = settings().debug.load(std::memory_order_relaxed) != 0;
  for (int64_t first = begin; first < end; first += st.tile) {
    const int64_t n = std::min(st.tile, end - first);
    score_tile(st, buf, first, n, f, need_full);
    for (int64_t j = 0; j < n; ++j) {
      const float cn = key_norm(st, first + j, st.center.data(), f.centered_sq[j]);
      if constexpr (M == Metric::L2) {
        f.s[j] = cn;
        f.t[j] = f.centered_sq[j];
      } else if constexpr (M == Metric::IP) {
        f.s[j] = cn;
        f.t[j] = key_norm(st, first + j, nullptr, f.full_sq[j]);
      } else {
        f.inv_norm[j] = 1.0f / std::max(std::sqrt(f.full_sq[j]), kNormEps);
        f.s[j] = cn * f.inv_norm[j];
        f.t[j] = f.inv_norm[j];
      }
    }
    if (debug) verify_tile<M>(st, buf.dots.data(), f, n, first);
    for (int64_t b = 0; b < st.B; ++b)
      bound_push_tile(M, rows[b], st.k, rank_terms(st, b), buf.dots.data() + b * n, key_terms(f),
                      n, first, st.exclude ? st.exclude[b] : -1);
  }
  return rows;
}

// Row b's parts combined and rescored exactly (finish_bound_row).
int64_t finish_row(const Setup& st, const std::vector<std::vector<BoundRow>>& parts, int64_t b,
                   float* out_s, int64_t* out_i) {
  std::vector<const BoundRow*> rows;
  for (const auto& part : parts) rows.push_back(&part[b]);
  const ExactKeys keys{st.keys.data_ptr(), st.keys.scalar_type(), st.D, st.metric};
  return finish_bound_row(rows.data(), int64_t(rows.size()), st.k,
                          st.queries.data_ptr<float>() + b * st.D, keys, out_s, out_i);
}

template <Metric M>
std::vector<int64_t> run(const Setup& st, float* out_scores, int64_t* out_indices) {
  const int64_t tiles = (st.N + st.tile - 1) / st.tile;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  std::vector<std::vector<BoundRow>> states(parts);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t0 = tiles * p / parts, t1 = tiles * (p + 1) / parts;
      states[p] = scan_part<M>(st, t0 * st.tile, std::min(st.N, t1 * st.tile));
    }
  });
  std::vector<int64_t> rescored(st.B);
  at::parallel_for(0, st.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      rescored[b] = finish_row(st, states, b, out_scores + b * st.k, out_indices + b * st.k);
  });
  std::vector<int64_t> unfinished;
  int64_t total = 0;
  for (int64_t b = 0; b < st.B; ++b) {
    if (rescored[b] < 0) unfinished.push_back(b);
    else total += rescored[b];
  }
  if (settings().debug.load(std::memory_order_relaxed))
    std::fprintf(stderr,
                 "knnfast.knn_search[%s]: B=%lld k=%lld: %.1f candidates rescored per row, "
                 "%lld rows over the candidate cap\n",
                 st.scorer == Bf16Scorer::Gemm ? "bf16_gemm" : "bf16",
                 static_cast<long long>(st.B), static_cast<long long>(st.k),
                 double(total) / double(std::max<int64_t>(1, st.B - int64_t(unfinished.size()))),
                 static_cast<long long>(unfinished.size()));
  return unfinished;
}

}  // namespace

std::vector<int64_t> knn_search_bf16(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                     Metric metric, const int64_t* exclude, float* out_scores,
                                     int64_t* out_indices, Bf16Scorer scorer) {
  const Setup st = make_setup(queries, keys, k, metric, exclude, scorer);
  switch (metric) {
    case Metric::L2: return run<Metric::L2>(st, out_scores, out_indices);
    case Metric::IP: return run<Metric::IP>(st, out_scores, out_indices);
    default: return run<Metric::COS>(st, out_scores, out_indices);
  }
}

}  // namespace knnfast::cpu
