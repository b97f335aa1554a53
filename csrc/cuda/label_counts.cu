// label_counts on CUDA: one block per row. Slot j is "new" when its token is valid and no
// earlier slot holds it; the counts are the inclusive prefix sum of that flag, computed in
// chunks of blockDim slots with cub::BlockScan and a running carry.
#include <cub/block/block_scan.cuh>

#include "cuda/cuda_common.cuh"
#include "cuda/label_counts.h"
#include "cuda/launch_utils.cuh"

namespace knnfast::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void label_counts_kernel(const int64_t* tokens, int64_t k, int64_t* counts,
                                    unsigned long long* status) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int64_t* row = tokens + static_cast<int64_t>(blockIdx.x) * k;
  int64_t* out = counts + static_cast<int64_t>(blockIdx.x) * k;
  int64_t carry = 0;
  for (int64_t base = 0; base < k; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    int64_t is_new = 0;
    if (j < k) {
      const int64_t token = load_token(row, j);
      if (!valid_id(token, -1)) report(status, kBadToken, static_cast<int64_t>(blockIdx.x) * k + j);
      if (token >= 0) {
        is_new = 1;
        for (int64_t i = 0; i < j; ++i) {
          if (load_token(row, i) == token) {
            is_new = 0;
            break;
          }
        }
      }
    }
    int64_t inclusive = 0, chunk_total = 0;
    Scan(scan_storage).InclusiveSum(is_new, inclusive, chunk_total);
    if (j < k) out[j] = carry + inclusive;
    carry += chunk_total;
    __syncthreads();  // scan_storage is reused by the next chunk
  }
}

}  // namespace

void launch_label_counts(const int64_t* tokens, int64_t B, int64_t k, int64_t* counts,
                         unsigned long long* status, cudaStream_t stream) {
  if (B == 0 || k == 0) return;
  label_counts_kernel<<<row_grid(B), kThreads, 0, stream>>>(tokens, k, counts, status);
  check_launch("label_counts_kernel");
}

}  // namespace knnfast::cuda
