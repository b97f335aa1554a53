// Torch-side helpers of the CUDA wrappers (g++ only, never nvcc): device checks, the status
// buffer the kernels report bad values into, and the ValueError raised from it after the
// kernels ran (DESIGN §2). Messages match the CPU backend's word for word.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <string>

#include "common/settings.h"
#include "common/torch_checks.h"
#include "cuda/kernel_args.h"

namespace knnfast::cuda {

inline void check_cuda_tensor(const at::Tensor& t, const at::Device& device, const char* op,
                              const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name,
                    " must be on the same device as the other inputs (", device, "), got ",
                    t.device());
}

// The wrappers take their device from one argument; a direct torch.ops call that mixes a CPU
// tensor into CUDA inputs must fail as ValueError before any device guard is made.
inline void check_is_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name,
                    " must be on the same device as the other inputs (cuda), got ", t.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline FloatType float_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return FloatType::F16;
    case at::kBFloat16: return FloatType::BF16;
    case at::kDouble: return FloatType::F64;
    default: return FloatType::F32;
  }
}

// configure("cuda_checks", 0) skips reading the status back (no host sync per call, e.g. for
// CUDA graphs); bad values then go unreported but never cause out-of-bounds accesses.
inline bool status_readback_enabled() {
  return settings().cuda_checks.load(std::memory_order_relaxed) != 0;
}

// A fresh status buffer: kNumStatusCodes uint64 slots, all kStatusClear (every bit set).
inline at::Tensor new_status(const at::Device& device) {
  return at::full({kNumStatusCodes}, -1, at::TensorOptions().dtype(at::kLong).device(device));
}

inline unsigned long long* status_ptr(const at::Tensor& status) {
  return reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>());
}

// What the wrapper knows to word a report; unset tensors are not part of the op.
struct StatusContext {
  const char* op;
  at::Tensor tokens;
  const char* tokens_name = "tokens";
  int64_t token_bound = -1;  // -1: no upper bound
  at::Tensor scores, weights, temperature, lam, targets;
  int64_t vocab = 0, ignore_index = 0, entries = 0;
  at::Tensor exclude;
};

inline double value_at(const at::Tensor& t, int64_t flat) {
  return t.reshape(-1)[flat].item<double>();
}

// Reads the status back (one small device-to-host copy, which waits for the kernels) and
// raises ValueError for the first kind of bad value found.
inline void raise_on_status(const at::Tensor& status, const StatusContext& c) {
  if (!status_readback_enabled()) return;
  const at::Tensor host = status.cpu();
  const int64_t* s = host.data_ptr<int64_t>();
  auto bad = [&](StatusCode code) { return s[code] != -1; };
  const char* op = c.op;
  // the order of the CPU checks: queries and targets before the neighbour inputs
  TORCH_CHECK_VALUE(!bad(kBadQuery), op, ": queries contain NaN or inf");
  if (bad(kBadTarget)) {
    const int64_t row = s[kBadTarget];
    TORCH_CHECK_VALUE(false, op, ": targets must be in [0, ", c.vocab, ") or ignore_index (",
                      c.ignore_index, "), got ", c.targets[row].item<int64_t>(), " at row ", row);
  }
  if (bad(kBadToken)) {
    const int64_t pos = s[kBadToken];
    TORCH_CHECK_VALUE(false, op, ": ", c.tokens_name, " must hold ids in [-1, ",
                      c.token_bound < 0 ? std::string("inf") : std::to_string(c.token_bound),
                      "), got ", c.tokens.reshape(-1)[pos].item<int64_t>(), " at flat position ",
                      pos);
  }
  if (bad(kBadScore)) {
    const int64_t pos = s[kBadScore];
    TORCH_CHECK_VALUE(false, op, ": scores must be finite or -inf, got ", value_at(c.scores, pos),
                      " at flat position ", pos);
  }
  if (bad(kBadWeightNonFinite)) {
    const int64_t pos = s[kBadWeightNonFinite];
    TORCH_CHECK_VALUE(false, op, ": weights must be finite or -inf, got ", value_at(c.weights, pos),
                      " at flat position ", pos);
  }
  if (bad(kBadWeight)) {
    const int64_t pos = s[kBadWeight];
    TORCH_CHECK_VALUE(false, op, ": weights must be finite and >= 0, got ",
                      value_at(c.weights, pos), " at flat position ", pos);
  }
  if (bad(kBadTemperature)) {
    const int64_t row = s[kBadTemperature];
    const int64_t at_row = c.temperature.numel() == 1 ? 0 : row;
    TORCH_CHECK_VALUE(false, op, ": temperature must be > 0 and finite, got ",
                      value_at(c.temperature, at_row), " (row ", at_row, ")");
  }
  if (bad(kBadLam)) {
    const int64_t row = s[kBadLam];
    const int64_t at_row = c.lam.numel() == 1 ? 0 : row;
    TORCH_CHECK_VALUE(false, op, ": lam must be in [0, 1], got ", value_at(c.lam, at_row),
                      " (row ", at_row, ")");
  }
  TORCH_CHECK_VALUE(!bad(kBadLogitsRow), op, ": logits row ", s[kBadLogitsRow],
                    " contains NaN or +inf (log_softmax is undefined)");
  if (bad(kBadExclude)) {
    const int64_t row = s[kBadExclude];
    TORCH_CHECK_VALUE(false, op, ": exclude must hold ids in [-1, ", c.entries, "), got ",
                      c.exclude[row].item<int64_t>(), " at row ", row);
  }
}

