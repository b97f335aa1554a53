// knn_rescore on CUDA: one warp per (query, candidate) pair. Lanes stride over D and keep
// fp32 partial sums of (q - k)^2, q.k, |q|^2 and |k|^2; a fixed-order warp reduction
// combines them (deterministic). Key rows are gathered by id: the datastore is not copied.
#include "cuda/cuda_common.cuh"
#include "cuda/knn_rescore.h"
#include "cuda/launch_utils.cuh"

namespace knnfast::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename KeyT>
__global__ void knn_rescore_kernel(const float* queries, const KeyT* keys, int64_t N,
                                   int64_t D, const int64_t* indices, int64_t B, int64_t k,
                                   Metric metric, float* scores, unsigned long long* status) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t pair = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       pair < B * k; pair += warps) {
    const int64_t b = pair / k;
    if (pair % k == 0) {  // the row's first pair checks the query once, whatever its ids
      bool finite = true;
      for (int64_t d = lane; d < D; d += kWarp) finite &= isfinite(queries[b * D + d]);
      if (__any_sync(kFullMask, !finite) && lane == 0) report(status, kBadQuery, b);
    }
    const int64_t id = indices[pair];
    const bool id_ok = valid_id(id, N);
    if (!id_ok && lane == 0) report(status, kBadToken, pair);
    if (id < 0 || !id_ok) {
      if (lane == 0) scores[pair] = -INFINITY;
      continue;
    }
    const float* q = queries + b * D;
    const KeyT* key = keys + id * D;
    float diff_sq = 0.0f, dot = 0.0f, qq = 0.0f, kk = 0.0f;
    for (int64_t d = lane; d < D; d += kWarp) {
      const float qv = q[d], kv = to_float(key[d]);
      const float diff = qv - kv;
      diff_sq = fmaf(diff, diff, diff_sq);
      dot = fmaf(qv, kv, dot);
      qq = fmaf(qv, qv, qq);
      kk = fmaf(kv, kv, kk);
    }
    diff_sq = warp_sum(diff_sq);
    dot = warp_sum(dot);
    qq = warp_sum(qq);
    kk = warp_sum(kk);
    if (lane == 0) scores[pair] = exact_score(metric, diff_sq, dot, qq, kk);
  }
}

template <typename KeyT>
void launch_typed(const float* queries, const void* keys, int64_t B, int64_t N, int64_t D,
                  const int64_t* indices, int64_t k, Metric metric, float* scores,
                  unsigned long long* status, cudaStream_t stream) {
  const int64_t pairs = B * k;
  const int64_t blocks = (pairs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  knn_rescore_kernel<KeyT><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
      queries, static_cast<const KeyT*>(keys), N, D, indices, B, k, metric, scores, status);
  check_launch("knn_rescore_kernel");
}

}  // namespace

void launch_knn_rescore(const float* queries, const void* keys, FloatType key_type,
                        int64_t B, int64_t N, int64_t D, const int64_t* indices, int64_t k,
                        int metric, float* scores, unsigned long long* status,
                        cudaStream_t stream) {
  if (B == 0 || k == 0) return;
  const Metric m = static_cast<Metric>(metric);
  switch (key_type) {
    case FloatType::F16:
      return launch_typed<__half>(queries, keys, B, N, D, indices, k, m, scores, status, stream);
    case FloatType::BF16:
      return launch_typed<__nv_bfloat16>(queries, keys, B, N, D, indices, k, m, scores, status,
                                         stream);
    default:
      return launch_typed<float>(queries, keys, B, N, D, indices, k, m, scores, status, stream);
  }
}

}  // namespace knnfast::cuda
