// knn_kd_linear_loss on CUDA (the twin of csrc/cpu/knn_kd_linear_loss_cpu.cpp), tiled as Cut
// Cross-Entropy is: a block owns kBT rows x kBV vocabulary columns, computes that logits tile
// (hidden . W^T + b, float32 accumulation, staged through shared memory in kBK-wide slices
// of D) and uses it on chip; no logits ever reach global memory.
//   forward:  a block walks kSpan tiles of its rows and keeps a running (max, sum exp, sum)
//             per row in registers; it writes one partial per row and span, and the target
//             and teacher logits its tiles hold (each has exactly one writer). A per-row
//             kernel merges the spans into the log-sum-exp and forms the loss:
//             cw [(1-eps)(lse - x_y) + eps (lse - mean x)] + kw KD (KD as knn_kd_loss.cu).
//   backward: per-row teacher terms first (slot weights, valid mass M); then each block
//             recomputes its tile, turns it into the gradient
//             G = g [(cw + kw M) softmax - cw eps / V] - g cw (1-eps) [v = y] - g kw P_v
//             in shared memory, and adds G W to grad_hidden, G^T hidden to grad_weight and
//             column sums to grad_bias with float32 atomics (so the backward's last bits
//             depend on scheduling; the forward is deterministic).
// Never ran on a GPU: compile-checked only (make cuda-check).
#include "cuda/kd_rows.cuh"
#include "cuda/knn_kd_linear_loss.h"
#include "cuda/launch_utils.cuh"
#include "cuda/neighbour_weights.cuh"

namespace knnfast::cuda {
namespace {

constexpr int kBT = 64, kBV = 64, kBK = 16, kThreads = 256, kSpan = 8;
constexpr int kBD = 32;  // D slice of the backward's two gradient products
constexpr int kPad = 4;
static_assert(kBT == kBV, "the backward's gradient products share one loop over the tile");

// The logits tile of rows r0.. and columns c0..: thread (ty, tx) = (tid / 16, tid % 16) holds
// rows ty*4 + i, columns tx*4 + j in acc[i][j] (0 beyond T / V; bias added).
template <typename T>
__device__ __forceinline__ void logits_tile(const LinearKdArgs& a, int64_t r0, int64_t c0,
                                            float (*hs)[kBT + kPad], float (*ws)[kBV + kPad],
                                            float acc[4][4]) {
  const T* hidden = static_cast<const T*>(a.hidden);
  const T* weight = static_cast<const T*>(a.weight);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < a.D; k0 += kBK) {
    __syncthreads();  // the previous slice has been read
    for (int e = threadIdx.x; e < kBT * kBK; e += kThreads) {
      const int row = e / kBK, kk = e % kBK;
      const int64_t r = r0 + row, c = c0 + row, d = k0 + kk;
      hs[kk][row] = (r < a.T && d < a.D) ? to_float(hidden[r * a.D + d]) : 0.0f;
      ws[kk][row] = (c < a.V && d < a.D) ? to_float(weight[c * a.D + d]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float h[4], w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) h[i] = hs[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = ws[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += h[i] * w[j];
    }
  }
  if (!a.bias) return;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = c0 + tx * 4 + j;
    const float b = c < a.V ? a.bias[c] : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i][j] += b;
  }
}

// Merges the 16 lanes that hold one row group (lanes xor 8, 4, 2, 1 stay in the group).
__device__ __forceinline__ void merge_row_group(SoftmaxState& s, float& sum, int& bad) {
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) {
    const SoftmaxState other{__shfl_xor_sync(kFullMask, s.max, offset),
                             __shfl_xor_sync(kFullMask, s.sum, offset)};
    s = softmax_state_merge(s, other);
    sum += __shfl_xor_sync(kFullMask, sum, offset);
    bad |= __shfl_xor_sync(kFullMask, bad, offset);
  }
}

