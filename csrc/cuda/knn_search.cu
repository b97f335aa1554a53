// knn_search on CUDA: the stream scan, the tile selection of the tensor-core plan, the list
// merge and the exactness proof (see knn_search.h for the two plans).
#include "cuda/knn_search.h"
#include "cuda/launch_utils.cuh"
#include "cuda/topk_list.cuh"
#include "cuda/vec_load.cuh"

namespace knnfast::cuda {
namespace {

constexpr int kStreamThreads = 512;  // keys per stream tile, one per thread
constexpr int kRowWarps = 4;         // warps (rows or lists) per block of the row kernels

// ------------------------------------------------------------------ stream scan

// acc[b] += q_b[d .. d + VEC) . kv for the G live rows; q rows come from shared memory and
// every lane reads the same address (a broadcast).
template <int BMAX, int VEC>
__device__ __forceinline__ void accumulate_rows(const float* q_s, int64_t D, int G, int64_t d,
                                                const float (&kv)[VEC], float (&acc)[BMAX]) {
#pragma unroll
  for (int b = 0; b < BMAX; ++b) {
    if (b >= G) break;
    const float* q = q_s + b * D + d;
    float s = acc[b];
#pragma unroll
    for (int e = 0; e < VEC; ++e) s = fmaf(q[e], kv[e], s);
    acc[b] = s;
  }
}

template <typename KeyT, int BMAX, int VEC>
__global__ void __launch_bounds__(kStreamThreads)
    stream_scan_kernel(StreamScanArgs a) {
  extern __shared__ float smem[];
  const int G = static_cast<int>(a.G);
  if (a.needs) {  // block-uniform: nothing to search unless a row of the group is marked
    int marked = 0;
    for (int b = 0; b < G; ++b) marked |= a.needs[b];
    if (!marked) return;
  }
  float* q_s = smem;                          // [G, D] queries
  float* rank_s = smem + G * a.D;             // [G, kStreamThreads] ranking keys of a tile
  for (int64_t i = threadIdx.x; i < G * a.D; i += blockDim.x) q_s[i] = a.queries[i];
  __syncthreads();

  const KeyT* keys = static_cast<const KeyT*>(a.keys);
  const Metric metric = static_cast<Metric>(a.metric);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int64_t begin = a.N * blockIdx.x / a.parts, end = a.N * (blockIdx.x + 1) / a.parts;

  for (int64_t first = begin; first < end; first += kStreamThreads) {
    const int64_t n = first + threadIdx.x;
    const bool live = n < end;
    float acc[BMAX];
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[b] = 0.0f;
    float kk = 0.0f;
    if (live) {
      const KeyT* key = keys + n * a.D;
      for (int64_t d = 0; d < a.D; d += VEC) {
        float kv[VEC];
        load_vec<KeyT, VEC>(key + d, kv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) kk = fmaf(kv[e], kv[e], kk);
        accumulate_rows<BMAX, VEC>(q_s, a.D, G, d, kv, acc);
      }
    }
    const float sq = (live && a.key_sq_norms) ? a.key_sq_norms[n] : kk;
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
      if (b >= G) break;
      float v = live ? ranking_key(metric, acc[b], sq) : -INFINITY;
      if (a.exclude && a.exclude[b] == n) v = -INFINITY;
      rank_s[b * kStreamThreads + threadIdx.x] = v;
    }
    __syncthreads();
    // warp w keeps the lists of rows w, w + warps, ...; NaN and -inf are never offered
    for (int b = warp; b < G; b += warps) {
      const int64_t list = static_cast<int64_t>(blockIdx.x) * G + b;
      TopkList top = make_list(a.list_scores + list * a.K, a.list_indices + list * a.K,
                               static_cast<int>(a.K));
      for (int c = 0; c < kStreamThreads; c += kWarp) {
        const float v = rank_s[b * kStreamThreads + c + lane];
        top.offer(v, first + c + lane, v > -INFINITY);
      }
    }
    __syncthreads();  // rank_s is rewritten by the next tile
  }
}

template <typename KeyT, int BMAX>
void launch_stream_rows(const StreamScanArgs& a, bool vec, size_t smem, cudaStream_t stream) {
  constexpr int kVec = VecWidth<KeyT>::value;
  auto kernel = vec ? stream_scan_kernel<KeyT, BMAX, kVec> : stream_scan_kernel<KeyT, BMAX, 1>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "knn_search stream shared memory");
  kernel<<<a.parts, kStreamThreads, smem, stream>>>(a);
  check_launch("stream_scan_kernel");
}

