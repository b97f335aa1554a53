// knn_kd_loss on CUDA, one block per row (the twin of csrc/cpu/knn_kd_loss_cpu.cpp):
//   loss = ce [(1 - eps)(lse - x_y) + eps (lse - mean x)] + kd KD,
//   KD   = -sum_j w_j log p(t_j)   [+ sum_v P_v log P_v for KL].
// Forward: one read of the row (online log-sum-exp, plus the row sum when eps > 0), then warp
// 0 gathers the k teacher logits; every reduction has a fixed order (deterministic).
// Backward: one pass writes g [(ce + kd M) softmax - ce eps / V] (M: the valid teacher mass,
// cuda/kd_rows.cuh); after a block barrier, thread 0 subtracts the target and teacher terms in
// slot order (no atomics).
#include "cuda/knn_kd_loss.h"
#include "cuda/launch_utils.cuh"
#include "cuda/kd_rows.cuh"
#include "cuda/neighbour_weights.cuh"
#include "cuda/row_logsumexp.cuh"
#include "cuda/vec_load.cuh"

namespace knnfast::cuda {
namespace {

template <typename T, int VEC>
__device__ __forceinline__ float block_row_sum(const T* x, int64_t V, float* scratch) {
  float s = 0.0f;
  for (int64_t c = threadIdx.x; c < V / VEC; c += blockDim.x) {
    float v[VEC];
    load_vec<T, VEC>(x + c * VEC, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) s += v[e];
  }
  return block_sum(s, scratch);
}

template <typename T, int VEC>
__global__ void knn_kd_loss_kernel(const T* logits, int64_t V, const int64_t* targets,
                                   int64_t ignore_index, NeighbourArgs nb, KdWeights w, bool kl,
                                   float* out, unsigned long long* status) {
  __shared__ SoftmaxState scratch[kWarp];
  __shared__ float sum_scratch[kWarp];
  const int64_t r = blockIdx.x;
  const int64_t y = targets[r];
  const NeighbourRow nrow = neighbour_row_stats(nb, r, status, scratch);  // validates all rows
  if (!live_target(y, V, ignore_index, r, status)) {
    if (threadIdx.x == 0) out[r] = 0.0f;
    return;
  }
  const T* x = logits + r * V;
  const SoftmaxState state = block_row_logsumexp<T, VEC>(x, V, nullptr, scratch, r, status);
  const float row_sum = w.smoothing > 0.0f ? block_row_sum<T, VEC>(x, V, sum_scratch) : 0.0f;
  if (threadIdx.x >= kWarp) return;
  const float log_sum = logf(state.sum);
  float kd = 0.0f;
  if (nrow.any) {
    for (int64_t j = threadIdx.x; j < nb.k; j += kWarp) {
      const float lw = slot_log_weight(nb, r, j, nrow);
      if (lw == -INFINITY) continue;
      const int64_t t = load_token(nb.tokens, r * nb.k + j);
      kd -= expf(lw) * ((to_float(x[t]) - state.max) - log_sum);
      if (kl && leads_token(nb, r, j, nrow, t)) {
        const float mass = token_mass_from(nb, r, j, nrow, t);
        if (mass > 0.0f) kd += mass * logf(mass);
      }
    }
    kd = warp_sum(kd);
  }
  if (threadIdx.x != 0) return;
  float ce = -(1.0f - w.smoothing) * ((to_float(x[y]) - state.max) - log_sum);
  if (w.smoothing > 0.0f) ce -= w.smoothing * ((row_sum / float(V) - state.max) - log_sum);
  out[r] = w.ce * ce + w.kd * kd;
}

template <typename T, int VEC>
__global__ void knn_kd_loss_backward_kernel(const float* grad_rows, const T* logits, int64_t V,
                                            const int64_t* targets, int64_t ignore_index,
                                            NeighbourArgs nb, KdWeights w, float* grad,
                                            unsigned long long* status) {
  __shared__ SoftmaxState scratch[kWarp];
  __shared__ float mass_scratch[kWarp];
  const int64_t r = blockIdx.x;
  const int64_t y = targets[r];
  float* out = grad + r * V;
  const NeighbourRow nrow = neighbour_row_stats(nb, r, status, scratch);
  const float g = grad_rows[r];
  if (!live_target(y, V, ignore_index, r, status) || g == 0.0f) {
    for (int64_t c = threadIdx.x; c < V; c += blockDim.x) out[c] = 0.0f;
    return;
  }
  const T* x = logits + r * V;
  const SoftmaxState state = block_row_logsumexp<T, VEC>(x, V, nullptr, scratch, r, status);
  const float log_sum = logf(state.sum);
  const float scale = g * (w.ce + w.kd * teacher_mass(nb, r, nrow, mass_scratch));
  const float add = -g * w.ce * w.smoothing / float(V);
  for (int64_t c = threadIdx.x; c < V / VEC; c += blockDim.x) {
    float v[VEC];
    load_vec<T, VEC>(x + c * VEC, v);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = scale * expf((v[e] - state.max) - log_sum) + add;
    store_vec<VEC>(out + c * VEC, v);
  }
  __syncthreads();  // the dense pass is visible before the sparse corrections
  if (threadIdx.x != 0) return;
  out[y] -= g * w.ce * (1.0f - w.smoothing);
  if (!nrow.any) return;
  for (int64_t j = 0; j < nb.k; ++j) {
    const float lw = slot_log_weight(nb, r, j, nrow);
    if (lw != -INFINITY) out[load_token(nb.tokens, r * nb.k + j)] -= g * w.kd * expf(lw);
  }
}

template <typename T>
bool vector_ok(const void* logits, int64_t V) {
  constexpr int kVec = VecWidth<T>::value;
  return kVec > 1 && V % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
}

template <typename T>
void launch_forward(const void* logits_v, int64_t B, int64_t V, const int64_t* targets,
                    int64_t ignore_index, const NeighbourArgs& nb, KdWeights w, bool kl,
                    float* out, unsigned long long* status, cudaStream_t stream) {
  const T* logits = static_cast<const T*>(logits_v);
  constexpr int kVec = VecWidth<T>::value;
  if (vector_ok<T>(logits, V)) {
    knn_kd_loss_kernel<T, kVec><<<row_grid(B), row_threads(V / kVec), 0, stream>>>(
        logits, V, targets, ignore_index, nb, w, kl, out, status);
  } else {
    knn_kd_loss_kernel<T, 1><<<row_grid(B), row_threads(V), 0, stream>>>(
        logits, V, targets, ignore_index, nb, w, kl, out, status);
  }
  check_launch("knn_kd_loss_kernel");
}

template <typename T>
void launch_backward(const float* grad_rows, const void* logits_v, int64_t B, int64_t V,
                     const int64_t* targets, int64_t ignore_index, const NeighbourArgs& nb,
                     KdWeights w, float* grad, unsigned long long* status, cudaStream_t stream) {
  const T* logits = static_cast<const T*>(logits_v);
  constexpr int kVec = VecWidth<T>::value;
  // the output rows are float32: vector stores need V % kVec == 0 for them too
  if (vector_ok<T>(logits, V) && reinterpret_cast<uintptr_t>(grad) % 16 == 0 && V % 4 == 0) {
    knn_kd_loss_backward_kernel<T, kVec><<<row_grid(B), row_threads(V / kVec), 0, stream>>>(
        grad_rows, logits, V, targets, ignore_index, nb, w, grad, status);
  } else {
    knn_kd_loss_backward_kernel<T, 1><<<row_grid(B), row_threads(V), 0, stream>>>(
        grad_rows, logits, V, targets, ignore_index, nb, w, grad, status);
  }
  check_launch("knn_kd_loss_backward_kernel");
}

}  // namespace

void launch_knn_kd_loss(const void* logits, FloatType type, int64_t B, int64_t V,
                        const int64_t* targets, int64_t ignore_index, const NeighbourArgs& nb,
                        KdWeights w, bool kl, float* out, unsigned long long* status,
                        cudaStream_t stream) {
  if (B == 0) return;
  switch (type) {
    case FloatType::F32:
      return launch_forward<float>(logits, B, V, targets, ignore_index, nb, w, kl, out, status, stream);
    case FloatType::F16:
      return launch_forward<__half>(logits, B, V, targets, ignore_index, nb, w, kl, out, status, stream);
    case FloatType::BF16:
      return launch_forward<__nv_bfloat16>(logits, B, V, targets, ignore_index, nb, w, kl, out,
                                           status, stream);
    case FloatType::F64:
      return launch_forward<double>(logits, B, V, targets, ignore_index, nb, w, kl, out, status, stream);
  }
}

void launch_knn_kd_loss_backward(const float* grad_rows, const void* logits, FloatType type,
                                 int64_t B, int64_t V, const int64_t* targets,
                                 int64_t ignore_index, const NeighbourArgs& nb, KdWeights w,
                                 float* grad, unsigned long long* status, cudaStream_t stream) {
  if (B == 0) return;
  switch (type) {
    case FloatType::F32:
      return launch_backward<float>(grad_rows, logits, B, V, targets, ignore_index, nb, w, grad,
                                    status, stream);
    case FloatType::F16:
      return launch_backward<__half>(grad_rows, logits, B, V, targets, ignore_index, nb, w, grad,
                                     status, stream);
    case FloatType::BF16:
      return launch_backward<__nv_bfloat16>(grad_rows, logits, B, V, targets, ignore_index, nb, w,
                                            grad, status, stream);
    case FloatType::F64:
      return launch_backward<double>(grad_rows, logits, B, V, targets, ignore_index, nb, w, grad,
                                     status, stream);
  }
}

}  // namespace knnfast::cuda
