#pragma once
#include <string>

namespace knnfast {
// "version=...;cuda_compiled=0|1;openmp=0|1;openmp_threads=N;simd=avx512|generic;avx512_bf16=0|1"
std::string build_info();
}  // namespace knnfast
