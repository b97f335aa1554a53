// Launch-side helpers of the knnfast CUDA kernels (grid sizes, error checks).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdexcept>
#include <string>

namespace knnfast::cuda {

// Launch errors become C++ exceptions; the torch wrapper turns them into RuntimeError.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("knnfast CUDA: ") + what + " failed to launch: " +
                             cudaGetErrorString(err));
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("knnfast CUDA: ") + what + ": " + cudaGetErrorString(err));
}

// One block per row: grid.x may hold up to 2^31 - 1 blocks.
inline unsigned row_grid(int64_t rows) { return static_cast<unsigned>(rows); }

// Threads per row block: enough for the vocabulary sweep, fewer for tiny rows.
inline int row_threads(int64_t width) {
  if (width >= 8192) return 512;
  if (width >= 1024) return 256;
  return 128;
}

inline int device_sm_count() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  return sms;
}

inline size_t device_max_smem_optin() {
  int device = 0, bytes = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "shared memory limit");
  return static_cast<size_t>(bytes);
}

}  // namespace knnfast::cuda
