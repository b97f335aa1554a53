// knn_search on CPU: exact distance + mask-to-k without materializing B x N.
//
// The keys are split into one contiguous range per thread; each thread walks its range in
// tiles, scores a [B, tile] block, and pushes it into per-row running top-k heaps (early
// rejection against the current k-th key, so almost every score costs one compare). The
// per-thread heaps are merged at the end. How a tile is scored depends on the batch:
//
//   stream    B < 32: one pass over the keys with our AVX-512 dot kernel, fp16/bf16 keys
//             converted in registers, |k|^2 from the same load: memory bound.
//   gemm_f32  B >= 32 on CPUs without AVX512-BF16: BLAS sgemm per tile.
//   bf16      B >= 32 on CPUs with AVX512-BF16 (any key dtype): keys and queries are
//             centered by the keys' mean and rounded to bf16, and our vdpbf16ps kernel (fp32
//             accumulation, 2x the fp32 FLOP rate) ranks the keys. Every approximate rank r
//             comes with a rigorous error bound E (bf16 rounding of both factors, fp32
//             accumulation): the k best lower bounds r - E give T, a lower bound on the
//             exact k-th rank, and every key whose upper bound r + E reaches T is kept. The
//             survivors are rescored exactly in fp32, so the result is exact by construction.
//   bf16_gemm B >= 32 on CPUs with AMX-BF16: the bf16 plan's centering, bounds and exact
//             rescoring, with the approximate dots from ATen's bf16 matmul on key tiles
//             (oneDNN: AMX tiles where present; it runs, slower, on every CPU).
//
// This is the fixed rule of plan="auto"; the Python wrapper replaces it by a measured choice
// (knnfast/ops/plan_choice.py) where calibration is on. plan="stream"|"gemm_f32"|"bf16"|
// "bf16_gemm" forces a path (tests, benchmarks; bf16 raises ValueError on a CPU without
// AVX512-BF16); configure("debug", 1) makes the bf16 paths check every error bound against the
// float64 rank and report how many candidates they rescored.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/bf16_dot.h"
#include "cpu/knn_search_bf16.h"
#include "common/op_inputs.h"
#include "cpu/cpu_utils.h"
#include "cpu/topk_merge.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

constexpr const char* kOp = "knn_search";
constexpr int64_t kSmallBatch = 32;

enum class Path { Stream, GemmF32, Bf16, Bf16Gemm };

struct Plan {
  Path path;
  int64_t tile;  // keys scored per block
  int64_t keep;  // candidates kept per row
};

// The path of the requested plan (auto: by batch size and CPU; the wrapper has made sure bf16
// is available when requested).
Plan make_plan(int64_t B, int64_t k, CpuSearchPlan requested) {
  Path path = B < kSmallBatch          ? Path::Stream
              : cpu_has_amx_bf16()     ? Path::Bf16Gemm
              : bf16_dot_available()   ? Path::Bf16
                                       : Path::GemmF32;
  if (requested == CpuSearchPlan::Stream) path = Path::Stream;
  if (requested == CpuSearchPlan::GemmF32) path = Path::GemmF32;
  if (requested == CpuSearchPlan::Bf16) path = Path::Bf16;
  if (requested == CpuSearchPlan::Bf16Gemm) path = Path::Bf16Gemm;
  switch (path) {
    case Path::Stream: return {path, 256, k};
    case Path::GemmF32: return {path, B >= 256 ? 1024 : 2048, k};
    default: return {path, 0, k};  // bf16, bf16_gemm: knn_search_bf16 tiles on its own
  }
}

// Running top-`keep` of every query row, as min-heaps (worst candidate at the root).
struct RowHeaps {
  int64_t keep;
  std::vector<float> scores;
  std::vector<int64_t> indices;
  RowHeaps(int64_t rows, int64_t keep_)
      : keep(keep_), scores(rows * keep_, -INFINITY), indices(rows * keep_, -1) {}

  // Keys are visited in increasing index order, so a tie never displaces the current entry
  // (ties go to the smaller index) and the strict `>` is the whole test. NaN never passes.
  template <Metric M>
  void push(int64_t row, const float* dots, const float* key_sq, int64_t n, int64_t first,
            int64_t exclude) {
    float* hs = scores.data() + row * keep;
    int64_t* hi = indices.data() + row * keep;
    float threshold = hs[0];
    for (int64_t j = 0; j < n; ++j) {
      const float v = ranking_key(M, dots[j], key_sq ? key_sq[j] : 0.0f);
      if (v > threshold && first + j != exclude) {
        heap_replace_root(hs, hi, keep, v, first + j);
        threshold = hs[0];
      }
    }
  }
};

