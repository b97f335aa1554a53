// Torch-side helpers of the CUDA wrappers (g++ only, never nvcc): the status buffer the kernels
// report bad values into, the ValueError raised from it after the kernels ran (DESIGN §2; the
// texts of common/messages.h, as on CPU), and the conversions of the checked arguments.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <string>

#include "common/messages.h"
#include "common/op_checks.h"
#include "common/op_inputs.h"
#include "common/settings.h"
#include "common/torch_checks.h"
#include "cuda/kernel_args.h"

namespace knnfast::cuda {

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline FloatType float_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return FloatType::F16;
    case at::kBFloat16: return FloatType::BF16;
    case at::kDouble: return FloatType::F64;
    default: return FloatType::F32;
  }
}

// The per-call read-back of configure("cuda_checks", 1) (common/settings.h); deferred (2) and
// off (0) never synchronize with the host.
inline bool status_readback_enabled() {
  return settings().cuda_checks.load(std::memory_order_relaxed) == kCudaChecksSync;
}

// The device's persistent status buffer of deferred checks (status_buffer_cuda.cpp): kernels
// atomicMin into it across calls until take_cuda_status reads and clears it.
at::Tensor deferred_status(const at::Device& device);

// The status buffer of one op call: kNumStatusCodes uint64 slots, all kStatusClear (every bit
// set); fresh per call, or the device's persistent one when checks are deferred (no
// allocation, and a fixed address a CUDA graph can capture).
inline at::Tensor new_status(const at::Device& device) {
  if (settings().cuda_checks.load(std::memory_order_relaxed) == kCudaChecksDeferred)
    return deferred_status(device);
  return at::full({kNumStatusCodes}, -1, at::TensorOptions().dtype(at::kLong).device(device));
}

inline unsigned long long* status_ptr(const at::Tensor& status) {
  return reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>());
}

// What the wrapper knows to word a report; unset tensors are not part of the op.
struct StatusContext {
  const char* op;
  at::Tensor tokens;
  NeighbourNames names = kNeighbourNames;  // tokens: also label_counts; "indices": knn_rescore
  int64_t token_bound = -1;                // -1: no upper bound
  at::Tensor scores, weights, temperature, lam, targets;
  int64_t vocab = 0, ignore_index = 0, entries = 0;
  at::Tensor exclude;
};

inline float value_at(const at::Tensor& t, int64_t flat) {
  return t.reshape(-1)[flat].item<float>();
}

inline int64_t id_at(const at::Tensor& t, int64_t flat) {
  return t.reshape(-1)[flat].item<int64_t>();
}

// A per-row parameter's report: the row, or 0 when one value serves all rows.
inline void raise_bad_param(const StatusContext& c, const at::Tensor& t, const char* name,
                            ParamRange range, int64_t row) {
  const int64_t at_row = t.numel() == 1 ? 0 : row;
  raise_bad_row_param(c.op, name, range, value_at(t, at_row), at_row);
}

// Reads the status back (one small device-to-host copy, which waits for the kernels) and
// raises the ValueError of the first kind of bad value found, in the order of the CPU checks
// (queries and targets before the neighbour inputs), with the CPU's texts (common/messages.h).
inline void raise_on_status(const at::Tensor& status, const StatusContext& c) {
  if (!status_readback_enabled()) return;
  const at::Tensor host = status.cpu();
  const int64_t* s = host.data_ptr<int64_t>();
  auto bad = [&](StatusCode code) { return s[code] != -1; };
  const char* op = c.op;
  if (bad(kBadQuery)) raise_bad_queries(op);
  if (bad(kBadTarget))
    raise_bad_target(op, c.vocab, c.ignore_index, id_at(c.targets, s[kBadTarget]), s[kBadTarget]);
  if (bad(kBadToken))
    raise_bad_id(op, c.names.tokens, c.token_bound, id_at(c.tokens, s[kBadToken]), s[kBadToken]);
  if (bad(kBadScore))
    raise_bad_score(op, c.names.scores, value_at(c.scores, s[kBadScore]), s[kBadScore]);
  if (bad(kBadWeightNonFinite)) {
    const int64_t pos = s[kBadWeightNonFinite];
    raise_bad_score(op, c.names.weights, value_at(c.weights, pos), pos);
  }
  if (bad(kBadWeight))
    raise_bad_weight(op, c.names.weights, value_at(c.weights, s[kBadWeight]), s[kBadWeight]);
  if (bad(kBadTemperature))
    raise_bad_param(c, c.temperature, "temperature", ParamRange::Positive, s[kBadTemperature]);
  if (bad(kBadLam)) raise_bad_param(c, c.lam, "lam", ParamRange::UnitInterval, s[kBadLam]);
  if (bad(kBadLogitsRow)) raise_bad_logits_row(op, s[kBadLogitsRow]);
  if (bad(kBadExclude))
    raise_bad_exclude(op, c.entries, id_at(c.exclude, s[kBadExclude]), s[kBadExclude]);
}

// Neighbour inputs of one call for the kernels: the converted tensors (common/op_inputs.h,
// kept alive here) and the kernel arguments pointing into them (the kernels check the values).
struct NeighbourCall {
  NeighbourTensors t;
  NeighbourArgs args;
};

inline NeighbourCall neighbour_call(const at::Tensor& tokens,
                                    const c10::optional<at::Tensor>& scores,
                                    const c10::optional<at::Tensor>& weights,
                                    const at::Tensor& temperature, int64_t vocab,
                                    const NeighbourNames& names = kNeighbourNames) {
  NeighbourCall n;
  n.t = neighbour_tensors(tokens, scores, weights, temperature, names);
  n.args.tokens = n.t.tokens.data_ptr<int64_t>();
  n.args.scores = n.t.scores.defined() ? n.t.scores.data_ptr<float>() : nullptr;
  n.args.weights = n.t.weights.defined() ? n.t.weights.data_ptr<float>() : nullptr;
  n.args.k = n.t.tokens.size(1);
  n.args.vocab = vocab;
  n.args.temperature = RowScalarArg{n.t.temperature.data_ptr<float>(),
                                    n.t.temperature.numel() == 1 ? 0 : 1};
  return n;
}

// A per-row parameter (lam) for the kernels; `storage` keeps the float32 copy alive.
inline RowScalarArg row_scalar(at::Tensor& storage, const at::Tensor& t) {
  storage = as_float32(t).reshape({-1});
  return RowScalarArg{storage.data_ptr<float>(), storage.numel() == 1 ? 0 : 1};
}

inline StatusContext neighbour_context(const char* op, const NeighbourCall& n,
                                       int64_t token_bound) {
  StatusContext c;
  c.op = op;
  c.tokens = n.t.tokens;
  c.names = n.t.names;
  c.token_bound = token_bound;
  c.scores = n.t.scores;
  c.weights = n.t.weights;
  c.temperature = n.t.temperature;
  return c;
}

}  // namespace knnfast::cuda
