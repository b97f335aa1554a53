#pragma once
#include <string>

namespace knnfast {
// "version=...;cuda_compiled=0|1;openmp=0|1;openmp_threads=N;simd=avx512|generic;avx512_bf16=0|1;
//  isa=avx512f,...;max_k=2048;cpu_plans=auto,stream,gemm_f32[,bf16],bf16_gemm
//  [;cuda_plans=auto,stream,tensor,tensor_recheck]"
// (cpu_plans / cuda_plans: the knn_search plans this process can run)
std::string build_info();
}  // namespace knnfast