// Stores the target and teacher logits of row r that fall in this thread's 4 columns.
__device__ __forceinline__ void pick_logits(const LinearKdArgs& a, int64_t r, int64_t c,
                                            const float acc[4], float* x_target,
                                            float* x_teacher) {
  const int64_t y = a.targets[r];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (y == c + j && c + j < a.V) x_target[r] = acc[j];
  for (int64_t q = 0; q < a.nb.k; ++q) {
    const int64_t t = load_token(a.nb.tokens, r * a.nb.k + q);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (t == c + j && c + j < a.V) x_teacher[r * a.nb.k + q] = acc[j];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    linear_kd_forward_kernel(LinearKdArgs a, float* part, float* x_target, float* x_teacher) {
  __shared__ float hs[kBK][kBT + kPad];
  __shared__ float ws[kBK][kBV + kPad];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t r0 = int64_t(blockIdx.y) * kBT, span0 = int64_t(blockIdx.x) * kBV * kSpan;
  SoftmaxState run[4];
  float run_sum[4];
  int bad[4];  // a NaN / +inf logit: the merges below would not carry it reliably
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    run[i] = softmax_state_empty();
    run_sum[i] = 0.0f;
    bad[i] = 0;
  }
  for (int s = 0; s < kSpan; ++s) {
    const int64_t c0 = span0 + int64_t(s) * kBV;
    if (c0 >= a.V) break;  // uniform over the block
    float acc[4][4];
    logits_tile<T>(a, r0, c0, hs, ws, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      SoftmaxState st = softmax_state_empty();
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (c0 + tx * 4 + j >= a.V) continue;
        bad[i] |= !(acc[i][j] < INFINITY);
        online_add(st, acc[i][j]);
        sum += acc[i][j];
      }
      merge_row_group(st, sum, bad[i]);
      run[i] = softmax_state_merge(run[i], st);
      run_sum[i] += sum;
      const int64_t r = r0 + ty * 4 + i;
      if (r < a.T) pick_logits(a, r, c0 + tx * 4, acc[i], x_target, x_teacher);
    }
  }
  if (tx != 0) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty * 4 + i;
    if (r >= a.T) continue;
    float* p = part + int64_t(blockIdx.x) * 3 * a.T;
    p[r] = bad[i] ? NAN : run[i].max;  // the combine flags the row
    p[a.T + r] = run[i].sum;
    p[2 * a.T + r] = run_sum[i];
  }
}

// One warp per row: merges the spans, validates the row, forms the loss.
__global__ void linear_kd_combine_kernel(LinearKdArgs a, bool kl, int64_t spans,
                                         const float* part, const float* x_target,
                                         const float* x_teacher, float* loss, float* lse_out,
                                         unsigned long long* status) {
  __shared__ SoftmaxState scratch[kWarp];
  const int64_t r = blockIdx.x;
  const NeighbourRow nrow = neighbour_row_stats(a.nb, r, status, scratch);  // validates
  const bool live = live_target(a.targets[r], a.V, a.ignore_index, r, status);
  SoftmaxState st = softmax_state_empty();
  float sum = 0.0f;
  bool bad = false;
  for (int64_t p = threadIdx.x; p < spans; p += kWarp) {
    const float* q = part + p * 3 * a.T;
    bad |= !(q[r] < INFINITY);  // NaN: a bad logit in that span
    st = softmax_state_merge(st, SoftmaxState{q[r], q[a.T + r]});
    sum += q[2 * a.T + r];
  }
  st = warp_merge(st);
  sum = warp_sum(sum);
  const float lse = st.max + logf(st.sum);
  const bool finite = warp_count(bad) == 0 && lse < INFINITY && lse > -INFINITY;
  if (live && !finite && threadIdx.x == 0) report(status, kBadLogitsRow, r);
  if (!live || !finite) {
    if (threadIdx.x == 0) loss[r] = lse_out[r] = 0.0f;
    return;
  }
  float kd = 0.0f;
  for (int64_t j = threadIdx.x; nrow.any && j < a.nb.k; j += kWarp) {
    const float lw = slot_log_weight(a.nb, r, j, nrow);
    if (lw == -INFINITY) continue;
    kd += expf(lw) * (lse - x_teacher[r * a.nb.k + j]);
    const int64_t t = load_token(a.nb.tokens, r * a.nb.k + j);
    if (kl && leads_token(a.nb, r, j, nrow, t)) {
      const float mass = token_mass_from(a.nb, r, j, nrow, t);
      if (mass > 0.0f) kd += mass * logf(mass);
    }
  }
  kd = warp_sum(kd);
  if (threadIdx.x != 0) return;
  const float eps = a.w.smoothing;
  float ce = (1.0f - eps) * (lse - x_target[r]);
  if (eps > 0.0f) ce += eps * (lse - sum / float(a.V));
  loss[r] = a.w.ce * ce + a.w.kd * kd;
  lse_out[r] = lse;
}

