// build_info(): how this library was built and what the CPU path will use, as "key=value;..."
// (parsed into a dict by knnfast.build_info()).
#include <ATen/Parallel.h>

#include <string>

#include "build_info.h"
#include "cpu/vec_math.h"

#ifndef KNNFAST_VERSION
#define KNNFAST_VERSION "unknown"
#endif

namespace knnfast {

std::string build_info() {
  std::string s = "version=" KNNFAST_VERSION;
#ifdef KNNFAST_WITH_CUDA
  s += ";cuda_compiled=1";
#else
  s += ";cuda_compiled=0";
#endif
#ifdef _OPENMP
  s += ";openmp=1";
#else
  s += ";openmp=0";
#endif
  s += ";openmp_threads=" + std::to_string(at::get_num_threads());
  s += std::string(";simd=") + cpu::simd_level();
  s += std::string(";avx512_bf16=") + (cpu::cpu_has_avx512_bf16() ? "1" : "0");
  return s;
}

}  // namespace knnfast
