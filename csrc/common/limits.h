// Limits shared by every backend (and mirrored by knnfast/defaults.py, which a test compares
// with build_info()'s max_k). Plain constexpr: included by .cu files as well as by g++ code.
#pragma once

#include <stdint.h>

namespace knnfast {

// Largest k any op accepts (neighbours per row): the CPU heaps and the CUDA warp lists are
// sized for it, and knn_probs_sparse's O(k^2) first-occurrence search assumes it.
constexpr int64_t kMaxK = 2048;

}  // namespace knnfast
