// knn_search CUDA launchers (kernels in knn_search.cu). The wrapper (knn_search_cuda.cpp)
// chooses between two plans:
//
//   stream  exact fp32 for any B: query rows in groups of G <= 32; one pass over the keys per
//           group, each block scoring tiles of 512 keys (one key per thread, all G queries
//           from shared memory, fp16/bf16 keys converted in registers, |k|^2 from the same
//           loads) into per-block running top-k lists, then one merge per row.
//   tensor  fp16/bf16 keys, B > 32, k <= 256: cuBLAS tensor-core GEMM tiles [B, T] of the
//           power-of-two scaled queries (rounded to the key type) against the stored keys,
//           "add norms + select" over each tile into per-(row, slice) top-K' lists
//           (K' = max(2k, k + 32)), a merge, exact fp32 rescoring of the K' candidates, and a
//           per-row proof that no dropped key can beat the k-th exact score
//           (approx_score_error in common/knn_math.h). Rows without the proof are searched
//           again on the stream plan, so the result is exact either way.
//
// Lists are [parts, rows, K] float scores / int64 indices prefilled with (-inf, -1) by the
// caller; metric is knnfast::Metric as int.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace knnfast::cuda {

constexpr int kStreamMaxRows = 32;

// Most query rows one stream block can hold in shared memory for dimension D (0: none).
int64_t stream_scan_max_rows(int64_t D);

struct StreamScanArgs {
  const float* queries;         // [G, D] float32
  int64_t G, D;
  const void* keys;             // [N, D], contiguous
  FloatType key_type;
  int64_t N;
  int metric;
  const float* key_sq_norms;    // [N] or null (computed on the fly)
  const int64_t* exclude;       // [G] or null
  int64_t K;                    // list length (= k)
  int parts;                    // blocks; part p scans keys [N p / parts, N (p + 1) / parts)
  float* list_scores;           // [parts, G, K] ranking keys
  int64_t* list_indices;        // [parts, G, K]
  // [G] or null: when no row of the group is marked, every block returns at once (the lists
  // stay empty); the tensor plan's re-search of unproven rows, without a host sync
  const int32_t* needs = nullptr;
};
// Blocks worth launching for N keys and lists of K (fills the GPU, >= 8K keys per list).
int stream_scan_parts(int64_t N, int64_t K);
void launch_stream_scan(const StreamScanArgs& a, cudaStream_t stream);

struct MergeArgs {
  const float* in_scores;       // list (part p, row b) at p * part_stride + b * row_stride
  const int64_t* in_indices;
  int64_t parts, part_stride, row_stride, K_in;
  int64_t rows;
  float* out_scores;            // [rows, K_out], row stride K_out
  int64_t* out_indices;
  int64_t K_out;
  // finalize: ranking keys -> scores with final_score(metric, key, |q|^2) (queries [rows, D]
  // float32 needed; non-finite queries are reported). Otherwise the keys are kept.
  bool finalize;
  int metric;
  const float* queries;
  int64_t D;
  const int64_t* exclude;       // [rows] or null: validated when finalizing (ids in [-1, N))
  int64_t N;
  int64_t row_offset;           // added to the row numbers reported in the status
  const int32_t* needs = nullptr;  // [rows] or null: unmarked rows are left as they are
};
void launch_merge_lists(const MergeArgs& a, unsigned long long* status, cudaStream_t stream);

// |k|^2 of every key, fp32 accumulation: keys [N, D] -> out [N].
void launch_key_sq_norms(const void* keys, FloatType key_type, int64_t N, int64_t D, float* out,
                         cudaStream_t stream);

struct SelectTileArgs {
  const float* dots;            // [B, n] scaled dot products of tile keys [t0, t0 + n), row stride ld
  int64_t ld, B, n, t0;
  const float* inv_scale;       // [B]: 1 / query scale (powers of two)
  const float* key_sq_norms;    // [N]
  const int64_t* exclude;       // [B] or null
  int metric;
  int64_t slices, K;            // lists [B, slices, K]
  float* list_scores;
  int64_t* list_indices;
};
void launch_select_tile(const SelectTileArgs& a, cudaStream_t stream);

struct VerifyArgs {
  const float* queries;         // [B, D] float32
  int64_t B, D;
  int metric;
  const float* cand_keys;       // [B, Kc] approximate ranking keys, sorted best first
  const int64_t* cand_indices;  // [B, Kc]
  const float* cand_exact;      // [B, Kc] exact scores of the candidates
  int64_t Kc, k;
  float unit, tiny;             // rounding of the scaled queries (see approx_score_error)
  const float* scale;           // [B] query scales
  const float* kmax_sq;         // [1] largest |k|^2 of the datastore
  float* out_scores;            // [B, k]
  int64_t* out_indices;         // [B, k]
  int32_t* needs_exact;         // [B]: 1 where the proof failed
  const int64_t* exclude;       // [B] or null: validated here (ids in [-1, N))
  int64_t N;
};
void launch_verify(const VerifyArgs& a, unsigned long long* status, cudaStream_t stream);

}  // namespace knnfast::cuda
