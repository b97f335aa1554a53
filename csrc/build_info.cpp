// build_info(): how this library was built and what the CPU path will use, as "key=value;..."
// (parsed into a dict by knnfast.build_info()).
#include <ATen/Parallel.h>

#include <string>

#include "build_info.h"
#include "common/limits.h"
#include "common/plans.h"
#include "cpu/bf16_dot.h"
#include "cpu/vec_math.h"

#ifndef KNNFAST_VERSION
#define KNNFAST_VERSION "unknown"
#endif
#ifndef KNNFAST_TORCH_VERSION
#define KNNFAST_TORCH_VERSION "unknown"
#endif

namespace knnfast {

std::string build_info() {
  std::string s = "version=" KNNFAST_VERSION;
  s += ";built_with_torch=" KNNFAST_TORCH_VERSION;
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
  s += ";isa=" + cpu::cpu_isa_flags();
  s += ";max_k=" + std::to_string(kMaxK);
  // knn_search plans this process can run (bf16 only with AVX512-BF16)
  s += ";cpu_plans=";
  for (const char* plan : kCpuSearchPlans) {
    if (std::string(plan) == "bf16" && !cpu::bf16_dot_available()) continue;
    s += std::string(plan == kCpuSearchPlans[0] ? "" : ",") + plan;
  }
#ifdef KNNFAST_WITH_CUDA
  s += ";cuda_plans=";
  for (const char* plan : kCudaSearchPlans)
    s += std::string(plan == kCudaSearchPlans[0] ? "" : ",") + plan;
#endif
  return s;
}

}  // namespace knnfast
