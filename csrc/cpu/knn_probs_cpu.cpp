// knn_probs / knn_probs_sparse on CPU: M . softmax(scores / tau) as a dense [B, V] row or as
// k slots with duplicate tokens merged into their first occurrence.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/cpu_utils.h"

namespace knnfast::cpu {

at::Tensor knn_probs_cpu(const at::Tensor& scores, const at::Tensor& tokens, int64_t vocab_size,
                         const at::Tensor& temperature) {
  constexpr const char* kOp = "knn_probs";
  check_knn_probs_args(scores, tokens, vocab_size, temperature, Backend::CPU, kOp);
  const int64_t B = tokens.size(0);
  NeighbourInputs in = neighbour_inputs(tokens, scores, c10::nullopt, temperature, vocab_size, kOp);
  const int64_t k = in.src.k;
  // Rows with no valid neighbour stay all zeros (P_kNN undefined; never NaN).
  at::Tensor out = empty_output({B, vocab_size}, scores.options().dtype(at::kFloat));
  out.zero_();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, row_grain(vocab_size + k), [&](int64_t begin, int64_t end) {
    Scratch<float> log_w_buf;
    float* log_w = log_w_buf.get(k, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* toks = in.tokens.data_ptr<int64_t>() + r * k;
      if (!neighbour_log_weights(in.src, r, toks, in.temperature[r], log_w)) continue;
      for (int64_t j = 0; j < k; ++j)
        if (log_w[j] != -INFINITY) o[r * vocab_size + toks[j]] += std::exp(log_w[j]);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> knn_probs_sparse_cpu(const at::Tensor& scores,
                                                        const at::Tensor& tokens,
                                                        const at::Tensor& temperature) {
  constexpr const char* kOp = "knn_probs_sparse";
  check_knn_probs_args(scores, tokens, c10::nullopt, temperature, Backend::CPU, kOp);
  const int64_t B = tokens.size(0);
  NeighbourInputs in = neighbour_inputs(tokens, scores, c10::nullopt, temperature, -1, kOp);
  const int64_t k = in.src.k;
  at::Tensor out_tokens = at::full({B, k}, -1, in.tokens.options());
  at::Tensor out_probs = at::zeros({B, k}, scores.options().dtype(at::kFloat));
  int64_t* ot = out_tokens.data_ptr<int64_t>();
  float* op = out_probs.data_ptr<float>();
  at::parallel_for(0, B, row_grain(k * k / 2), [&](int64_t begin, int64_t end) {
    Scratch<float> log_w_buf;
    float* log_w = log_w_buf.get(k, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* toks = in.tokens.data_ptr<int64_t>() + r * k;
      if (!neighbour_log_weights(in.src, r, toks, in.temperature[r], log_w)) continue;
      // O(k^2) first-occurrence search: no vocabulary bound is known here, and k <= 2048.
      for (int64_t j = 0; j < k; ++j) {
        if (log_w[j] == -INFINITY) continue;
        int64_t first = j;
        for (int64_t i = 0; i < j; ++i) {
          if (ot[r * k + i] == toks[j]) {
            first = i;
            break;
          }
        }
        ot[r * k + first] = toks[j];
        op[r * k + first] += std::exp(log_w[j]);
      }
    }
  });
  return {out_tokens, out_probs};
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) {
  m.impl("knn_probs", &knn_probs_cpu);
  m.impl("knn_probs_sparse", &knn_probs_sparse_cpu);
}

}  // namespace knnfast::cpu
