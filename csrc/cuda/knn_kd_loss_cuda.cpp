// knn_kd_loss on CUDA: argument checks (common/op_checks.h) and launches (kernels in
// knn_kd_loss.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"
#include "cuda/knn_kd_loss.h"

namespace knnfast::cuda {
namespace {

constexpr const char* kOp = "knn_kd_loss";

// Validated inputs of both directions (values are checked in the kernels).
struct KdCall {
  at::Tensor logits, targets;
  NeighbourCall teacher;
  KdWeights weights;
  int64_t B = 0, V = 0;
};

// check_knn_kd_loss_args (grad_rows: the backward's incoming gradient [B], or null), then the
// conversions for the kernels (which check the values). The caller guards the device of
// c.logits for its launches.
KdCall kd_call(const at::Tensor& logits_in, const at::Tensor& targets_in,
               const at::Tensor& tokens, const c10::optional<at::Tensor>& scores,
               const c10::optional<at::Tensor>& probs, const at::Tensor& temperature,
               double ce_weight, double kd_weight, double label_smoothing,
               const at::Tensor* grad_rows = nullptr) {
  check_knn_kd_loss_args(logits_in, targets_in, tokens, scores, probs, temperature, ce_weight,
                         kd_weight, label_smoothing, grad_rows, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  KdCall c;
  c.logits = logits_in.contiguous();
  c.B = c.logits.size(0);
  c.V = c.logits.size(1);
  c.targets = as_int64(targets_in);
  c.teacher = neighbour_call(tokens, scores, probs, temperature, c.V, kTeacherNames);
  c.weights = KdWeights{float(ce_weight), float(kd_weight), float(label_smoothing)};
  return c;
}

void raise_kd_status(const at::Tensor& status, const KdCall& c, int64_t ignore_index) {
  StatusContext ctx = neighbour_context(kOp, c.teacher, c.V);
  ctx.targets = c.targets;
  ctx.vocab = c.V;
  ctx.ignore_index = ignore_index;
  raise_on_status(status, ctx);
}

}  // namespace

at::Tensor knn_kd_loss_cuda(const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& teacher_tokens,
                            const c10::optional<at::Tensor>& teacher_scores,
                            const c10::optional<at::Tensor>& teacher_probs,
                            const at::Tensor& temperature, double ce_weight, double kd_weight,
                            double label_smoothing, int64_t ignore_index, bool kl) {
  const KdCall c = kd_call(logits, targets, teacher_tokens, teacher_scores, teacher_probs,
                           temperature, ce_weight, kd_weight, label_smoothing);
  const c10::cuda::CUDAGuard guard(c.logits.device());
  at::Tensor out = at::empty({c.B}, c.logits.options().dtype(at::kFloat));
  const at::Tensor status = new_status(c.logits.device());
  launch_knn_kd_loss(c.logits.data_ptr(), float_type(c.logits), c.B, c.V,
                     c.targets.data_ptr<int64_t>(), ignore_index, c.teacher.args, c.weights, kl,
                     out.data_ptr<float>(), status_ptr(status), current_stream());
  raise_kd_status(status, c, ignore_index);
  return out;
}

at::Tensor knn_kd_loss_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& logits,
                                     const at::Tensor& targets, const at::Tensor& teacher_tokens,
                                     const c10::optional<at::Tensor>& teacher_scores,
                                     const c10::optional<at::Tensor>& teacher_probs,
                                     const at::Tensor& temperature, double ce_weight,
                                     double kd_weight, double label_smoothing,
                                     int64_t ignore_index) {
  const KdCall c = kd_call(logits, targets, teacher_tokens, teacher_scores, teacher_probs,
                           temperature, ce_weight, kd_weight, label_smoothing, &grad_rows);
  const c10::cuda::CUDAGuard guard(c.logits.device());
  const at::Tensor g = as_float32(grad_rows);
  at::Tensor grad = at::empty({c.B, c.V}, c.logits.options().dtype(at::kFloat));
  const at::Tensor status = new_status(c.logits.device());
  launch_knn_kd_loss_backward(g.data_ptr<float>(), c.logits.data_ptr(), float_type(c.logits),
                              c.B, c.V, c.targets.data_ptr<int64_t>(), ignore_index,
                              c.teacher.args, c.weights, grad.data_ptr<float>(),
                              status_ptr(status), current_stream());
  raise_kd_status(status, c, ignore_index);
  return grad;
}

// The gradient written over the float32 logits themselves: the kernel reads a whole row
// (log-sum-exp pass, then a block barrier) before its dense pass overwrites it element by
// element, and the sparse corrections follow another barrier.
void knn_kd_loss_grad_cuda_(const at::Tensor& logits, const at::Tensor& grad_rows,
                            const at::Tensor& targets, const at::Tensor& teacher_tokens,
                            const c10::optional<at::Tensor>& teacher_scores,
                            const c10::optional<at::Tensor>& teacher_probs,
                            const at::Tensor& temperature, double ce_weight, double kd_weight,
                            double label_smoothing, int64_t ignore_index) {
  knnfast::check_in_place_logits(logits, "knn_kd_loss_grad_");
  const KdCall c = kd_call(logits, targets, teacher_tokens, teacher_scores, teacher_probs,
                           temperature, ce_weight, kd_weight, label_smoothing, &grad_rows);
  const c10::cuda::CUDAGuard guard(c.logits.device());
  const at::Tensor g = as_float32(grad_rows);
  const at::Tensor status = new_status(logits.device());
  launch_knn_kd_loss_backward(g.data_ptr<float>(), logits.data_ptr(), FloatType::F32, c.B, c.V,
                              c.targets.data_ptr<int64_t>(), ignore_index, c.teacher.args,
                              c.weights, logits.data_ptr<float>(), status_ptr(status),
                              current_stream());
  raise_kd_status(status, c, ignore_index);
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) {
  m.impl("knn_kd_loss", &knn_kd_loss_cuda);
  m.impl("knn_kd_loss_backward", &knn_kd_loss_backward_cuda);
  m.impl("knn_kd_loss_grad_", &knn_kd_loss_grad_cuda_);
}

}  // namespace knnfast::cuda
