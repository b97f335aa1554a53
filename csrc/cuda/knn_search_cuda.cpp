// knn_search on CUDA: argument checks, plan choice and the orchestration of the kernels in
// knn_search.cu (see knn_search.h for the stream and tensor plans).
//
// plan="stream"|"tensor" forces a plan (tests, benchmarks); "tensor" applies only where it can
// (fp16/bf16 keys, k <= 256; elsewhere the stream plan runs). plan="tensor_recheck" is the
// tensor plan with every proof failed, which tests the exact re-search of unproven rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cuda/cuda_utils.h"
#include "cuda/knn_rescore.h"
#include "cuda/knn_search.h"

namespace knnfast::cuda {
namespace {

constexpr const char* kOp = "knn_search";
constexpr int64_t kTensorMaxK = 256;
constexpr int64_t kTensorMinRows = 33;
constexpr int64_t kTileBytes = int64_t(256) << 20;  // GEMM tile output, [B, T] float32

const int64_t* exclude_ptr(const SearchInputs& in) {
  return in.exclude.defined() ? in.exclude.data_ptr<int64_t>() : nullptr;
}

// Exact search of `in` on the stream plan into out_scores / out_indices [B, k]. `validate`:
// check the exclude ids (off when re-searching rows the tensor plan already checked).
// needs [B] int32 (optional): search only the groups of rows with a marked row and write only
// the marked rows (the tensor plan's unproven rows, chosen on the device: no host sync).
void stream_plan(const SearchInputs& in, at::Tensor& out_scores, at::Tensor& out_indices,
                 const at::Tensor& status, bool validate = true,
                 const at::Tensor& needs = at::Tensor()) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1), N = in.keys.size(0), k = in.k;
  const int64_t group = std::min<int64_t>(stream_scan_max_rows(D), B);
  TORCH_CHECK_VALUE(group >= 1, kOp, ": D = ", D,
                    " is too large for the CUDA stream search (one query row must fit in "
                    "shared memory)");
  const int parts = stream_scan_parts(N, k);
  const auto f32 = in.queries.options();
  at::Tensor list_scores = at::empty({parts, group, k}, f32);
  at::Tensor list_indices = at::empty({parts, group, k}, f32.dtype(at::kLong));
  const cudaStream_t stream = current_stream();
  for (int64_t g0 = 0; g0 < B; g0 += group) {
    const int64_t G = std::min(group, B - g0);
    list_scores.fill_(-INFINITY);
    list_indices.fill_(-1);
    StreamScanArgs a;
    a.queries = in.queries.data_ptr<float>() + g0 * D;
    a.G = G;
    a.D = D;
    a.keys = in.keys.data_ptr();
    a.key_type = float_type(in.keys);
    a.N = N;
    a.metric = static_cast<int>(in.metric);
    a.key_sq_norms = in.key_sq_norms.defined() ? in.key_sq_norms.data_ptr<float>() : nullptr;
    a.exclude = in.exclude.defined() ? exclude_ptr(in) + g0 : nullptr;
    a.K = k;
    a.parts = parts;
    a.list_scores = list_scores.data_ptr<float>();
    a.list_indices = list_indices.data_ptr<int64_t>();
    a.needs = needs.defined() ? needs.data_ptr<int32_t>() + g0 : nullptr;
    launch_stream_scan(a, stream);
    MergeArgs m;
    m.in_scores = a.list_scores;
    m.in_indices = a.list_indices;
    m.parts = parts;
    m.part_stride = G * k;
    m.row_stride = k;
    m.K_in = k;
    m.rows = G;
    m.out_scores = out_scores.data_ptr<float>() + g0 * k;
    m.out_indices = out_indices.data_ptr<int64_t>() + g0 * k;
    m.K_out = k;
    m.finalize = true;
    m.metric = a.metric;
    m.queries = a.queries;
    m.D = D;
    m.exclude = validate ? a.exclude : nullptr;
    m.N = N;
    m.row_offset = g0;
    m.needs = a.needs;
    launch_merge_lists(m, status_ptr(status), stream);
  }
}

// Power-of-two scale per query row putting max |q| in [0.5, 1) (exactly representable, so
// scaling is exact and the 16-bit rounding error stays relative): (scale, 1 / scale).
std::pair<at::Tensor, at::Tensor> query_scales(const at::Tensor& queries) {
  const at::Tensor amax = queries.abs().amax(1);
  const at::Tensor exponent = std::get<1>(at::frexp(amax)).clamp(-100, 126).to(at::kInt);
  auto power_of_two = [](const at::Tensor& e) {  // 2^e built from the exponent bits
    return at::bitwise_left_shift(e + 127, 23).view(at::kFloat);
  };
  return {power_of_two(-exponent), power_of_two(exponent)};
}

