// softmax_stats' plan "aten": log-softmax, the 0 log 0 terms masked, topk, in ATen ops alone.
// It is what CUDA runs (no kernel of its own there) and a CPU plan, so the CPU tests cover the
// very code CUDA runs. [B, V] temporaries; one host sync, for the value check.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace knnfast {

// After check_softmax_stats_args: (entropy [B] or [0] without with_entropy, top_logp [B, top])
// float32, as the CPU kernel: a row of only -inf gives (0, -inf); NaN or +inf: ValueError.
std::tuple<at::Tensor, at::Tensor> softmax_stats_aten(const at::Tensor& logits, int64_t top,
                                                      bool with_entropy);

}  // namespace knnfast
