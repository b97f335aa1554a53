// knn_search_lists on CPU: exact top-k over the inverted lists each query probes (the search
// step of an IVF index with exact in-list scores), in one call for the whole batch.
//
// FAISS's IVF-Flat scans the lists query by query. Here the probes are inverted first (list ->
// the queries that probe it), so every probed list is read once per call and scored against
// all of its queries with dot_tile16 (list_scan.h: keys converted to fp32 16 at a time, |k|^2
// and the 16 dots of a query each summed by one transpose tree): every key read serves all the
// queries that probe its list. The heaps see only the keys rank_above finds above their root.
// Lists are split into one contiguous run per thread, balanced by work (queries x keys); each
// thread keeps its own per-row heaps, merged at the end. Keys are visited in increasing row
// order within a thread, so ties go to the smaller row exactly as in knn_search. This is plan
// "scan" (auto without a pack); plan "rescore" runs CUDA's composition
// (common/lists_rescore.h) instead, plans "bf16" and "int8" a pack of bf16 / int8 residuals
// with exact rescoring (knn_search_lists_bf16.h, knn_search_lists_int8.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/lists_rescore.h"
#include "common/plans.h"
#include "cpu/cpu_utils.h"
#include "cpu/bf16_dot.h"
#include "cpu/knn_rescore_cpu.h"
#include "cpu/int8_dot.h"
#include "cpu/knn_search_lists_bf16.h"
#include "cpu/knn_search_lists_int8.h"
#include "cpu/list_scan.h"
#include "cpu/topk_merge.h"

namespace knnfast::cpu {
namespace {

constexpr const char* kOp = "knn_search_lists";
constexpr int64_t kTile = 256;  // keys per dot_tile call

// Running top-k of every query row, as min-heaps (worst at the root), like knn_search's.
struct Heaps {
  int64_t k;
  std::vector<float> scores;
  std::vector<int64_t> ids;
  Heaps(int64_t rows, int64_t k_) : k(k_), scores(rows * k_, -INFINITY), ids(rows * k_, -1) {}
};

template <Metric M>
void scan_lists(const SearchInputs& in, const int64_t* offsets, const ListQueries& lq,
                int64_t l0, int64_t l1, Heaps& heaps) {
  const int64_t D = in.queries.size(1);
  const float* q = in.queries.data_ptr<float>();
  const char* keys = static_cast<const char*>(in.keys.data_ptr());
  const int64_t row_bytes = D * in.keys.element_size();
  const int64_t* exclude = in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr;
  std::vector<float> group, dots, key_sq(kTile), block(dot_tile16_block_floats(D));
  std::vector<int32_t> above(kTile);
  for (int64_t l = l0; l < l1; ++l) {
    const int64_t m = lq.start[l + 1] - lq.start[l];
    if (m == 0 || offsets[l + 1] == offsets[l]) continue;
    const int64_t* rows = lq.rows.data() + lq.start[l];
    group.resize(m * D);  // the list's queries, contiguous for the dot kernel
    for (int64_t i = 0; i < m; ++i)
      std::memcpy(group.data() + i * D, q + rows[i] * D, D * sizeof(float));
    dots.resize(m * kTile);
    for (int64_t first = offsets[l]; first < offsets[l + 1]; first += kTile) {
      const int64_t n = std::min(kTile, offsets[l + 1] - first);
      dot_tile16(group.data(), m, keys + first * row_bytes, in.keys.scalar_type(), n, D,
                 dots.data(), n, M == Metric::IP ? nullptr : key_sq.data(), block.data());
      for (int64_t i = 0; i < m; ++i) {
        const int64_t b = rows[i];
        float* hs = heaps.scores.data() + b * heaps.k;
        int64_t* hi = heaps.ids.data() + b * heaps.k;
        const int64_t skip = exclude ? exclude[b] : -1;
        float* d = dots.data() + i * n;
        // rows increase within a thread, so a tie never displaces: strict > (NaN never
        // passes); the root only rises, so keys above the tile's first root are all we test
        const int64_t count = rank_above(M, d, key_sq.data(), n, hs[0], above.data());
        for (int64_t c = 0; c < count; ++c) {
          const int64_t j = above[c];
          if (d[j] > hs[0] && first + j != skip) heap_replace_root(hs, hi, heaps.k, d[j], first + j);
        }
      }
    }
  }
}

// The per-thread heaps of each row merged, ranking keys turned into scores.
void finalize(const SearchInputs& in, const std::vector<Heaps>& parts, at::Tensor& out_s,
              at::Tensor& out_i) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1), k = in.k;
  const float* q = in.queries.data_ptr<float>();
  float* os = out_s.data_ptr<float>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  at::parallel_for(0, B, row_grain(k * 8 * int64_t(parts.size())), [&](int64_t b0, int64_t b1) {
    TopkMerger merger(k);
    for (int64_t b = b0; b < b1; ++b) {
      merger.clear();
      for (const Heaps& h : parts) merger.add(h.scores.data() + b * k, h.ids.data() + b * k, k);
      merger.write(os + b * k, oi + b * k);
      float qq = 0.0f;
      for (int64_t d = 0; d < D; ++d) qq += q[b * D + d] * q[b * D + d];
      for (int64_t j = 0; j < k; ++j)
        if (oi[b * k + j] >= 0) os[b * k + j] = final_score(in.metric, os[b * k + j], qq);
    }
  });
}

