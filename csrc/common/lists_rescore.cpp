// knn_search_lists' plan "rescore" (see lists_rescore.h): device-agnostic ATen code.
#include "common/lists_rescore.h"

#include <algorithm>
#include <limits>

#include "common/messages.h"

namespace knnfast {
namespace {

constexpr const char* kOp = "knn_search_lists";
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The position of the first true element of a bool tensor, or -1 (one host sync).
int64_t first_true(const at::Tensor& mask) {
  const at::Tensor at_ = mask.reshape({-1}).nonzero();
  return at_.numel() ? at_[0][0].item<int64_t>() : -1;
}

// The CPU kernel's value checks (common/messages.h texts), as tensor ops with host syncs.
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

// Candidate rows [B, C] of each row's distinct probed lists, packed one list after the other
// (C = the largest total over the rows; -1 past a row's total, and for its excluded row).
// Padding every list to the longest probed one instead would multiply the work by the lists'
// skew (about 4x on the demo's store).
at::Tensor candidates(const at::Tensor& offsets, const at::Tensor& probes,
                      const at::Tensor& exclude) {
  const int64_t L = offsets.size(0) - 1, B = probes.size(0), P = probes.size(1);
  const at::Tensor sorted = std::get<0>(probes.sort(1));
  at::Tensor drop = sorted.lt(0);
  drop.slice(1, 1).logical_or_(sorted.slice(1, 1).eq(sorted.slice(1, 0, -1)));
  const at::Tensor lists = sorted.clamp_min(0);
  const at::Tensor sizes = offsets.slice(0, 1) - offsets.slice(0, 0, L);
  const at::Tensor first = offsets.index_select(0, lists.reshape({-1})).view_as(lists);
  const at::Tensor count =
      sizes.index_select(0, lists.reshape({-1})).view_as(lists).masked_fill(drop, 0);
  const at::Tensor ends = count.cumsum(1);  // [B, P]: where each list's run ends in the row
  const at::Tensor total = ends.select(1, P - 1).unsqueeze(1);
  const int64_t C = std::max<int64_t>(1, total.max().item<int64_t>());
  const at::Tensor pos = at::arange(C, offsets.options()).expand({B, C}).contiguous();
  // the run holding each position: the first list whose run ends after it
  const at::Tensor slot =
      at::searchsorted(ends, pos, /*out_int32=*/false, /*right=*/true).clamp_max(P - 1);
  const at::Tensor cand = first.gather(1, slot) + pos - (ends - count).gather(1, slot);
  at::Tensor keep = pos.lt(total);
  if (exclude.defined()) keep.logical_and_(cand.ne(exclude.view({-1, 1})));
  return cand.masked_fill(keep.logical_not(), -1);
}

// One int64 per candidate whose order is knn_search's: score descending, then row ascending,
// so that one topk replaces two stable sorts. High 32 bits: the score's bits mapped to an int32
// that orders like the float (NaN is already -inf; -0 is made +0 first because float
// comparison has them equal: knn_rescore's sums never give -0, but l2's exact matches are
// -0 and a scorer mixing both signs must still tie them); low 32 bits: 2^32 - 1 - row (0 for
// the -1 candidates).
at::Tensor order_keys(const at::Tensor& scores, const at::Tensor& cand) {
  const at::Tensor bits = (scores + 0.0).view(at::kInt);
  const at::Tensor monotone = at::where(bits.lt(0), bits.bitwise_xor(0x7FFFFFFF), bits);
  const at::Tensor low = at::where(cand.lt(0), at::zeros({}, cand.options()),
                                   int64_t(0xFFFFFFFF) - cand);
  return monotone.to(at::kLong).mul(int64_t(1) << 32).add_(low);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_search_lists_rescore(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& offsets,
    const at::Tensor& probes, int64_t k, const std::string& metric, const at::Tensor& exclude,
    Rescorer rescore) {
  const int64_t B = queries.size(0);
  check_values(queries, offsets, probes, exclude, keys.size(0));
  TORCH_CHECK_VALUE(keys.size(0) < (int64_t(1) << 32) - 1, kOp, ": plan 'rescore' takes fewer "
                    "than 2^32 - 1 keys, got ", keys.size(0));
  if (B == 0) return {at::empty({0, k}, queries.options()), at::empty({0, k}, offsets.options())};
  const at::Tensor cand = candidates(offsets, probes, exclude).contiguous();
  const int64_t C = cand.size(1);
  at::Tensor scores = rescore(queries, keys, cand, metric);  // -inf for the -1 candidates
  // NaN keys are never returned, like knn_search (only NaN: a +-inf score stays as it is)
  scores = scores.masked_fill(scores.isnan(), kNegInf);
  const int64_t take = std::min(k, C);
  const at::Tensor top = std::get<1>(order_keys(scores, cand).topk(take, 1));
  at::Tensor out_s = at::full({B, k}, kNegInf, queries.options());
  at::Tensor out_i = at::full({B, k}, -1, offsets.options());
  out_s.slice(1, 0, take).copy_(scores.gather(1, top));
  out_i.slice(1, 0, take).copy_(cand.gather(1, top));
  out_i.masked_fill_(out_s.isneginf(), -1);
  return {out_s, out_i};
}

}  // namespace knnfast
