// knn_kd_linear_loss on CPU: knn_kd_loss of the logits hidden W^T + b without ever holding
// the [T, V] logits (Cut Cross-Entropy / Liger's fused linear cross-entropy, here with the
// sparse kNN teacher). The vocabulary is walked in chunks of C columns:
//   forward:  tile = hidden W_c^T + b_c ([T, C] float32, one GEMM), then per row
//             (at::parallel_for) an online log-sum-exp, the row sum (label smoothing) and the
//             target / teacher logits that fall in the chunk; at the end
//             loss = cw [(1-eps)(lse - x_y) + eps (lse - mean x)] + kw KD,
//             KD = -sum_j w_j (x_tj - lse)  [+ sum_v P_v log P_v for KL].
//   backward: the tile is recomputed and overwritten by its gradient
//             G = g [(cw + kw M) softmax - cw eps / V] - g cw (1-eps) [v = y] - g kw P_v
//             (M: the valid teacher mass, see cpu/kd_teacher.h), then
//             grad_hidden += G W_c, grad_weight_c = G^T hidden, grad_bias_c = sum_rows G.
// Besides the inputs and the gradients, only the tile (at most kTileFloats), a float32 copy
// of one weight chunk (non-float32 weights) and O(T k) row state exist. Accumulation is
// float32 (GEMMs) and double (per-row sums) whatever the input dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <utility>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/kd_teacher.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {
namespace {

constexpr const char* kOp = "knn_kd_linear_loss";
// The logits tile holds at most 2 Mi floats (8 MiB): 0.6% of one fp32 [T, V] at T = 8192,
// V = 42024, while C = 256 columns there still keeps the GEMMs efficient.
constexpr int64_t kTileFloats = int64_t(1) << 21;
constexpr int64_t kMinChunk = 128;

// The teacher, summarised per row once per call (it does not depend on the logits).
struct Teacher {
  at::Tensor tokens;                // [T, k] int64, ids checked < V
  std::vector<float> w;             // [T * k] slot weights, 0 on invalid slots
  std::vector<float> mass;          // [T] valid mass M (0: no teacher)
  std::vector<float> neg_entropy;   // [T] sum_v P_v log P_v (KL only)
  int64_t k = 0;
};

struct LinearKdInputs {
  at::Tensor hidden;   // [T, D] float32 contiguous
  at::Tensor weight;   // [V, D] as given, contiguous
  at::Tensor bias;     // [V] float32, or undefined
  at::Tensor targets;  // [T] int64
  Teacher teacher;
  int64_t T = 0, V = 0, D = 0, chunk = 0;
  float cw = 0, kw = 0, eps = 0;
  int64_t ignore_index = 0;
};

Teacher teacher_terms(const NeighbourInputs& nb, int64_t T, bool kl) {
  Teacher t;
  t.tokens = nb.tokens;
  t.k = nb.src.k;
  t.w.assign(T * t.k, 0.0f);
  t.mass.assign(T, 0.0f);
  t.neg_entropy.assign(T, 0.0f);
  const int64_t k = t.k;
  const int64_t* tok = t.tokens.data_ptr<int64_t>();
  at::parallel_for(0, T, row_grain(8 * k + 1), [&](int64_t begin, int64_t end) {
    Scratch<float> log_w_buf;
    std::vector<std::pair<int64_t, float>> pairs;
    float* log_w = log_w_buf.get(k, 0.0f);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* tr = tok + r * k;
      const bool has = neighbour_log_weights(nb.src, r, tr, nb.temperature[r], log_w);
      if (!has) continue;
      for (int64_t j = 0; j < k; ++j)
        if (tr[j] >= 0 && log_w[j] > -INFINITY) t.w[r * k + j] = std::exp(log_w[j]);
      t.mass[r] = valid_mass(tr, log_w, k, has);
      if (kl) t.neg_entropy[r] = teacher_neg_entropy(tr, log_w, k, pairs);
    }
  });
  return t;
}

int64_t chunk_columns(int64_t T, int64_t V, int64_t chunk) {
  if (chunk > 0) return std::min(chunk, V);
  return std::min(V, std::max(kMinChunk, kTileFloats / T));
}

// check_knn_kd_linear_loss_args, then the values (targets, teacher) and the conversions.
LinearKdInputs linear_kd_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                                const at::Tensor& tokens, const c10::optional<at::Tensor>& scores,
                                const c10::optional<at::Tensor>& probs,
                                const at::Tensor& temperature, double ce_weight,
                                double kd_weight, double label_smoothing, int64_t ignore_index,
                                bool kl, int64_t chunk, const at::Tensor* grad_rows = nullptr,
                                const at::Tensor* lse = nullptr) {
  check_knn_kd_linear_loss_args(hidden, weight, bias, targets, tokens, scores, probs,
                                temperature, ce_weight, kd_weight, label_smoothing, chunk,
                                grad_rows, lse, Backend::CPU);
  LinearKdInputs in;
  in.hidden = as_float32(hidden);
  in.weight = weight.contiguous();
  if (bias.has_value()) in.bias = as_float32(*bias);
  in.T = hidden.size(0);
  in.D = hidden.size(1);
  in.V = weight.size(0);
  in.chunk = chunk_columns(in.T, in.V, chunk);
  in.targets = checked_targets(targets, in.V, ignore_index, kOp);
  const NeighbourInputs nb =
      neighbour_inputs(tokens, scores, probs, temperature, in.V, kOp, kTeacherNames);
  in.teacher = teacher_terms(nb, in.T, kl);
  in.cw = float(ce_weight);
  in.kw = float(kd_weight);
  in.eps = float(label_smoothing);
  in.ignore_index = ignore_index;
  return in;
}