// Values after the argument checks: finite queries, offsets a partition of the N rows,
// probes in [-1, L), exclude in [-1, N).
void check_values(const SearchInputs& in, const at::Tensor& offsets, const at::Tensor& probes) {
  if (!all_finite(in.queries)) raise_bad_queries(kOp);
  const int64_t N = in.keys.size(0), L = offsets.size(0) - 1;
  const int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t l = 0; l <= L; ++l) {
    const bool ok = l == 0 ? o[0] == 0 : o[l] >= o[l - 1] && (l < L || o[l] == N);
    if (!ok || o[l] > N) raise_bad_offsets(kOp, N, o[l], l);
  }
  checked_ids(probes, L, kOp, "probes");
  if (!in.exclude.defined()) return;
  const int64_t* e = in.exclude.data_ptr<int64_t>();
  for (int64_t b = 0; b < in.exclude.numel(); ++b)
    if (!valid_id(e[b], N)) raise_bad_exclude(kOp, N, e[b], b);
}

// Plan scan, after the value checks.
std::tuple<at::Tensor, at::Tensor> scan(const SearchInputs& in, const at::Tensor& offsets,
                                        const at::Tensor& probes) {
  const int64_t B = in.queries.size(0), L = offsets.size(0) - 1, k = in.k;
  at::Tensor out_s = at::empty({B, k}, in.queries.options());
  at::Tensor out_i = at::empty({B, k}, in.queries.options().dtype(at::kLong));
  if (B == 0) return {out_s, out_i};
  const int64_t* o = offsets.data_ptr<int64_t>();
  const ListQueries lq = invert_probes(probes, L);
  const std::vector<int64_t> cut = split_lists(lq, o, L, in.queries.size(1));
  const int64_t parts = int64_t(cut.size()) - 1;
  std::vector<Heaps> heaps(parts, Heaps(B, k));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      switch (in.metric) {
        case Metric::L2: scan_lists<Metric::L2>(in, o, lq, cut[p], cut[p + 1], heaps[p]); break;
        case Metric::IP: scan_lists<Metric::IP>(in, o, lq, cut[p], cut[p + 1], heaps[p]); break;
        default: scan_lists<Metric::COS>(in, o, lq, cut[p], cut[p + 1], heaps[p]); break;
      }
    }
  });
  finalize(in, heaps, out_s, out_i);
  return {out_s, out_i};
}

// Plans bf16 and int8 (knn_search_lists_{bf16,int8}.h, by the pack's kind); rows they could
// not finish are searched by plan scan.
std::tuple<at::Tensor, at::Tensor> search_packed(const SearchInputs& in,
                                                 const at::Tensor& offsets,
                                                 const at::Tensor& probes,
                                                 const ListsPackArgs& args) {
  TORCH_CHECK_VALUE(all_finite(*args.centers), kOp,
                    ": centers must be finite (from knnfast.pack_lists_",
                    args.is_int8() ? "int8" : "bf16", ")");
  const int64_t B = in.queries.size(0);
  at::Tensor out_s = at::empty({B, in.k}, in.queries.options());
  at::Tensor out_i = at::empty({B, in.k}, in.queries.options().dtype(at::kLong));
  if (B == 0) return {out_s, out_i};
  const std::vector<int64_t> unfinished =
      args.is_int8()
          ? knn_search_lists_int8(in, offsets, probes,
                                  {*args.centers, *args.residuals, *args.residual_norms},
                                  out_s.data_ptr<float>(), out_i.data_ptr<int64_t>())
          : knn_search_lists_bf16(in, offsets, probes,
                                  {*args.centers, *args.residuals, *args.residual_norms},
                                  out_s.data_ptr<float>(), out_i.data_ptr<int64_t>());
  if (unfinished.empty()) return {out_s, out_i};
  const at::Tensor rows = at::tensor(unfinished, probes.options());
  at::Tensor sub_probes = at::full_like(probes, -1);  // the other rows probe nothing
  sub_probes.index_copy_(0, rows, probes.index_select(0, rows));
  const auto [s, i] = scan(in, offsets, sub_probes);
  out_s.index_copy_(0, rows, s.index_select(0, rows));
  out_i.index_copy_(0, rows, i.index_select(0, rows));
  return {out_s, out_i};
}

// auto: the pack's plan where this CPU has its dot instruction, else scan.
CpuListsPlan auto_plan(const ListsPackArgs& pack) {
  if (!pack.given()) return CpuListsPlan::Scan;
  if (pack.is_int8()) return int8_dot_available() ? CpuListsPlan::Int8 : CpuListsPlan::Scan;
  return bf16_dot_available() ? CpuListsPlan::Bf16 : CpuListsPlan::Scan;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_search_lists_cpu(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& list_offsets,
    const at::Tensor& probes_in, int64_t k, const std::string& metric,
    const c10::optional<at::Tensor>& exclude, const std::string& plan,
    const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& residuals,
    const c10::optional<at::Tensor>& residual_norms) {
  const ListsPackArgs pack{centers, residuals, residual_norms};
  const SearchArgs args = check_knn_search_lists_args(queries, keys, list_offsets, probes_in, k,
                                                      metric, exclude, plan, pack, Backend::CPU);
  const SearchInputs in = search_inputs(queries, keys, k, args.metric, c10::nullopt, exclude);
  const at::Tensor offsets = as_int64(list_offsets);
  const at::Tensor probes = as_int64(probes_in);
  CpuListsPlan chosen = static_cast<CpuListsPlan>(args.plan);
  if (chosen == CpuListsPlan::Auto) chosen = auto_plan(pack);
  if (chosen == CpuListsPlan::Rescore)
    return knn_search_lists_rescore(in.queries, in.keys, offsets, probes, k, metric, in.exclude,
                                    &knn_rescore_cpu);
  check_values(in, offsets, probes);
  if (chosen == CpuListsPlan::Bf16 || chosen == CpuListsPlan::Int8)
    return search_packed(in, offsets, probes, pack);
  return scan(in, offsets, probes);
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) { m.impl("knn_search_lists", &knn_search_lists_cpu); }

}  // namespace knnfast::cpu