// One warp per row: slot weights (0 on invalid slots) and the valid mass M.
__global__ void linear_kd_teacher_kernel(LinearKdArgs a, float* slot_w, float* mass,
                                         unsigned long long* status) {
  __shared__ SoftmaxState scratch[kWarp];
  __shared__ float sum_scratch[kWarp];
  const int64_t r = blockIdx.x;
  const NeighbourRow nrow = neighbour_row_stats(a.nb, r, status, scratch);
  for (int64_t j = threadIdx.x; j < a.nb.k; j += kWarp) {
    const float lw = nrow.any ? slot_log_weight(a.nb, r, j, nrow) : -INFINITY;
    slot_w[r * a.nb.k + j] = lw == -INFINITY ? 0.0f : expf(lw);
  }
  const float m = teacher_mass(a.nb, r, nrow, sum_scratch);
  if (threadIdx.x == 0) mass[r] = m;
}

// The gradient tile in gs: the dense part, then (after a barrier) the target and teacher
// corrections, one thread per row in slot order.
__device__ __forceinline__ void gradient_tile(const LinearKdArgs& a, int64_t r0, int64_t c0,
                                              const float acc[4][4], const float* grad_rows,
                                              const float* lse, const float* slot_w,
                                              const float* mass, float (*gs)[kBV + 1]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const float eps = a.w.smoothing;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty * 4 + i;
    const bool live = r < a.T && a.targets[r] != a.ignore_index && grad_rows[r] != 0.0f;
    const float g = live ? grad_rows[r] : 0.0f;
    const float scale = live ? g * (a.w.ce + a.w.kd * mass[r]) : 0.0f;
    const float add = -g * a.w.ce * eps / float(a.V), l = live ? lse[r] : 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool in = live && c0 + tx * 4 + j < a.V;
      gs[ty * 4 + i][tx * 4 + j] = in ? scale * expf(acc[i][j] - l) + add : 0.0f;
    }
  }
  __syncthreads();
  const int64_t r = r0 + threadIdx.x;
  if (threadIdx.x < kBT && r < a.T && a.targets[r] != a.ignore_index && grad_rows[r] != 0.0f) {
    const float g = grad_rows[r];
    const int64_t y = a.targets[r] - c0;
    if (y >= 0 && y < kBV && c0 + y < a.V) gs[threadIdx.x][y] -= g * a.w.ce * (1.0f - eps);
    for (int64_t q = 0; q < a.nb.k; ++q) {
      const int64_t t = load_token(a.nb.tokens, r * a.nb.k + q) - c0;
      const float w = slot_w[r * a.nb.k + q];
      if (w > 0.0f && t >= 0 && t < kBV && c0 + t < a.V) gs[threadIdx.x][t] -= g * a.w.kd * w;
    }
  }
  __syncthreads();
}