template <typename KeyT>
void launch_stream_typed(const StreamScanArgs& a, cudaStream_t stream) {
  constexpr int kVec = VecWidth<KeyT>::value;
  const bool vec = a.D % kVec == 0 && reinterpret_cast<uintptr_t>(a.keys) % 16 == 0;
  const size_t smem = static_cast<size_t>(a.G) * (a.D + kStreamThreads) * sizeof(float);
  // register accumulators for the smallest power of two >= G rows
  if (a.G <= 1) return launch_stream_rows<KeyT, 1>(a, vec, smem, stream);
  if (a.G <= 2) return launch_stream_rows<KeyT, 2>(a, vec, smem, stream);
  if (a.G <= 4) return launch_stream_rows<KeyT, 4>(a, vec, smem, stream);
  if (a.G <= 8) return launch_stream_rows<KeyT, 8>(a, vec, smem, stream);
  if (a.G <= 16) return launch_stream_rows<KeyT, 16>(a, vec, smem, stream);
  return launch_stream_rows<KeyT, 32>(a, vec, smem, stream);
}

// ------------------------------------------------------------------ merge

__device__ __forceinline__ float warp_query_sq_norm(const float* q, int64_t D,
                                                    bool& finite) {
  float qq = 0.0f;
  bool ok = true;
  for (int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) {
    ok &= isfinite(q[d]);
    qq = fmaf(q[d], q[d], qq);
  }
  finite = !__any_sync(kFullMask, !ok);
  return warp_sum(qq);
}

// exclude[row] outside [-1, N) is reported as row `reported` (the row in the whole batch).
__device__ __forceinline__ void check_exclude(const int64_t* exclude, int64_t row, int64_t N,
                                              int64_t reported, unsigned long long* status) {
  if (!exclude || threadIdx.x % kWarp != 0) return;
  if (!valid_id(exclude[row], N)) report(status, kBadExclude, reported);
}

__global__ void merge_lists_kernel(MergeArgs a, unsigned long long* status) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= a.rows || (a.needs && !a.needs[row])) return;  // warp-uniform
  const int lane = threadIdx.x % kWarp;
  float* os = a.out_scores + row * a.K_out;
  int64_t* oi = a.out_indices + row * a.K_out;
  clear_list(os, oi, static_cast<int>(a.K_out));
  TopkList top = make_list(os, oi, static_cast<int>(a.K_out));
  for (int64_t p = 0; p < a.parts; ++p) {
    const float* ls = a.in_scores + p * a.part_stride + row * a.row_stride;
    const int64_t* li = a.in_indices + p * a.part_stride + row * a.row_stride;
    for (int64_t c = 0; c < a.K_in; c += kWarp) {
      const int64_t j = c + lane;
      const bool has = j < a.K_in;
      const float s = has ? ls[j] : -INFINITY;
      const int64_t i = has ? li[j] : -1;
      // lists are sorted: once a whole chunk is rejected, the rest of the list is too
      if (top.offer(s, i, has && i >= 0) == 0) break;
    }
  }
  if (!a.finalize) return;
  check_exclude(a.exclude, row, a.N, a.row_offset + row, status);
  bool finite = true;
  const float qq = warp_query_sq_norm(a.queries + row * a.D, a.D, finite);
  if (!finite && lane == 0) report(status, kBadQuery, a.row_offset + row);
  for (int64_t j = lane; j < a.K_out; j += kWarp)
    os[j] = oi[j] < 0 ? -INFINITY : final_score(static_cast<Metric>(a.metric), os[j], qq);
}

// ------------------------------------------------------------------ tensor-core plan

template <typename KeyT>
__global__ void key_sq_norms_kernel(const KeyT* keys, int64_t N, int64_t D, float* out) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp; n < N;
       n += warps) {
    float s = 0.0f;
    for (int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) {
      const float v = to_float(keys[n * D + d]);
      s = fmaf(v, v, s);
    }
    s = warp_sum(s);
    if (threadIdx.x % kWarp == 0) out[n] = s;
  }
}

// One warp per (row, slice): the slice's columns of a [B, n] tile of scaled dot products
// become ranking keys (unscaled, norms added) and go through the warp's running list.
__global__ void select_tile_kernel(SelectTileArgs a) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (w >= a.B * a.slices) return;  // warp-uniform
  const int lane = threadIdx.x % kWarp;
  const int64_t b = w / a.slices, s = w % a.slices;
  const int64_t c0 = a.n * s / a.slices, c1 = a.n * (s + 1) / a.slices;
  TopkList top = make_list(a.list_scores + w * a.K, a.list_indices + w * a.K,
                           static_cast<int>(a.K));
  const Metric metric = static_cast<Metric>(a.metric);
  const float inv = a.inv_scale[b];
  const int64_t excluded = a.exclude ? a.exclude[b] : -1;
  const float* row = a.dots + b * a.ld;
  for (int64_t c = c0; c < c1; c += kWarp) {
    const int64_t j = c + lane;
    const bool live = j < c1;
    const int64_t id = a.t0 + j;
    const float v = live ? ranking_key(metric, row[j] * inv, a.key_sq_norms[id]) : -INFINITY;
    top.offer(v, id, live && v > -INFINITY && id != excluded);
  }
}

