// knn_kd_loss on CPU (kNN-KD, Yang et al. 2022), per row:
//   loss = ce_weight * [(1 - eps) (lse - x_y) + eps (lse - mean x)] + kd_weight * KD,
//   KD   = -sum_j w_j log p(t_j)  (H(p_T, p))   [+ sum_v P_v log P_v for KL],
// with w = softmax(teacher_scores / tau) over the valid slots (or the given teacher_probs) and
// P_v the teacher mass of token v. Forward reads each logits row once (log-sum-exp, plus one
// sum for label smoothing, from cache); only the k teacher logits are gathered, so no dense
// [B, V] teacher exists. Backward writes
//   grad = g [(ce_weight + kd_weight M) softmax - ce_weight eps / V]  (M = valid teacher mass)
// in one vectorized pass, then subtracts g ce_weight (1 - eps) at y and g kd_weight w_j at
// each t_j (duplicates add up, as P_v does).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/kd_teacher.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

constexpr const char* kOp = "knn_kd_loss";

struct KdInputs {
  at::Tensor logits, targets;
  NeighbourInputs teacher;
  int64_t B = 0, V = 0;
};

// check_knn_kd_loss_args, then the values (targets, teacher tokens / scores / probs,
// temperature). grad_rows: the backward's incoming gradient [B], or null.
KdInputs kd_inputs(const at::Tensor& logits_in, const at::Tensor& targets_in,
                   const at::Tensor& tokens, const c10::optional<at::Tensor>& scores,
                   const c10::optional<at::Tensor>& probs, const at::Tensor& temperature,
                   int64_t ignore_index, double ce_weight, double kd_weight,
                   double label_smoothing, const at::Tensor* grad_rows = nullptr) {
  check_knn_kd_loss_args(logits_in, targets_in, tokens, scores, probs, temperature, ce_weight,
                         kd_weight, label_smoothing, grad_rows, Backend::CPU);
  KdInputs in;
  in.logits = logits_in.contiguous();
  in.B = in.logits.size(0);
  in.V = in.logits.size(1);
  in.targets = checked_targets(targets_in, in.V, ignore_index, kOp);
  in.teacher = neighbour_inputs(tokens, scores, probs, temperature, in.V, kOp, kTeacherNames);
  return in;
}

}  // namespace

at::Tensor knn_kd_loss_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in,
                           const at::Tensor& teacher_tokens,
                           const c10::optional<at::Tensor>& teacher_scores,
                           const c10::optional<at::Tensor>& teacher_probs,
                           const at::Tensor& temperature, double ce_weight, double kd_weight,
                           double label_smoothing, int64_t ignore_index, bool kl) {
  const KdInputs in = kd_inputs(logits_in, targets_in, teacher_tokens, teacher_scores,
                                teacher_probs, temperature, ignore_index, ce_weight, kd_weight,
                                label_smoothing);
  const int64_t B = in.B, V = in.V, k = in.teacher.src.k;
  const int64_t* tgt = in.targets.data_ptr<int64_t>();
  const int64_t* tok = in.teacher.tokens.data_ptr<int64_t>();
  const float eps = float(label_smoothing), cw = float(ce_weight), kw = float(kd_weight);
  at::Tensor out = at::zeros({B}, in.logits.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, B, row_grain(V + k), [&](int64_t begin, int64_t end) {
    Scratch<float> log_w_buf, row_buf;
    std::vector<std::pair<int64_t, float>> pairs;
    float* log_w = log_w_buf.get(k, 0.0f);
    float* buf = in.logits.scalar_type() == at::kFloat ? nullptr : row_buf.get(V, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      if (tgt[r] == ignore_index) continue;  // masked: stays 0
      const float* x = logits_row_f32(in.logits, r, buf);
      const RowLogSumExp lse = row_logsumexp(x, V);
      if (lse.bad) {
        bad_row = r;
        continue;
      }
      auto logp = [&](int64_t v) { return (x[v] - lse.max) - lse.log_sum; };
      float ce = -(1.0f - eps) * logp(tgt[r]);
      if (eps > 0.0f) ce -= eps * ((row_sum(x, V) / float(V) - lse.max) - lse.log_sum);
      const int64_t* t = tok + r * k;
      float kd = 0.0f;
      if (neighbour_log_weights(in.teacher.src, r, t, in.teacher.temperature[r], log_w)) {
        for (int64_t j = 0; j < k; ++j)
          if (t[j] >= 0 && log_w[j] > -INFINITY) kd -= std::exp(log_w[j]) * logp(t[j]);
        if (kl) kd += teacher_neg_entropy(t, log_w, k, pairs);
      }
      o[r] = cw * ce + kw * kd;
    }
  });
  if (bad_row.load() >= 0) raise_bad_logits_row(kOp, bad_row.load());
  return out;
}