// grad_hidden[r0.., :] += G W[c0.., :] and grad_weight[c0.., :] += G^T hidden[r0.., :], in
// D slices of kBD staged through shared memory; grad_bias[c0..] += column sums of G.
template <typename T>
__device__ __forceinline__ void scatter_gradients(const LinearKdArgs& a, int64_t r0, int64_t c0,
                                                  float (*gs)[kBV + 1], float (*wd)[kBD + 1],
                                                  float (*hd)[kBD + 1], float* grad_hidden,
                                                  float* grad_weight, float* grad_bias) {
  const T* hidden = static_cast<const T*>(a.hidden);
  const T* weight = static_cast<const T*>(a.weight);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  if (grad_bias && threadIdx.x < kBV && c0 + threadIdx.x < a.V) {
    float s = 0.0f;
    for (int row = 0; row < kBT; ++row) s += gs[row][threadIdx.x];
    atomicAdd(grad_bias + c0 + threadIdx.x, s);
  }
  for (int64_t d0 = 0; d0 < a.D; d0 += kBD) {
    __syncthreads();  // the previous slice has been read
    for (int e = threadIdx.x; e < kBT * kBD; e += kThreads) {
      const int row = e / kBD, dd = e % kBD;
      const int64_t r = r0 + row, c = c0 + row, d = d0 + dd;
      hd[row][dd] = (r < a.T && d < a.D) ? to_float(hidden[r * a.D + d]) : 0.0f;
      wd[row][dd] = (c < a.V && d < a.D) ? to_float(weight[c * a.D + d]) : 0.0f;
    }
    __syncthreads();
    // outer products over m: thread (ty, tx) owns rows (grad_hidden) / columns (grad_weight)
    // ty*4 + i and D offsets tx*2 + j, 16 accumulators in registers
    float gh[4][2], gw[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) gh[i][0] = gh[i][1] = gw[i][0] = gw[i][1] = 0.0f;
#pragma unroll 4
    for (int m = 0; m < kBV; ++m) {
      const float w0 = wd[m][tx * 2], w1 = wd[m][tx * 2 + 1];
      const float h0 = hd[m][tx * 2], h1 = hd[m][tx * 2 + 1];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float g_row = gs[ty * 4 + i][m], g_col = gs[m][ty * 4 + i];
        gh[i][0] += g_row * w0;
        gh[i][1] += g_row * w1;
        gw[i][0] += g_col * h0;
        gw[i][1] += g_col * h1;
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = r0 + ty * 4 + i, c = c0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t d = d0 + tx * 2 + j;
        if (d >= a.D) continue;
        if (r < a.T) atomicAdd(grad_hidden + r * a.D + d, gh[i][j]);
        if (c < a.V) atomicAdd(grad_weight + c * a.D + d, gw[i][j]);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    linear_kd_backward_kernel(LinearKdArgs a, const float* grad_rows, const float* lse,
                              const float* slot_w, const float* mass, float* grad_hidden,
                              float* grad_weight, float* grad_bias) {
  __shared__ float hs[kBK][kBT + kPad];
  __shared__ float ws[kBK][kBV + kPad];
  __shared__ float gs[kBT][kBV + 1];
  __shared__ float wd[kBV][kBD + 1];
  __shared__ float hd[kBT][kBD + 1];
  const int64_t r0 = int64_t(blockIdx.y) * kBT, c0 = int64_t(blockIdx.x) * kBV;
  float acc[4][4];
  logits_tile<T>(a, r0, c0, hs, ws, acc);
  gradient_tile(a, r0, c0, acc, grad_rows, lse, slot_w, mass, gs);
  scatter_gradients<T>(a, r0, c0, gs, wd, hd, grad_hidden, grad_weight, grad_bias);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
void launch_tiles(const LinearKdArgs& a, float* part, float* x_target, float* x_teacher,
                  cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(knn_kd_linear_loss_spans(a.V)),
                  static_cast<unsigned>(ceil_div(a.T, kBT)));
  linear_kd_forward_kernel<T><<<grid, kThreads, 0, stream>>>(a, part, x_target, x_teacher);
  check_launch("linear_kd_forward_kernel");
}

template <typename T>
void launch_backward_tiles(const LinearKdArgs& a, const float* grad_rows, const float* lse,
                           const float* slot_w, const float* mass, float* grad_hidden,
                           float* grad_weight, float* grad_bias, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.V, kBV)),
                  static_cast<unsigned>(ceil_div(a.T, kBT)));
  linear_kd_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
      a, grad_rows, lse, slot_w, mass, grad_hidden, grad_weight, grad_bias);
  check_launch("linear_kd_backward_kernel");
}

}  // namespace

int64_t knn_kd_linear_loss_spans(int64_t V) { return ceil_div(V, int64_t(kBV) * kSpan); }

void launch_knn_kd_linear_loss(const LinearKdArgs& a, bool kl, float* part, float* x_target,
                               float* x_teacher, float* loss, float* lse,
                               unsigned long long* status, cudaStream_t stream) {
  if (a.T == 0) return;
  switch (a.type) {
    case FloatType::F16: launch_tiles<__half>(a, part, x_target, x_teacher, stream); break;
    case FloatType::BF16:
      launch_tiles<__nv_bfloat16>(a, part, x_target, x_teacher, stream);
      break;
    default: launch_tiles<float>(a, part, x_target, x_teacher, stream); break;
  }
  linear_kd_combine_kernel<<<row_grid(a.T), kWarp, 0, stream>>>(
      a, kl, knn_kd_linear_loss_spans(a.V), part, x_target, x_teacher, loss, lse, status);
  check_launch("linear_kd_combine_kernel");
}

void launch_knn_kd_linear_loss_backward(const LinearKdArgs& a, const float* grad_rows,
                                        const float* lse, float* slot_w, float* mass,
                                        float* grad_hidden, float* grad_weight, float* grad_bias,
                                        unsigned long long* status, cudaStream_t stream) {
  if (a.T == 0) return;
  linear_kd_teacher_kernel<<<row_grid(a.T), kWarp, 0, stream>>>(a, slot_w, mass, status);
  check_launch("linear_kd_teacher_kernel");
  switch (a.type) {
    case FloatType::F16:
      return launch_backward_tiles<__half>(a, grad_rows, lse, slot_w, mass, grad_hidden,
                                           grad_weight, grad_bias, stream);
    case FloatType::BF16:
      return launch_backward_tiles<__nv_bfloat16>(a, grad_rows, lse, slot_w, mass, grad_hidden,
                                                  grad_weight, grad_bias, stream);
    default:
      return launch_backward_tiles<float>(a, grad_rows, lse, slot_w, mass, grad_hidden,
                                          grad_weight, grad_bias, stream);
  }
}

}  // namespace knnfast::cuda
