// knn_probs / knn_probs_sparse on CUDA: one block per row. The block reduces the row's
// neighbour softmax statistics; then every slot that leads its token writes the token's
// summed probability with a plain store (no atomics, so results are deterministic).
#include "cuda/knn_probs.h"
#include "cuda/launch_utils.cuh"
#include "cuda/neighbour_weights.cuh"

namespace knnfast::cuda {
namespace {

__global__ void knn_probs_kernel(NeighbourArgs nb, int64_t V, float* probs,
                                 unsigned long long* status) {
  __shared__ SoftmaxState scratch[kWarp];
  const int64_t r = blockIdx.x;
  const NeighbourRow row = neighbour_row_stats(nb, r, status, scratch);
  if (!row.any) return;  // no valid neighbour: the row stays all zeros
  for (int64_t j = threadIdx.x; j < nb.k; j += blockDim.x) {
    if (slot_log_weight(nb, r, j, row) == -INFINITY) continue;
    const int64_t token = load_token(nb.tokens, r * nb.k + j);
    if (leads_token(nb, r, j, row, token)) probs[r * V + token] = token_mass_from(nb, r, j, row, token);
  }
}

__global__ void knn_probs_sparse_kernel(NeighbourArgs nb, int64_t* tokens_u, float* probs,
                                        unsigned long long* status) {
  __shared__ SoftmaxState scratch[kWarp];
  const int64_t r = blockIdx.x;
  const NeighbourRow row = neighbour_row_stats(nb, r, status, scratch);
  if (!row.any) return;  // prefilled (-1, 0)
  for (int64_t j = threadIdx.x; j < nb.k; j += blockDim.x) {
    if (slot_log_weight(nb, r, j, row) == -INFINITY) continue;
    const int64_t token = load_token(nb.tokens, r * nb.k + j);
    if (!leads_token(nb, r, j, row, token)) continue;
    tokens_u[r * nb.k + j] = token;
    probs[r * nb.k + j] = token_mass_from(nb, r, j, row, token);
  }
}

}  // namespace

void launch_knn_probs(const NeighbourArgs& nb, int64_t B, int64_t V, float* probs,
                      unsigned long long* status, cudaStream_t stream) {
  if (B == 0) return;
  knn_probs_kernel<<<row_grid(B), row_threads(nb.k), 0, stream>>>(nb, V, probs, status);
  check_launch("knn_probs_kernel");
}

void launch_knn_probs_sparse(const NeighbourArgs& nb, int64_t B, int64_t* tokens_u,
                             float* probs, unsigned long long* status, cudaStream_t stream) {
  if (B == 0) return;
  knn_probs_sparse_kernel<<<row_grid(B), row_threads(nb.k), 0, stream>>>(nb, tokens_u, probs,
                                                                          status);
  check_launch("knn_probs_sparse_kernel");
}

}  // namespace knnfast::cuda