// Scores one tile of keys [first, first + n) against all queries:
// dots[b * n + j] = q_b . k_j and, when key_sq is non-null, key_sq[j] = |k_j|^2.
struct TileScorer {
  const SearchInputs& in;
  Plan plan;
  at::Tensor convert_buf;  // gemm_f32: fp16/bf16 tile converted to fp32

  TileScorer(const SearchInputs& inputs, const Plan& p) : in(inputs), plan(p) {}

  void score(int64_t first, int64_t n, float* dots, float* key_sq) {
    const int64_t B = in.queries.size(0), D = in.queries.size(1);
    const auto key_type = in.keys.scalar_type();
    const char* key_ptr = static_cast<const char*>(in.keys.data_ptr()) +
                          first * D * in.keys.element_size();
    if (plan.path == Path::Stream) {
      dot_tile(in.queries.data_ptr<float>(), B, key_ptr, key_type, n, D, dots, n, key_sq);
      return;
    }
    const at::Tensor tile = in.keys.narrow(0, first, n);
    at::Tensor keys_f32 = tile;
    if (key_type != at::kFloat) keys_f32 = convert_buf.narrow(0, 0, n).copy_(tile);
    at::Tensor out = at::from_blob(dots, {B, n}, at::kFloat);
    at::mm_out(out, in.queries, keys_f32.t());
    if (key_sq) key_sq_norms(key_ptr, key_type, n, D, key_sq);
  }

};

template <Metric M>
RowHeaps scan_range(const SearchInputs& in, const Plan& plan, int64_t begin, int64_t end) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1);
  RowHeaps heaps(B, plan.keep);
  TileScorer scorer(in, plan);
  if (plan.path == Path::GemmF32 && in.keys.scalar_type() != at::kFloat)
    scorer.convert_buf = at::empty({plan.tile, D}, in.keys.options().dtype(at::kFloat));
  std::vector<float> dots(B * plan.tile), computed_sq(plan.tile);
  const bool need_sq = M != Metric::IP;
  const float* cached_sq = in.key_sq_norms.defined() ? in.key_sq_norms.data_ptr<float>() : nullptr;
  const int64_t* exclude = in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr;
  for (int64_t first = begin; first < end; first += plan.tile) {
    const int64_t n = std::min(plan.tile, end - first);
    float* sq_out = (need_sq && !cached_sq) ? computed_sq.data() : nullptr;
    scorer.score(first, n, dots.data(), sq_out);
    const float* sq = !need_sq ? nullptr : cached_sq ? cached_sq + first : computed_sq.data();
    for (int64_t b = 0; b < B; ++b)
      heaps.template push<M>(b, dots.data() + b * n, sq, n, first, exclude ? exclude[b] : -1);
  }
  return heaps;
}

template <Metric M>
std::vector<RowHeaps> scan_all(const SearchInputs& in, const Plan& plan) {
  const int64_t N = in.keys.size(0);
  const int64_t tiles = (N + plan.tile - 1) / plan.tile;
  // Small searches stay on one thread: an OpenMP wake-up costs more than they do.
  const int64_t work = N * in.queries.size(1) * std::max<int64_t>(1, in.queries.size(0));
  const int64_t parts = work < (int64_t(1) << 20)
                            ? 1
                            : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  std::vector<RowHeaps> out(parts, RowHeaps(0, plan.keep));
  // One contiguous, tile-aligned key range per part; BLAS calls inside run single-threaded.
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t0 = tiles * p / parts, t1 = tiles * (p + 1) / parts;
      out[p] = scan_range<M>(in, plan, t0 * plan.tile, std::min(N, t1 * plan.tile));
    }
  });
  return out;
}

float squared_norm(const float* x, int64_t D) {
  float s = 0.0f;
  for (int64_t d = 0; d < D; ++d) s += x[d] * x[d];
  return s;
}

// Writes the k results of every row: ranking keys turned into scores.
void finalize(const SearchInputs& in, const Plan& plan,
                              const std::vector<RowHeaps>& parts, at::Tensor& out_scores,
                              at::Tensor& out_indices) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1), k = in.k;
  float* os = out_scores.data_ptr<float>();
  int64_t* oi = out_indices.data_ptr<int64_t>();
  at::parallel_for(0, B, row_grain(plan.keep * 8), [&](int64_t begin, int64_t end) {
    std::vector<float> s(plan.keep);
    std::vector<int64_t> idx(plan.keep);
    TopkMerger merger(plan.keep);
    for (int64_t b = begin; b < end; ++b) {
      // the row's best over all per-thread heaps (heap padding is (-inf, -1) and sorts last)
      merger.clear();
      for (const RowHeaps& h : parts)
        merger.add(h.scores.data() + b * h.keep, h.indices.data() + b * h.keep, h.keep);
      merger.write(s.data(), idx.data());
      const float qq = squared_norm(in.queries.data_ptr<float>() + b * D, D);
      for (int64_t j = 0; j < k; ++j) {
        oi[b * k + j] = idx[j];
        os[b * k + j] = idx[j] < 0 ? -INFINITY : final_score(in.metric, s[j], qq);
      }
    }
  });
}

