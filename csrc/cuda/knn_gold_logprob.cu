// knn_gold_logprob on CUDA: one block per row reads the logits row once (vector loads,
// online log-sum-exp), and warp 0 combines the neighbour slots whose token is the target
// (each lane its strided slots, then a fixed-order warp logaddexp: deterministic).
#include "cuda/knn_gold_logprob.h"
#include "cuda/launch_utils.cuh"
#include "cuda/neighbour_weights.cuh"
#include "cuda/row_logsumexp.cuh"
#include "cuda/vec_load.cuh"

namespace knnfast::cuda {
namespace {

template <typename T, int VEC>
__global__ void knn_gold_logprob_kernel(const T* logits, int64_t V, const int64_t* targets,
                                        int64_t ignore_index, NeighbourArgs nb,
                                        RowScalarArg lam, float* out,
                                        unsigned long long* status) {
  __shared__ SoftmaxState scratch[kWarp];
  const int64_t r = blockIdx.x;
  const int64_t y = targets[r];
  // neighbours and lam are validated on every row, ignored ones included (as on CPU)
  const NeighbourRow nrow = neighbour_row_stats(nb, r, status, scratch);
  const float lam_r = row_lam(lam, r, status);
  if (y == ignore_index) {  // uniform across the block
    if (threadIdx.x == 0) out[r] = 0.0f;
    return;
  }
  if (!valid_target(y, V, ignore_index)) {
    if (threadIdx.x == 0) {
      report(status, kBadTarget, r);
      out[r] = 0.0f;
    }
    return;
  }
  const T* x = logits + r * V;
  const SoftmaxState state = block_row_logsumexp<T, VEC>(x, V, nullptr, scratch, r, status);
  if (threadIdx.x >= kWarp) return;

  const float lam_eff = nrow.any ? lam_r : 0.0f;
  float knn = -INFINITY;
  if (nrow.any) {
    for (int64_t j = threadIdx.x; j < nb.k; j += kWarp)
      if (load_token(nb.tokens, r * nb.k + j) == y) knn = logaddexp(knn, slot_log_weight(nb, r, j, nrow));
    knn = warp_logaddexp(knn);
  }
  if (threadIdx.x != 0) return;
  const float model = state.max == -INFINITY
                          ? -INFINITY
                          : log1pf(-lam_eff) + ((to_float(x[y]) - state.max) - logf(state.sum));
  out[r] = interpolate_log(model, nrow.any ? logf(lam_eff) + knn : -INFINITY);
}

template <typename T>
void launch_typed(const void* logits_v, int64_t B, int64_t V, const int64_t* targets,
                  int64_t ignore_index, const NeighbourArgs& nb, RowScalarArg lam, float* out,
                  unsigned long long* status, cudaStream_t stream) {
  const T* logits = static_cast<const T*>(logits_v);
  constexpr int kVec = VecWidth<T>::value;
  const bool aligned = kVec > 1 && V % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  if (aligned) {
    knn_gold_logprob_kernel<T, kVec><<<row_grid(B), row_threads(V / kVec), 0, stream>>>(
        logits, V, targets, ignore_index, nb, lam, out, status);
  } else {
    knn_gold_logprob_kernel<T, 1><<<row_grid(B), row_threads(V), 0, stream>>>(
        logits, V, targets, ignore_index, nb, lam, out, status);
  }
  check_launch("knn_gold_logprob_kernel");
}

}  // namespace

void launch_knn_gold_logprob(const void* logits, FloatType type, int64_t B, int64_t V,
                             const int64_t* targets, int64_t ignore_index,
                             const NeighbourArgs& nb, RowScalarArg lam, float* out,
                             unsigned long long* status, cudaStream_t stream) {
  if (B == 0) return;
  switch (type) {
    case FloatType::F32:
      return launch_typed<float>(logits, B, V, targets, ignore_index, nb, lam, out, status, stream);
    case FloatType::F16:
      return launch_typed<__half>(logits, B, V, targets, ignore_index, nb, lam, out, status, stream);
    case FloatType::BF16:
      return launch_typed<__nv_bfloat16>(logits, B, V, targets, ignore_index, nb, lam, out,
                                         status, stream);
    case FloatType::F64:
      return launch_typed<double>(logits, B, V, targets, ignore_index, nb, lam, out, status, stream);
  }
}

}  // namespace knnfast::cuda