// Tensor-core plan, step 1: cuBLAS GEMM tiles of the scaled 16-bit queries q_lp against the
// keys, each reduced by select_tile into per-(row, slice) top-Kc lists of ranking keys, then
// merged into the Kc candidates of every row: (cand_keys, cand_indices), each [B, Kc].
std::pair<at::Tensor, at::Tensor> tensor_candidates(const SearchInputs& in, const at::Tensor& q_lp,
                                                    const at::Tensor& inv_scale,
                                                    const at::Tensor& norms, int64_t Kc,
                                                    const at::Tensor& status) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1), N = in.keys.size(0);
  const auto f32 = in.queries.options();
  const cudaStream_t stream = current_stream();
  const int64_t tile = std::min(N, std::max<int64_t>(4096, (kTileBytes / 4 / B) / 256 * 256));
  const int64_t slices = std::clamp<int64_t>((16384 + B - 1) / B, 1, std::max<int64_t>(1, tile / 256));
  at::Tensor list_scores = at::full({B, slices, Kc}, -INFINITY, f32);
  at::Tensor list_indices = at::full({B, slices, Kc}, -1, f32.dtype(at::kLong));
  at::Tensor dots_buffer = at::empty({B * tile}, f32);
  for (int64_t t0 = 0; t0 < N; t0 += tile) {
    const int64_t n = std::min(tile, N - t0);
    at::Tensor dots = dots_buffer.narrow(0, 0, B * n).view({B, n});
    at::mm_out(dots, q_lp, in.keys.narrow(0, t0, n).t(), at::kFloat);
    SelectTileArgs s;
    s.dots = dots.data_ptr<float>();
    s.ld = n;
    s.B = B;
    s.n = n;
    s.t0 = t0;
    s.inv_scale = inv_scale.data_ptr<float>();
    s.key_sq_norms = norms.data_ptr<float>();
    s.exclude = exclude_ptr(in);
    s.metric = static_cast<int>(in.metric);
    s.slices = slices;
    s.K = Kc;
    s.list_scores = list_scores.data_ptr<float>();
    s.list_indices = list_indices.data_ptr<int64_t>();
    launch_select_tile(s, stream);
  }

  at::Tensor cand_keys = at::empty({B, Kc}, f32);
  at::Tensor cand_indices = at::empty({B, Kc}, f32.dtype(at::kLong));
  MergeArgs m;
  m.in_scores = list_scores.data_ptr<float>();
  m.in_indices = list_indices.data_ptr<int64_t>();
  m.parts = slices;
  m.part_stride = Kc;
  m.row_stride = slices * Kc;
  m.K_in = Kc;
  m.rows = B;
  m.out_scores = cand_keys.data_ptr<float>();
  m.out_indices = cand_indices.data_ptr<int64_t>();
  m.K_out = Kc;
  m.finalize = false;
  m.metric = static_cast<int>(in.metric);
  m.queries = in.queries.data_ptr<float>();
  m.D = D;
  m.exclude = nullptr;
  m.N = N;
  m.row_offset = 0;
  launch_merge_lists(m, status_ptr(status), stream);
  return {cand_keys, cand_indices};
}

