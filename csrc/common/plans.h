// Kernel plans: the explicit `plan` argument of knn_search, knn_search_lists, softmax_stats and
// knn_interpolate (tests and
// benchmarks force a variant with it; "auto" is the choice the op makes itself). The names are
// listed per op and backend in the order of their enum; common/torch_checks.h parses them.
#pragma once

#include <array>

namespace knnfast {

// knn_search on CPU (see csrc/cpu/knn_search_cpu.cpp): bf16 needs AVX512-BF16; bf16_gemm (ATen's
// bf16 matmul, AMX tiles where the CPU has them) runs everywhere.
enum class CpuSearchPlan : int { Auto = 0, Stream, GemmF32, Bf16, Bf16Gemm };
inline constexpr std::array<const char*, 5> kCpuSearchPlans{"auto", "stream", "gemm_f32", "bf16",
                                                            "bf16_gemm"};

// knn_search on CUDA (see csrc/cuda/knn_search.h). tensor_recheck = the tensor plan with every
// row's exactness proof failed, so every row is searched again on the stream plan. Where the
// tensor plan is impossible (float32 keys, k > 256), tensor and tensor_recheck run the stream
// plan.
enum class CudaSearchPlan : int { Auto = 0, Stream, Tensor, TensorRecheck };
inline constexpr std::array<const char*, 4> kCudaSearchPlans{"auto", "stream", "tensor",
                                                             "tensor_recheck"};

// knn_search_lists: CPU "scan" (csrc/cpu/knn_search_lists_cpu.cpp reads each probed list
// once for all its queries), "rescore" (common/lists_rescore.h: candidates scored by
// knn_rescore, then sorted; what CUDA runs, so the CPU tests cover it), "bf16" or "int8" (scan
// of a bf16 / int8 pack with exact rescoring, csrc/cpu/knn_search_lists_{bf16,int8}.cpp); auto
// = the pack's plan given a pack on a CPU with its dot instruction (AVX512-BF16 / AVX512-VNNI),
// else scan. CUDA has only rescore.
enum class CpuListsPlan : int { Auto = 0, Scan, Rescore, Bf16, Int8 };
inline constexpr std::array<const char*, 5> kCpuListsPlans{"auto", "scan", "rescore", "bf16",
                                                           "int8"};
inline constexpr std::array<const char*, 2> kCudaListsPlans{"auto", "rescore"};

// softmax_stats: CPU "fused" (auto; csrc/cpu/softmax_stats_cpu.cpp: three reads of each row,
// no [B, V] temporary) or "aten" (common/softmax_stats_aten.h: log-softmax and topk in ATen
// ops; what CUDA runs, so the CPU tests cover it); CUDA has only aten.
enum class CpuSoftmaxStatsPlan : int { Auto = 0, Fused, Aten };
inline constexpr std::array<const char*, 3> kCpuSoftmaxStatsPlans{"auto", "fused", "aten"};
inline constexpr std::array<const char*, 2> kCudaSoftmaxStatsPlans{"auto", "aten"};

// knn_interpolate: the CPU has one plan; CUDA keeps each logits row in shared memory between
// its two passes where it fits (auto = row_cache) or never (global: re-read from L2).
inline constexpr std::array<const char*, 1> kCpuInterpolatePlans{"auto"};
enum class CudaInterpolatePlan : int { Auto = 0, RowCache, Global };
inline constexpr std::array<const char*, 3> kCudaInterpolatePlans{"auto", "row_cache", "global"};

}  // namespace knnfast
