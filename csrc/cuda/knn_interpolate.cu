// knn_interpolate on CUDA: one block per row.
//   pass 1  read the logits row once (16-byte vector loads), online log-sum-exp per thread,
//           block merge; optionally keep the row (as float32) in shared memory;
//   pass 2  write (x - max) + log(1 - lam) - log(sum) (the rounding of torch.log_softmax);
//   pass 3  every neighbour slot that leads its token combines the token's slots with a
//           stable logaddexp and updates that one entry (no atomics, deterministic).
#include "cuda/knn_interpolate.h"
#include "cuda/launch_utils.cuh"
#include "cuda/neighbour_weights.cuh"
#include "cuda/row_logsumexp.cuh"
#include "cuda/vec_load.cuh"

namespace knnfast::cuda {
namespace {

template <typename T, int VEC, bool CACHE>
__global__ void knn_interpolate_kernel(const T* logits, int64_t V, NeighbourArgs nb,
                                       RowScalarArg lam, float* out,
                                       unsigned long long* status) {
  extern __shared__ float4 row_cache_v[];  // V floats when CACHE (float4: 16-byte aligned)
  float* row_cache = reinterpret_cast<float*>(row_cache_v);
  __shared__ SoftmaxState scratch[kWarp];
  const int64_t r = blockIdx.x;
  const T* x = logits + r * V;
  float* o = out + r * V;
  const int64_t chunks = V / VEC;

  const SoftmaxState state =
      block_row_logsumexp<T, VEC>(x, V, CACHE ? row_cache : nullptr, scratch, r, status);

  const NeighbourRow nrow = neighbour_row_stats(nb, r, status, scratch);
  const float lam_r = row_lam(lam, r, status);
  const float lam_eff = nrow.any ? lam_r : 0.0f;  // no valid neighbour: plain log_softmax

  // pass 2; an all -inf row has no model mass anywhere (log_softmax would be NaN)
  const bool empty_row = state.max == -INFINITY;
  const float shift = empty_row ? 0.0f : log1pf(-lam_eff) - logf(state.sum);
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    float v[VEC];
    if constexpr (CACHE) {
      load_floats<VEC>(row_cache + c * VEC, v);
    } else {
      load_vec<T, VEC>(x + c * VEC, v);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = empty_row ? -INFINITY : (v[e] - state.max) + shift;
    store_vec<VEC>(o + c * VEC, v);
  }
  if (!nrow.any) return;
  __syncthreads();  // pass 3 reads entries that other threads wrote in pass 2

  const float log_lam = logf(lam_eff);
  for (int64_t j = threadIdx.x; j < nb.k; j += blockDim.x) {
    if (slot_log_weight(nb, r, j, nrow) == -INFINITY) continue;
    const int64_t token = load_token(nb.tokens, r * nb.k + j);
    if (!leads_token(nb, r, j, nrow, token)) continue;
    o[token] = interpolate_log(o[token], log_lam + token_log_mass_from(nb, r, j, nrow, token));
  }
}

template <typename T, int VEC, bool CACHE>
void launch_typed(const T* logits, int64_t B, int64_t V, const NeighbourArgs& nb,
                  RowScalarArg lam, float* out, unsigned long long* status,
                  cudaStream_t stream) {
  const size_t smem = CACHE ? static_cast<size_t>(V) * sizeof(float) : 0;
  auto kernel = knn_interpolate_kernel<T, VEC, CACHE>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "knn_interpolate shared memory");
  kernel<<<row_grid(B), row_threads(V / VEC), smem, stream>>>(logits, V, nb, lam, out, status);
  check_launch("knn_interpolate_kernel");
}

template <typename T>
void launch_dispatch(const void* logits_v, int64_t B, int64_t V, const NeighbourArgs& nb,
                     RowScalarArg lam, float* out, bool cache_rows,
                     unsigned long long* status, cudaStream_t stream) {
  const T* logits = static_cast<const T*>(logits_v);
  constexpr int kVec = VecWidth<T>::value;
  const bool aligned = kVec > 1 && V % kVec == 0 && V % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0;
  // the row plus the kernel's static reduction scratch must fit the opt-in shared memory
  const bool cache = cache_rows && static_cast<size_t>(V) * sizeof(float) + 1024 <= device_max_smem_optin();
  if (aligned) {
    if (cache) launch_typed<T, kVec, true>(logits, B, V, nb, lam, out, status, stream);
    else launch_typed<T, kVec, false>(logits, B, V, nb, lam, out, status, stream);
  } else {
    if (cache) launch_typed<T, 1, true>(logits, B, V, nb, lam, out, status, stream);
    else launch_typed<T, 1, false>(logits, B, V, nb, lam, out, status, stream);
  }
}

}  // namespace

void launch_knn_interpolate(const void* logits, FloatType type, int64_t B, int64_t V,
                            const NeighbourArgs& nb, RowScalarArg lam, float* out,
                            bool cache_rows, unsigned long long* status, cudaStream_t stream) {
  if (B == 0) return;
  switch (type) {
    case FloatType::F32:
      return launch_dispatch<float>(logits, B, V, nb, lam, out, cache_rows, status, stream);
    case FloatType::F16:
      return launch_dispatch<__half>(logits, B, V, nb, lam, out, cache_rows, status, stream);
    case FloatType::BF16:
      return launch_dispatch<__nv_bfloat16>(logits, B, V, nb, lam, out, cache_rows, status,
                                            stream);
    case FloatType::F64:
      return launch_dispatch<double>(logits, B, V, nb, lam, out, cache_rows, status, stream);
  }
}

}  // namespace knnfast::cuda