// Tensor-core plan; returns needs_exact [B] int32, 1 on the rows whose exactness proof failed
// (on the device: no host sync). fail_proofs: every row counts as unproven (tensor_recheck).
at::Tensor tensor_plan(const SearchInputs& in, at::Tensor& out_scores, at::Tensor& out_indices,
                       const at::Tensor& status, bool fail_proofs) {
  const int64_t B = in.queries.size(0), D = in.queries.size(1), N = in.keys.size(0), k = in.k;
  const int64_t Kc = std::max(2 * k, k + 32);
  const auto f32 = in.queries.options();
  const cudaStream_t stream = current_stream();

  // |k|^2: the caller's cache (Datastore keeps one, computed in fp32 from the stored keys; the
  // op's contract, as on the stream plan, is that a cache holds exactly those norms), else
  // computed here once per call over all N keys
  at::Tensor norms = in.key_sq_norms;
  if (!norms.defined()) {
    norms = at::empty({N}, f32);
    launch_key_sq_norms(in.keys.data_ptr(), float_type(in.keys), N, D, norms.data_ptr<float>(),
                        stream);
  }
  const at::Tensor kmax_sq = norms.amax().reshape({1}).contiguous();
  auto [scale, inv_scale] = query_scales(in.queries);
  const at::Tensor q_lp = (in.queries * scale.unsqueeze(1)).to(in.keys.scalar_type());
  const auto [cand_keys, cand_indices] = tensor_candidates(in, q_lp, inv_scale, norms, Kc, status);

  at::Tensor cand_exact = at::empty({B, Kc}, f32);
  launch_knn_rescore(in.queries.data_ptr<float>(), in.keys.data_ptr(), float_type(in.keys), B,
                     N, D, cand_indices.data_ptr<int64_t>(), Kc, static_cast<int>(in.metric),
                     cand_exact.data_ptr<float>(), status_ptr(status), stream);

  at::Tensor needs_exact = at::empty({B}, f32.dtype(at::kInt));
  const bool fp16 = in.keys.scalar_type() == at::kHalf;
  VerifyArgs v;
  v.queries = in.queries.data_ptr<float>();
  v.B = B;
  v.D = D;
  v.metric = static_cast<int>(in.metric);
  v.cand_keys = cand_keys.data_ptr<float>();
  v.cand_indices = cand_indices.data_ptr<int64_t>();
  v.cand_exact = cand_exact.data_ptr<float>();
  v.Kc = Kc;
  v.k = k;
  v.unit = fp16 ? std::ldexp(1.0f, -11) : std::ldexp(1.0f, -8);
  v.tiny = fp16 ? std::ldexp(1.0f, -25) : 1.2e-38f;
  v.scale = scale.data_ptr<float>();
  v.kmax_sq = kmax_sq.data_ptr<float>();
  v.out_scores = out_scores.data_ptr<float>();
  v.out_indices = out_indices.data_ptr<int64_t>();
  v.needs_exact = needs_exact.data_ptr<int32_t>();
  v.exclude = exclude_ptr(in);
  v.N = N;
  launch_verify(v, status_ptr(status), stream);
  if (fail_proofs) needs_exact.fill_(1);
  return needs_exact;
}

bool use_tensor_plan(const SearchInputs& in, CudaSearchPlan plan) {
  const auto t = in.keys.scalar_type();
  const bool possible = (t == at::kHalf || t == at::kBFloat16) && in.k <= kTensorMaxK;
  switch (plan) {
    case CudaSearchPlan::Stream: return false;
    case CudaSearchPlan::Tensor:
    case CudaSearchPlan::TensorRecheck: return possible;
    default: return possible && in.queries.size(0) >= kTensorMinRows;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_search_cuda(const at::Tensor& queries,
                                                   const at::Tensor& keys, int64_t k,
                                                   const std::string& metric,
                                                   const c10::optional<at::Tensor>& key_sq_norms,
                                                   const c10::optional<at::Tensor>& exclude,
                                                   const std::string& plan_name) {
  const SearchArgs args = check_knn_search_args(queries, keys, k, metric, key_sq_norms, exclude,
                                                plan_name, Backend::CUDA);
  const auto plan = static_cast<CudaSearchPlan>(args.plan);
  const c10::cuda::CUDAGuard guard(queries.device());
  const SearchInputs in = search_inputs(queries, keys, k, args.metric, key_sq_norms, exclude);
  const int64_t B = in.queries.size(0);
  at::Tensor out_scores = at::empty({B, k}, in.queries.options());
  at::Tensor out_indices = at::empty({B, k}, in.queries.options().dtype(at::kLong));
  if (B == 0) return {out_scores, out_indices};
  const at::Tensor status = new_status(queries.device());
  if (use_tensor_plan(in, plan)) {
    const bool fail_proofs = plan == CudaSearchPlan::TensorRecheck;
    const at::Tensor unproven = tensor_plan(in, out_scores, out_indices, status, fail_proofs);
    // the unproven rows searched again exactly; their groups only, decided on the device
    stream_plan(in, out_scores, out_indices, status, /*validate=*/false, unproven);
  } else {
    stream_plan(in, out_scores, out_indices, status);
  }
  StatusContext c;
  c.op = kOp;
  c.exclude = in.exclude;
  c.entries = in.keys.size(0);
  raise_on_status(status, c);
  return {out_scores, out_indices};
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("knn_search", &knn_search_cuda); }

}  // namespace knnfast::cuda