// One warp per row: the k best candidates by exact score, and the proof that no key outside
// the candidates can beat the k-th of them.
__global__ void verify_kernel(VerifyArgs a, unsigned long long* status) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (row >= a.B) return;  // warp-uniform
  const int lane = threadIdx.x % kWarp;
  const int k = static_cast<int>(a.k);
  float* os = a.out_scores + row * a.k;
  int64_t* oi = a.out_indices + row * a.k;
  clear_list(os, oi, k);
  TopkList top = make_list(os, oi, k);
  int64_t candidates = 0;
  for (int64_t c = 0; c < a.Kc; c += kWarp) {
    const int64_t j = c + lane;
    const bool has = j < a.Kc;
    const int64_t id = has ? a.cand_indices[row * a.Kc + j] : -1;
    const float s = has ? a.cand_exact[row * a.Kc + j] : -INFINITY;
    candidates += warp_count(id >= 0);
    top.offer(s, id, id >= 0 && s > -INFINITY);
  }
  check_exclude(a.exclude, row, a.N, row, status);
  bool finite = true;
  const float qq = warp_query_sq_norm(a.queries + row * a.D, a.D, finite);
  if (!finite && lane == 0) report(status, kBadQuery, row);
  if (lane != 0) return;
  bool proven = true;  // fewer than Kc candidates: no slice list overflowed, nothing dropped
  if (candidates == a.Kc) {
    const Metric metric = static_cast<Metric>(a.metric);
    const float worst_kept = a.cand_keys[row * a.Kc + a.Kc - 1];
    const float bound = final_score(metric, worst_kept, qq) +
                        approx_score_error(metric, a.D, a.unit, a.tiny, a.scale[row], qq,
                                           a.kmax_sq[0]);
    proven = top.worst_score > bound;  // -inf (fewer than k exact scores) is never proven
  }
  a.needs_exact[row] = proven ? 0 : 1;
}

template <typename KeyT>
void launch_norms_typed(const void* keys, int64_t N, int64_t D, float* out,
                        cudaStream_t stream) {
  const int64_t blocks = (N + kRowWarps - 1) / kRowWarps;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  key_sq_norms_kernel<KeyT><<<grid, kRowWarps * kWarp, 0, stream>>>(
      static_cast<const KeyT*>(keys), N, D, out);
  check_launch("key_sq_norms_kernel");
}

unsigned row_warp_blocks(int64_t warps) {
  return static_cast<unsigned>((warps + kRowWarps - 1) / kRowWarps);
}

}  // namespace

int64_t stream_scan_max_rows(int64_t D) {
  const int64_t per_row = (D + kStreamThreads) * static_cast<int64_t>(sizeof(float));
  const int64_t rows = static_cast<int64_t>(device_max_smem_optin()) / per_row;
  return rows < kStreamMaxRows ? rows : kStreamMaxRows;
}

int stream_scan_parts(int64_t N, int64_t K) {
  const int64_t per_list = K * 8 > 8192 ? K * 8 : 8192;
  const int64_t wanted = (N + per_list - 1) / per_list;
  const int64_t most = 2 * static_cast<int64_t>(device_sm_count());
  return static_cast<int>(wanted < 1 ? 1 : wanted > most ? most : wanted);
}

void launch_stream_scan(const StreamScanArgs& a, cudaStream_t stream) {
  if (a.G == 0) return;
  switch (a.key_type) {
    case FloatType::F16: return launch_stream_typed<__half>(a, stream);
    case FloatType::BF16: return launch_stream_typed<__nv_bfloat16>(a, stream);
    default: return launch_stream_typed<float>(a, stream);
  }
}

void launch_merge_lists(const MergeArgs& a, unsigned long long* status, cudaStream_t stream) {
  if (a.rows == 0) return;
  merge_lists_kernel<<<row_warp_blocks(a.rows), kRowWarps * kWarp, 0, stream>>>(a, status);
  check_launch("merge_lists_kernel");
}

void launch_key_sq_norms(const void* keys, FloatType key_type, int64_t N, int64_t D, float* out,
                         cudaStream_t stream) {
  if (N == 0) return;
  switch (key_type) {
    case FloatType::F16: return launch_norms_typed<__half>(keys, N, D, out, stream);
    case FloatType::BF16: return launch_norms_typed<__nv_bfloat16>(keys, N, D, out, stream);
    default: return launch_norms_typed<float>(keys, N, D, out, stream);
  }
}

void launch_select_tile(const SelectTileArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.n == 0) return;
  select_tile_kernel<<<row_warp_blocks(a.B * a.slices), kRowWarps * kWarp, 0, stream>>>(a);
  check_launch("select_tile_kernel");
}

void launch_verify(const VerifyArgs& a, unsigned long long* status, cudaStream_t stream) {
  if (a.B == 0) return;
  verify_kernel<<<row_warp_blocks(a.B), kRowWarps * kWarp, 0, stream>>>(a, status);
  check_launch("verify_kernel");
}

}  // namespace knnfast::cuda
