// knn_search_lists on CUDA: argument checks (common/op_checks.h), then a composition of ATen
// ops around knn_rescore's CUDA wrapper (no kernel of its own yet): each row's distinct probed
// lists are expanded into candidate rows [B, P x M] (M = the longest probed list), scored
// exactly by knn_rescore_cuda, and the k best taken in knn_search's total order (score
// descending, ties to the smaller row). Memory is B x P x M candidates; it synchronizes for the
// value checks and for M. A fused kernel (one block per list and its queries, as the CPU
// kernel groups them) is the next step; this path has never run on a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "cuda/cuda_utils.h"
#include "cuda/knn_rescore_cuda.h"

namespace knnfast::cuda {
namespace {

constexpr const char* kOp = "knn_search_lists";

// The position of the first true element of a bool tensor, or -1 (one host sync).
int64_t first_true(const at::Tensor& mask) {
  const at::Tensor at_ = mask.reshape({-1}).nonzero();
  return at_.numel() ? at_[0][0].item<int64_t>() : -1;
}

// The CPU kernel's value checks (common/messages.h texts), on the device with host syncs.
void check_values(const at::Tensor& queries, const at::Tensor& offsets, const at::Tensor& probes,
                  const at::Tensor& exclude, int64_t N) {
  if (!at::isfinite(queries).all().item<bool>()) raise_bad_queries(kOp);
  const int64_t L = offsets.size(0) - 1;
  at::Tensor bad = offsets.gt(N);
  bad[0].logical_or_(offsets[0].ne(0));
  bad.slice(0, 1).logical_or_(offsets.slice(0, 1).lt(offsets.slice(0, 0, L)));
  bad[L].logical_or_(offsets[L].ne(N));
  int64_t pos = first_true(bad);
  if (pos >= 0) raise_bad_offsets(kOp, N, offsets[pos].item<int64_t>(), pos);
  pos = first_true(probes.lt(-1).logical_or_(probes.ge(L)));
  if (pos >= 0) raise_bad_id(kOp, "probes", L, probes.reshape({-1})[pos].item<int64_t>(), pos);
  if (!exclude.defined()) return;
  pos = first_true(exclude.lt(-1).logical_or_(exclude.ge(N)));
  if (pos >= 0) raise_bad_exclude(kOp, N, exclude[pos].item<int64_t>(), pos);
}

// Candidate rows [B, P * M] of each row's distinct probed lists (-1: none, or excluded).
at::Tensor candidates(const at::Tensor& offsets, const at::Tensor& probes,
                      const at::Tensor& exclude) {
  const int64_t L = offsets.size(0) - 1;
  const at::Tensor sorted = std::get<0>(probes.sort(1));
  at::Tensor drop = sorted.lt(0);
  drop.slice(1, 1).logical_or_(sorted.slice(1, 1).eq(sorted.slice(1, 0, -1)));
  const at::Tensor lists = sorted.clamp_min(0);
  const at::Tensor sizes = offsets.slice(0, 1) - offsets.slice(0, 0, L);
  const at::Tensor first = offsets.index_select(0, lists.reshape({-1})).view_as(lists);
  const at::Tensor count =
      sizes.index_select(0, lists.reshape({-1})).view_as(lists).masked_fill(drop, 0);
  const int64_t M = std::max<int64_t>(1, count.max().item<int64_t>());
  const at::Tensor step = at::arange(M, offsets.options());
  const at::Tensor cand = first.unsqueeze(2) + step;
  at::Tensor keep = step.lt(count.unsqueeze(2));
  if (exclude.defined()) keep.logical_and_(cand.ne(exclude.view({-1, 1, 1})));
  return cand.masked_fill(keep.logical_not(), -1).view({probes.size(0), -1});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_search_lists_cuda(
    const at::Tensor& queries_in, const at::Tensor& keys_in, const at::Tensor& list_offsets,
    const at::Tensor& probes_in, int64_t k, const std::string& metric_name,
    const c10::optional<at::Tensor>& exclude_in) {
  check_knn_search_lists_args(queries_in, keys_in, list_offsets, probes_in, k, metric_name,
                              exclude_in, Backend::CUDA);
  const at::Device device = queries_in.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor queries = as_float32(queries_in);
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor offsets = as_int64(list_offsets);
  const at::Tensor probes = as_int64(probes_in);
  const at::Tensor exclude = exclude_in.has_value() ? as_int64(*exclude_in) : at::Tensor();
  const int64_t B = queries.size(0);
  check_values(queries, offsets, probes, exclude, keys.size(0));
  if (B == 0)
    return {at::empty({0, k}, queries.options()), at::empty({0, k}, offsets.options())};
  const at::Tensor cand = candidates(offsets, probes, exclude).contiguous();
  const int64_t C = cand.size(1);
  // the candidate ids are valid by construction; knn_rescore_cuda checks them anyway
  at::Tensor scores = knn_rescore_cuda(queries, keys, cand, metric_name);
  // NaN keys are never returned, like knn_search; then score descending, ties to smaller row
  scores = scores.nan_to_num(-std::numeric_limits<float>::infinity());
  const at::Tensor id_key = cand.masked_fill(cand.lt(0), std::numeric_limits<int64_t>::max());
  const at::Tensor by_id = std::get<1>(id_key.sort(/*stable=*/true, 1, false));
  const at::Tensor s1 = scores.gather(1, by_id), i1 = cand.gather(1, by_id);
  const at::Tensor by_score = std::get<1>(s1.sort(/*stable=*/true, 1, true));
  const int64_t take = std::min(k, C);
  at::Tensor out_s = at::full({B, k}, -std::numeric_limits<float>::infinity(), queries.options());
  at::Tensor out_i = at::full({B, k}, -1, offsets.options());
  const at::Tensor top = by_score.slice(1, 0, take);
  out_s.slice(1, 0, take).copy_(s1.gather(1, top));
  out_i.slice(1, 0, take).copy_(i1.gather(1, top));
  out_i.masked_fill_(out_s.isneginf(), -1);
  return {out_s, out_i};
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("knn_search_lists", &knn_search_lists_cuda); }

}  // namespace knnfast::cuda