void search_with_plan(const SearchInputs& in, const Plan& plan, at::Tensor& out_scores,
                      at::Tensor& out_indices) {
  std::vector<RowHeaps> parts;
  switch (in.metric) {
    case Metric::L2: parts = scan_all<Metric::L2>(in, plan); break;
    case Metric::IP: parts = scan_all<Metric::IP>(in, plan); break;
    default: parts = scan_all<Metric::COS>(in, plan); break;
  }
  finalize(in, plan, parts, out_scores, out_indices);
}

// Searches `rows` again exactly on the stream path and writes them into the outputs.
void research_rows(const SearchInputs& in, const std::vector<int64_t>& rows,
                   at::Tensor& out_scores, at::Tensor& out_indices) {
  const at::Tensor row_ids = at::tensor(rows, in.queries.options().dtype(at::kLong));
  SearchInputs sub;
  sub.queries = in.queries.index_select(0, row_ids).contiguous();
  sub.keys = in.keys;
  sub.key_sq_norms = in.key_sq_norms;
  if (in.exclude.defined()) sub.exclude = in.exclude.index_select(0, row_ids).contiguous();
  sub.metric = in.metric;
  sub.k = in.k;
  at::Tensor s = at::empty({int64_t(rows.size()), in.k}, out_scores.options());
  at::Tensor i = at::empty({int64_t(rows.size()), in.k}, out_indices.options());
  search_with_plan(sub, Plan{Path::Stream, 256, in.k}, s, i);
  out_scores.index_copy_(0, row_ids, s);
  out_indices.index_copy_(0, row_ids, i);
}

// After check_knn_search_args and the conversion: queries finite, exclude ids in [-1, N).
void check_search_values(const SearchInputs& in) {
  if (!all_finite(in.queries)) raise_bad_queries(kOp);
  if (!in.exclude.defined()) return;
  const int64_t* e = in.exclude.data_ptr<int64_t>();
  const int64_t N = in.keys.size(0);
  for (int64_t b = 0; b < in.exclude.numel(); ++b)
    if (!valid_id(e[b], N)) raise_bad_exclude(kOp, N, e[b], b);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_search_cpu(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  const std::string& metric,
                                                  const c10::optional<at::Tensor>& key_sq_norms,
                                                  const c10::optional<at::Tensor>& exclude,
                                                  const std::string& plan_name) {
  const SearchArgs args = check_knn_search_args(queries, keys, k, metric, key_sq_norms, exclude,
                                                plan_name, Backend::CPU);
  const auto requested = static_cast<CpuSearchPlan>(args.plan);
  TORCH_CHECK_VALUE(requested != CpuSearchPlan::Bf16 || bf16_dot_available(), kOp,
                    ": plan 'bf16' needs a CPU with AVX512-BF16; this CPU has none (plans here: "
                    "'auto', 'stream', 'gemm_f32')");
  const SearchInputs in = search_inputs(queries, keys, k, args.metric, key_sq_norms, exclude);
  check_search_values(in);
  const int64_t B = in.queries.size(0);
  at::Tensor out_scores = at::empty({B, k}, in.queries.options());
  at::Tensor out_indices = at::empty({B, k}, in.queries.options().dtype(at::kLong));
  if (B == 0) return {out_scores, out_indices};
  const Plan plan = make_plan(B, k, requested);
  if (plan.path != Path::Bf16 && plan.path != Path::Bf16Gemm) {
    search_with_plan(in, plan, out_scores, out_indices);
    return {out_scores, out_indices};
  }
  const std::vector<int64_t> unfinished = knn_search_bf16(
      in.queries, in.keys, k, in.metric,
      in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr,
      out_scores.data_ptr<float>(), out_indices.data_ptr<int64_t>(),
      plan.path == Path::Bf16Gemm ? Bf16Scorer::Gemm : Bf16Scorer::Kernel);
  // rows whose candidate set outgrew its cap (a bound too loose for their data): exact rescan
  if (!unfinished.empty()) research_rows(in, unfinished, out_scores, out_indices);
  return {out_scores, out_indices};
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) { m.impl("knn_search", &knn_search_cpu); }

}  // namespace knnfast::cpu