// tile [T, n] = hidden W[c0 : c0 + n]^T + b[c0 : c0 + n] (float32). Returns the float32
// weight chunk (a view of the weight, or of w_buf when the weight is not float32).
at::Tensor logits_tile(const LinearKdInputs& in, int64_t c0, int64_t n, at::Tensor& tile,
                       const at::Tensor& w_buf) {
  at::Tensor w = in.weight.narrow(0, c0, n);
  if (w.scalar_type() != at::kFloat) w = w_buf.narrow(0, 0, n).copy_(w);
  if (in.bias.defined())
    at::addmm_out(tile, in.bias.narrow(0, c0, n), in.hidden, w.t());
  else
    at::mm_out(tile, in.hidden, w.t());
  return w;
}

// Running per-row state of the forward over the chunks.
struct RowState {
  float max = -INFINITY;
  double sum = 0.0;   // sum exp(x - max)
  double xsum = 0.0;  // sum x (label smoothing)
  float x_target = 0.0f;
  bool bad = false;
};

// Folds row r's chunk x[0 : n) (columns c0 ...) into its state and picks the target and
// teacher logits that fall in it (x_teacher: the row's k slots).
void absorb_chunk(const LinearKdInputs& in, int64_t r, const float* x, int64_t c0, int64_t n,
                  RowState& s, float* x_teacher) {
  const RowLogSumExp c = row_logsumexp(x, n);
  if (c.bad) {
    s.bad = true;
    return;
  }
  if (c.max > s.max) {
    s.sum = s.sum * std::exp(double(s.max) - c.max) + std::exp(double(c.log_sum));
    s.max = c.max;
  } else if (c.max > -INFINITY) {
    s.sum += std::exp(double(c.log_sum) + c.max - s.max);
  }
  if (in.eps > 0.0f) s.xsum += row_sum(x, n);
  const int64_t y = in.targets.data_ptr<int64_t>()[r] - c0;
  if (y >= 0 && y < n) s.x_target = x[y];
  const int64_t* t = in.teacher.tokens.data_ptr<int64_t>() + r * in.teacher.k;
  for (int64_t j = 0; j < in.teacher.k; ++j)
    if (t[j] >= c0 && t[j] < c0 + n) x_teacher[j] = x[t[j] - c0];
}

// The row's loss from its finished state; writes its log-sum-exp.
float row_loss(const LinearKdInputs& in, int64_t r, const RowState& s, const float* x_teacher,
               float& lse_out) {
  const double lse = double(s.max) + std::log(s.sum);
  lse_out = float(lse);
  double ce = (1.0 - in.eps) * (lse - s.x_target);
  if (in.eps > 0.0f) ce += in.eps * (lse - s.xsum / double(in.V));
  const int64_t k = in.teacher.k;
  const float* w = in.teacher.w.data() + r * k;
  double kd = in.teacher.neg_entropy[r];
  for (int64_t j = 0; j < k; ++j)
    if (w[j] > 0.0f) kd += double(w[j]) * (lse - x_teacher[j]);
  return float(in.cw * ce + in.kw * kd);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_kd_linear_loss_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& teacher_tokens,
    const c10::optional<at::Tensor>& teacher_scores,
    const c10::optional<at::Tensor>& teacher_probs, const at::Tensor& temperature,
    double ce_weight, double kd_weight, double label_smoothing, int64_t ignore_index, bool kl,
    int64_t chunk) {
  const LinearKdInputs in = linear_kd_inputs(hidden, weight, bias, targets, teacher_tokens,
                                             teacher_scores, teacher_probs, temperature,
                                             ce_weight, kd_weight, label_smoothing,
                                             ignore_index, kl, chunk);
  const int64_t T = in.T, k = in.teacher.k, C = in.chunk;
  const at::TensorOptions f32 = in.hidden.options();
  at::Tensor tile_buf = at::empty({T * C}, f32);
  at::Tensor w_buf = at::empty({C, in.D}, f32);
  std::vector<RowState> state(T);
  std::vector<float> x_teacher(T * k, 0.0f);
  const int64_t* tgt = in.targets.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < in.V; c0 += C) {
    const int64_t n = std::min(C, in.V - c0);
    at::Tensor tile = tile_buf.narrow(0, 0, T * n).view({T, n});
    logits_tile(in, c0, n, tile, w_buf);
    const float* x = tile.data_ptr<float>();
    at::parallel_for(0, T, row_grain(n + k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        if (tgt[r] != ignore_index && !state[r].bad)
          absorb_chunk(in, r, x + r * n, c0, n, state[r], x_teacher.data() + r * k);
    });
  }
  at::Tensor out = at::zeros({T}, f32), lse = at::zeros({T}, f32);
  float* o = out.data_ptr<float>();
  float* l = lse.data_ptr<float>();
  for (int64_t r = 0; r < T; ++r) {
    if (tgt[r] == ignore_index) continue;  // masked: loss 0
    if (state[r].bad) raise_bad_logits_row(kOp, r);
    o[r] = row_loss(in, r, state[r], x_teacher.data() + r * k, l[r]);
  }
  return {out, lse};
}

