// Neighbour log-weights of one row on the GPU, computed by a whole block (the CUDA twin of
// csrc/cpu/neighbour_weights.h). A slot is valid when its token is >= 0 and its score is
// > -inf (scores) or its weight is > 0 (weights). log w_j = (z_j - max) - log(sum) over the
// valid z_j = s_j / tau (scores) or log w_j (weights). Nothing is staged per slot: the few
// values are re-read from global memory (L1/L2) when needed, so any k works.
#pragma once

#include "cuda/cuda_common.cuh"

namespace knnfast::cuda {

// Softmax statistics of a row's valid slots; any == false: no valid slot (P_kNN undefined).
struct NeighbourRow {
  float max;
  float log_sum;  // 0 in weights mode (weights are used as given)
  float tau;
  bool any;
};

// z_j of slot j of row r (-inf for an invalid slot). With `validate`, bad values are
// reported (each slot is validated by exactly one thread, in neighbour_row_stats).
__device__ __forceinline__ float slot_logit(const NeighbourArgs& nb, int64_t r, int64_t j,
                                            float tau, unsigned long long* status,
                                            bool validate) {
  const int64_t pos = r * nb.k + j;
  const int64_t token = load_token(nb.tokens, pos);
  const bool token_ok = valid_id(token, nb.vocab);
  if (validate && !token_ok) report(status, kBadToken, pos);
  if (nb.scores) {
    const float s = __ldg(nb.scores + pos);
    const bool bad = !valid_score(s);
    if (validate && bad) report(status, kBadScore, pos);
    return (token >= 0 && token_ok && !bad) ? s / tau : -INFINITY;
  }
  const float w = __ldg(nb.weights + pos);
  const bool non_finite = !valid_score(w);
  const bool bad = !valid_weight(w);  // NaN fails both
  if (validate && non_finite) report(status, kBadWeightNonFinite, pos);
  if (validate && bad && !non_finite) report(status, kBadWeight, pos);
  return (token >= 0 && token_ok && !bad && w > 0.0f) ? logf(w) : -INFINITY;
}

// Block-wide statistics of row r; every thread of the block must call it.
__device__ __forceinline__ NeighbourRow neighbour_row_stats(const NeighbourArgs& nb, int64_t r,
                                                           unsigned long long* status,
                                                           SoftmaxState* scratch) {
  float tau = nb.temperature.data[r * nb.temperature.stride];
  if (!valid_temperature(tau)) {
    if (threadIdx.x == 0) report(status, kBadTemperature, r);
    tau = 1.0f;
  }
  SoftmaxState state = softmax_state_empty();
  for (int64_t j = threadIdx.x; j < nb.k; j += blockDim.x)
    online_add(state, slot_logit(nb, r, j, tau, status, true));
  state = block_merge(state, scratch);
  NeighbourRow row;
  row.tau = tau;
  row.any = state.max != -INFINITY;
  row.max = state.max;
  row.log_sum = row.any ? logf(state.sum) : 0.0f;
  return row;
}

// log weight of slot j (-inf when invalid), as the CPU computes it.
__device__ __forceinline__ float slot_log_weight(const NeighbourArgs& nb, int64_t r, int64_t j,
                                                 const NeighbourRow& row) {
  const float z = slot_logit(nb, r, j, row.tau, nullptr, false);
  if (z == -INFINITY) return -INFINITY;
  return nb.scores ? (z - row.max) - row.log_sum : z;
}

// Slot j leads its token when it is valid and no earlier slot of the row is valid with the
// same token; the leader alone combines all slots of that token (in slot order, so the
// result is deterministic and needs no atomics).
__device__ __forceinline__ bool leads_token(const NeighbourArgs& nb, int64_t r, int64_t j,
                                            const NeighbourRow& row, int64_t token) {
  for (int64_t i = 0; i < j; ++i) {
    if (load_token(nb.tokens, r * nb.k + i) != token) continue;
    if (slot_log_weight(nb, r, i, row) != -INFINITY) return false;
  }
  return true;
}

// log sum of the weights of the valid slots j' >= j whose token is `token` (slot order).
__device__ __forceinline__ float token_log_mass_from(const NeighbourArgs& nb, int64_t r,
                                                     int64_t j, const NeighbourRow& row,
                                                     int64_t token) {
  float acc = -INFINITY;
  for (int64_t i = j; i < nb.k; ++i)
    if (load_token(nb.tokens, r * nb.k + i) == token)
      acc = logaddexp(acc, slot_log_weight(nb, r, i, row));
  return acc;
}

// sum of the weights (probabilities) of the valid slots j' >= j whose token is `token`,
// accumulated from 0 in slot order like the CPU kernel.
__device__ __forceinline__ float token_mass_from(const NeighbourArgs& nb, int64_t r, int64_t j,
                                                 const NeighbourRow& row, int64_t token) {
  float acc = 0.0f;
  for (int64_t i = j; i < nb.k; ++i) {
    if (load_token(nb.tokens, r * nb.k + i) != token) continue;
    const float lw = slot_log_weight(nb, r, i, row);
    if (lw != -INFINITY) acc += expf(lw);
  }
  return acc;
}

}  // namespace knnfast::cuda
