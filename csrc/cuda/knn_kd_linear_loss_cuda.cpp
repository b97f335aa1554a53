// knn_kd_linear_loss on CUDA: argument checks (common/op_checks.h), conversions and launches
// (kernels in knn_kd_linear_loss.cu). `chunk` is a CPU tiling knob: the CUDA tiles are fixed
// (the kernels' kBT x kBV), so it is checked and otherwise ignored here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_utils.h"
#include "cuda/knn_kd_linear_loss.h"

namespace knnfast::cuda {
namespace {

constexpr const char* kOp = "knn_kd_linear_loss";

// Validated inputs of both directions (values are checked in the kernels).
struct LinearKdCall {
  at::Tensor hidden, weight, bias, targets;
  NeighbourCall teacher;
  LinearKdArgs args;
};

// hidden and weight share one kernel element type: float16 / bfloat16 when the weight is
// (hidden converted to it, [T, D] is small), else float32.
at::ScalarType kernel_type(const at::Tensor& weight) {
  const auto s = weight.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 ? s : at::kFloat;
}

LinearKdCall linear_kd_call(const at::Tensor& hidden, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                            const at::Tensor& tokens, const c10::optional<at::Tensor>& scores,
                            const c10::optional<at::Tensor>& probs,
                            const at::Tensor& temperature, double ce_weight, double kd_weight,
                            double label_smoothing, int64_t ignore_index, int64_t chunk,
                            const at::Tensor* grad_rows = nullptr,
                            const at::Tensor* lse = nullptr) {
  check_knn_kd_linear_loss_args(hidden, weight, bias, targets, tokens, scores, probs,
                                temperature, ce_weight, kd_weight, label_smoothing, chunk,
                                grad_rows, lse, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(hidden.device());
  LinearKdCall c;
  const at::ScalarType type = kernel_type(weight);
  c.weight = weight.to(type).contiguous();
  c.hidden = hidden.to(type).contiguous();
  if (bias.has_value()) c.bias = as_float32(*bias);
  c.targets = as_int64(targets);
  c.teacher = neighbour_call(tokens, scores, probs, temperature, weight.size(0), kTeacherNames);
  LinearKdArgs& a = c.args;
  a.hidden = c.hidden.data_ptr();
  a.weight = c.weight.data_ptr();
  a.type = float_type(c.weight);
  a.bias = c.bias.defined() ? c.bias.data_ptr<float>() : nullptr;
  a.T = hidden.size(0);
  a.V = weight.size(0);
  a.D = hidden.size(1);
  a.targets = c.targets.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.nb = c.teacher.args;
  a.w = KdWeights{float(ce_weight), float(kd_weight), float(label_smoothing)};
  return c;
}

void raise_linear_kd_status(const at::Tensor& status, const LinearKdCall& c) {
  StatusContext ctx = neighbour_context(kOp, c.teacher, c.args.V);
  ctx.targets = c.targets;
  ctx.vocab = c.args.V;
  ctx.ignore_index = c.args.ignore_index;
  raise_on_status(status, ctx);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_kd_linear_loss_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& teacher_tokens,
    const c10::optional<at::Tensor>& teacher_scores,
    const c10::optional<at::Tensor>& teacher_probs, const at::Tensor& temperature,
    double ce_weight, double kd_weight, double label_smoothing, int64_t ignore_index, bool kl,
    int64_t chunk) {
  const LinearKdCall c = linear_kd_call(hidden, weight, bias, targets, teacher_tokens,
                                        teacher_scores, teacher_probs, temperature, ce_weight,
                                        kd_weight, label_smoothing, ignore_index, chunk);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = c.args.T, k = c.args.nb.k;
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat);
  at::Tensor part = at::empty({3 * knn_kd_linear_loss_spans(c.args.V) * T}, f32);
  at::Tensor x_target = at::empty({T}, f32), x_teacher = at::empty({T * k}, f32);
  at::Tensor loss = at::empty({T}, f32), lse = at::empty({T}, f32);
  const at::Tensor status = new_status(hidden.device());
  launch_knn_kd_linear_loss(c.args, kl, part.data_ptr<float>(), x_target.data_ptr<float>(),
                            x_teacher.data_ptr<float>(), loss.data_ptr<float>(),
                            lse.data_ptr<float>(), status_ptr(status), current_stream());
  raise_linear_kd_status(status, c);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_kd_linear_loss_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
    const at::Tensor& teacher_tokens, const c10::optional<at::Tensor>& teacher_scores,
    const c10::optional<at::Tensor>& teacher_probs, const at::Tensor& temperature,
    const at::Tensor& lse, double ce_weight, double kd_weight, double label_smoothing,
    int64_t ignore_index, int64_t chunk) {
  const LinearKdCall c = linear_kd_call(hidden, weight, bias, targets, teacher_tokens,
                                        teacher_scores, teacher_probs, temperature, ce_weight,
                                        kd_weight, label_smoothing, ignore_index, chunk,
                                        &grad_rows, &lse);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = c.args.T, V = c.args.V, D = c.args.D, k = c.args.nb.k;
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor g = as_float32(grad_rows), lse_f = as_float32(lse);
  at::Tensor slot_w = at::empty({T * k}, f32), mass = at::empty({T}, f32);
  // float32 accumulators for the atomics (for float32 weights: the gradients themselves)
  at::Tensor grad_hidden = at::zeros({T, D}, f32), grad_weight = at::zeros({V, D}, f32);
  at::Tensor grad_bias = at::zeros({V}, f32);
  const at::Tensor status = new_status(hidden.device());
  launch_knn_kd_linear_loss_backward(c.args, g.data_ptr<float>(), lse_f.data_ptr<float>(),
                                     slot_w.data_ptr<float>(), mass.data_ptr<float>(),
                                     grad_hidden.data_ptr<float>(),
                                     grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>(),
                                     status_ptr(status), current_stream());
  raise_linear_kd_status(status, c);
  const at::ScalarType bias_type = bias.has_value() ? bias->scalar_type() : weight.scalar_type();
  return {grad_hidden.to(hidden.scalar_type()), grad_weight.to(weight.scalar_type()),
          grad_bias.to(bias_type)};
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) {
  m.impl("knn_kd_linear_loss", &knn_kd_linear_loss_cuda);
  m.impl("knn_kd_linear_loss_backward", &knn_kd_linear_loss_backward_cuda);
}

}  // namespace knnfast::cuda
