// label_counts CUDA launcher (kernel in label_counts.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernel_args.h"

namespace knnfast::cuda {

// tokens [B, k] int64 (ids >= -1) -> counts [B, k] int64: distinct valid tokens among the
// first j + 1 slots of each row.
void launch_label_counts(const int64_t* tokens, int64_t B, int64_t k, int64_t* counts,
                         unsigned long long* status, cudaStream_t stream);

}  // namespace knnfast::cuda