// Validated neighbour tensors of one call (shapes and dtypes here, values in the kernels).
struct NeighbourTensors {
  at::Tensor tokens, scores, weights, temperature;
  NeighbourArgs args;
};

inline NeighbourTensors neighbour_tensors(const at::Tensor& tokens,
                                          const c10::optional<at::Tensor>& scores,
                                          const c10::optional<at::Tensor>& weights,
                                          const at::Tensor& temperature, int64_t rows,
                                          int64_t vocab, const at::Device& device,
                                          const char* op) {
  TORCH_CHECK_VALUE(scores.has_value() != weights.has_value(), op,
                    ": pass exactly one of scores or weights");
  NeighbourTensors n;
  check_cuda_tensor(tokens, device, op, "tokens");
  check_dim(tokens, 2, op, "tokens");
  check_integer(tokens, op, "tokens");
  TORCH_CHECK_VALUE(tokens.size(0) == rows, op, ": tokens must have ", rows,
                    " rows (one per logits/scores row), got shape ", tokens.sizes());
  n.tokens = as_int64(tokens);
  const at::Tensor& given = scores.has_value() ? *scores : *weights;
  const char* given_name = scores.has_value() ? "scores" : "weights";
  check_cuda_tensor(given, device, op, given_name);
  check_dim(given, 2, op, given_name);
  check_floating(given, op, given_name);
  TORCH_CHECK_VALUE(given.sizes() == tokens.sizes(), op, ": ", given_name,
                    " must have the shape of tokens ", tokens.sizes(), ", got ", given.sizes());
  (scores.has_value() ? n.scores : n.weights) = as_float32(given);
  check_cuda_tensor(temperature, device, op, "temperature");
  check_row_param_shape(temperature, rows, op, "temperature");
  n.temperature = as_float32(temperature).reshape({-1});
  n.args.tokens = n.tokens.data_ptr<int64_t>();
  n.args.scores = n.scores.defined() ? n.scores.data_ptr<float>() : nullptr;
  n.args.weights = n.weights.defined() ? n.weights.data_ptr<float>() : nullptr;
  n.args.k = n.tokens.size(1);
  n.args.vocab = vocab;
  n.args.temperature = RowScalarArg{n.temperature.data_ptr<float>(),
                                    n.temperature.numel() == 1 ? 0 : 1};
  return n;
}

inline RowScalarArg row_scalar(at::Tensor& storage, const at::Tensor& t, int64_t rows,
                               const at::Device& device, const char* op, const char* name) {
  check_cuda_tensor(t, device, op, name);
  check_row_param_shape(t, rows, op, name);
  storage = as_float32(t).reshape({-1});
  return RowScalarArg{storage.data_ptr<float>(), storage.numel() == 1 ? 0 : 1};
}

inline StatusContext neighbour_context(const char* op, const NeighbourTensors& n,
                                       int64_t token_bound) {
  StatusContext c;
  c.op = op;
  c.tokens = n.tokens;
  c.token_bound = token_bound;
  c.scores = n.scores;
  c.weights = n.weights;
  c.temperature = n.temperature;
  return c;
}

}  // namespace knnfast::cuda
