// The tensors of a call whose arguments common/op_checks.h has checked, converted into the
// form both backends' kernels read (torch side only). Values are not checked here: the CPU
// wrappers check them on the host, the CUDA kernels on the device.
#pragma once

#include <ATen/ATen.h>

#include "common/knn_math.h"
#include "common/op_checks.h"
#include "common/torch_checks.h"

namespace knnfast {

// knn_search: float32 queries, contiguous keys (any float type), optional inputs converted.
struct SearchInputs {
  at::Tensor queries;       // float32 [B, D]
  at::Tensor keys;          // [N, D] contiguous
  at::Tensor key_sq_norms;  // float32 [N] or undefined
  at::Tensor exclude;       // int64 [B] or undefined
  Metric metric;
  int64_t k;
};

inline SearchInputs search_inputs(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                  Metric metric, const c10::optional<at::Tensor>& key_sq_norms,
                                  const c10::optional<at::Tensor>& exclude) {
  SearchInputs in;
  in.metric = metric;
  in.queries = as_float32(queries);
  in.keys = keys.contiguous();
  in.k = k;
  if (key_sq_norms.has_value()) in.key_sq_norms = as_float32(*key_sq_norms);
  if (exclude.has_value()) in.exclude = as_int64(*exclude);
  return in;
}

// Neighbour inputs: tokens int64 [B, k], the given one of scores / weights float32 [B, k]
// (the other undefined), temperature float32 flattened to 1 or B values.
struct NeighbourTensors {
  at::Tensor tokens, scores, weights, temperature;
  NeighbourNames names;  // how errors name them (knn_kd_loss: teacher_*)
};

inline NeighbourTensors neighbour_tensors(const at::Tensor& tokens,
                                          const c10::optional<at::Tensor>& scores,
                                          const c10::optional<at::Tensor>& weights,
                                          const at::Tensor& temperature,
                                          const NeighbourNames& names = kNeighbourNames) {
  NeighbourTensors n;
  n.names = names;
  n.tokens = as_int64(tokens);
  if (scores.has_value()) n.scores = as_float32(*scores);
  if (weights.has_value()) n.weights = as_float32(*weights);
  n.temperature = as_float32(temperature).reshape({-1});
  return n;
}

}  // namespace knnfast