namespace {

// Writes d sum_r grad_rows[r] loss[r] / d logits into `out` ([B, V] float32, contiguous). `out`
// may be the float32 logits themselves: each row is fully read (log-sum-exp) before it is
// overwritten element by element.
void kd_gradient(const KdInputs& in, const at::Tensor& grad_rows_in, double ce_weight,
                 double kd_weight, double label_smoothing, int64_t ignore_index, float* gp) {
  const int64_t B = in.B, V = in.V, k = in.teacher.src.k;
  const at::Tensor grad_rows = as_float32(grad_rows_in);
  const float* g_rows = grad_rows.data_ptr<float>();
  const int64_t* tgt = in.targets.data_ptr<int64_t>();
  const int64_t* tok = in.teacher.tokens.data_ptr<int64_t>();
  const float eps = float(label_smoothing), cw = float(ce_weight), kw = float(kd_weight);
  at::parallel_for(0, B, row_grain(V + k), [&](int64_t begin, int64_t end) {
    Scratch<float> log_w_buf, row_buf;
    float* log_w = log_w_buf.get(k, 0.0f);
    float* buf = in.logits.scalar_type() == at::kFloat ? nullptr : row_buf.get(V, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      float* out = gp + r * V;
      const float g = g_rows[r];
      if (tgt[r] == ignore_index || g == 0.0f) {
        std::fill(out, out + V, 0.0f);
        continue;
      }
      const float* x = logits_row_f32(in.logits, r, buf);
      const RowLogSumExp lse = row_logsumexp(x, V);
      if (lse.bad) raise_bad_logits_row(kOp, r);
      const int64_t* t = tok + r * k;
      const bool has = neighbour_log_weights(in.teacher.src, r, t, in.teacher.temperature[r],
                                             log_w);
      row_softmax_affine(x, lse.max, lse.log_sum, g * (cw + kw * valid_mass(t, log_w, k, has)),
                         -g * cw * eps / float(V), out, V);
      out[tgt[r]] -= g * cw * (1.0f - eps);
      if (has)
        for (int64_t j = 0; j < k; ++j)
          if (t[j] >= 0 && log_w[j] > -INFINITY) out[t[j]] -= g * kw * std::exp(log_w[j]);
    }
  });
}

}  // namespace

at::Tensor knn_kd_loss_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& logits_in,
                                    const at::Tensor& targets_in,
                                    const at::Tensor& teacher_tokens,
                                    const c10::optional<at::Tensor>& teacher_scores,
                                    const c10::optional<at::Tensor>& teacher_probs,
                                    const at::Tensor& temperature, double ce_weight,
                                    double kd_weight, double label_smoothing,
                                    int64_t ignore_index) {
  const KdInputs in = kd_inputs(logits_in, targets_in, teacher_tokens, teacher_scores,
                                teacher_probs, temperature, ignore_index, ce_weight, kd_weight,
                                label_smoothing, &grad_rows);
  at::Tensor grad = empty_output({in.B, in.V}, in.logits.options().dtype(at::kFloat));
  kd_gradient(in, grad_rows, ce_weight, kd_weight, label_smoothing, ignore_index,
              grad.data_ptr<float>());
  return grad;
}

void knn_kd_loss_grad_cpu_(const at::Tensor& logits, const at::Tensor& grad_rows,
                           const at::Tensor& targets, const at::Tensor& teacher_tokens,
                           const c10::optional<at::Tensor>& teacher_scores,
                           const c10::optional<at::Tensor>& teacher_probs,
                           const at::Tensor& temperature, double ce_weight, double kd_weight,
                           double label_smoothing, int64_t ignore_index) {
  knnfast::check_in_place_logits(logits, "knn_kd_loss_grad_");
  const KdInputs in = kd_inputs(logits, targets, teacher_tokens, teacher_scores, teacher_probs,
                                temperature, ignore_index, ce_weight, kd_weight,
                                label_smoothing, &grad_rows);
  kd_gradient(in, grad_rows, ce_weight, kd_weight, label_smoothing, ignore_index,
              logits.data_ptr<float>());
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) {
  m.impl("knn_kd_loss", &knn_kd_loss_cpu);
  m.impl("knn_kd_loss_backward", &knn_kd_loss_backward_cpu);
  m.impl("knn_kd_loss_grad_", &knn_kd_loss_grad_cpu_);
}

}  // namespace knnfast::cpu