namespace {

// Overwrites the logits tile x [T, n] (columns c0 ...) with d sum_r g_r loss_r / d logits.
void gradient_tile(const LinearKdInputs& in, const float* g_rows, const float* lse, float* x,
                   int64_t c0, int64_t n) {
  const int64_t k = in.teacher.k;
  const int64_t* tgt = in.targets.data_ptr<int64_t>();
  const int64_t* tok = in.teacher.tokens.data_ptr<int64_t>();
  at::parallel_for(0, in.T, row_grain(n + k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = x + r * n;
      const float g = g_rows[r];
      if (tgt[r] == in.ignore_index || g == 0.0f) {
        std::fill(row, row + n, 0.0f);
        continue;
      }
      const float scale = g * (in.cw + in.kw * in.teacher.mass[r]);
      row_softmax_affine(row, lse[r], 0.0f, scale, -g * in.cw * in.eps / float(in.V), row, n);
      const int64_t y = tgt[r] - c0;
      if (y >= 0 && y < n) row[y] -= g * in.cw * (1.0f - in.eps);
      const int64_t* t = tok + r * k;
      const float* w = in.teacher.w.data() + r * k;
      for (int64_t j = 0; j < k; ++j)
        if (w[j] > 0.0f && t[j] >= c0 && t[j] < c0 + n) row[t[j] - c0] -= g * in.kw * w[j];
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_kd_linear_loss_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& teacher_tokens, const c10::optional<at::Tensor>& teacher_scores,
    const c10::optional<at::Tensor>& teacher_probs, const at::Tensor& temperature,
    const at::Tensor& lse_in, double ce_weight, double kd_weight, double label_smoothing,
    int64_t ignore_index, int64_t chunk) {
  const LinearKdInputs in = linear_kd_inputs(hidden, weight, bias, targets, teacher_tokens,
                                             teacher_scores, teacher_probs, temperature,
                                             ce_weight, kd_weight, label_smoothing,
                                             ignore_index, false, chunk, &grad_rows, &lse_in);
  const int64_t T = in.T, C = in.chunk;
  const at::TensorOptions f32 = in.hidden.options();
  const at::Tensor g = as_float32(grad_rows), lse = as_float32(lse_in);
  at::Tensor tile_buf = at::empty({T * C}, f32);
  at::Tensor w_buf = at::empty({C, in.D}, f32);
  const bool w_f32 = in.weight.scalar_type() == at::kFloat;
  at::Tensor grad_hidden = at::zeros({T, in.D}, f32);
  at::Tensor grad_weight = at::empty({in.V, in.D}, in.weight.options());
  at::Tensor gw_buf = w_f32 ? at::Tensor() : at::empty({C, in.D}, f32);
  at::Tensor grad_bias = at::empty({in.V}, f32);
  for (int64_t c0 = 0; c0 < in.V; c0 += C) {
    const int64_t n = std::min(C, in.V - c0);
    at::Tensor tile = tile_buf.narrow(0, 0, T * n).view({T, n});
    const at::Tensor w = logits_tile(in, c0, n, tile, w_buf);
    gradient_tile(in, g.data_ptr<float>(), lse.data_ptr<float>(), tile.data_ptr<float>(), c0, n);
    grad_hidden.addmm_(tile, w);
    at::Tensor gw = grad_weight.narrow(0, c0, n);
    if (w_f32) {
      at::mm_out(gw, tile.t(), in.hidden);
    } else {
      at::Tensor gw_f32 = gw_buf.narrow(0, 0, n);
      gw.copy_(at::mm_out(gw_f32, tile.t(), in.hidden));
    }
    at::Tensor gb = grad_bias.narrow(0, c0, n);
    at::sum_out(gb, tile, {0});
  }
  const at::ScalarType bias_type = bias.has_value() ? bias->scalar_type() : weight.scalar_type();
  return {grad_hidden.to(hidden.scalar_type()), grad_weight, grad_bias.to(bias_type)};
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) {
  m.impl("knn_kd_linear_loss", &knn_kd_linear_loss_cpu);
  m.impl("knn_kd_linear_loss_backward", &knn_kd_linear_loss_backward_cpu);
}

}  // namespace knnfast::cpu
