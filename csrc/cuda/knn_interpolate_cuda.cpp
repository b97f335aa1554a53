// knn_interpolate on CUDA: argument checks and launch (kernels in knn_interpolate.cu).
// plan="global" turns off keeping logits rows in shared memory (tests both paths).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"
#include "cuda/knn_interpolate.h"

namespace knnfast::cuda {
namespace {

constexpr const char* kOp = "knn_interpolate";

// Whether the plan lets the kernel cache rows in shared memory (where they fit).
bool check_plan(const std::string& plan) {
  const auto p = static_cast<CudaInterpolatePlan>(
      parse_plan(plan, kCudaInterpolatePlans, "CUDA", kOp));
  return p != CudaInterpolatePlan::Global;
}

void check_logits_arg(const at::Tensor& logits) {
  check_is_cuda(logits, kOp, "logits");
  check_dim(logits, 2, kOp, "logits");
  check_logits(logits, kOp);
  TORCH_CHECK_VALUE(logits.size(1) > 0, kOp, ": logits must have a vocabulary dimension > 0");
}

void interpolate_into(const at::Tensor& logits_in, const at::Tensor& tokens,
                      const c10::optional<at::Tensor>& scores,
                      const c10::optional<at::Tensor>& weights, const at::Tensor& temperature,
                      const at::Tensor& lam, bool cache_rows, at::Tensor& out) {
  const at::Device device = logits_in.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  NeighbourTensors n = neighbour_tensors(tokens, scores, weights, temperature, B, V, device, kOp);
  at::Tensor lam_storage;
  const RowScalarArg lam_arg = row_scalar(lam_storage, lam, B, device, kOp, "lam");
  const at::Tensor status = new_status(device);
  launch_knn_interpolate(logits.data_ptr(), float_type(logits), B, V, n.args, lam_arg,
                         out.data_ptr<float>(), cache_rows,
                         status_ptr(status), current_stream());
  StatusContext c = neighbour_context(kOp, n, V);
  c.lam = lam_storage;
  raise_on_status(status, c);
}

}  // namespace

at::Tensor knn_interpolate_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                                const c10::optional<at::Tensor>& scores,
                                const c10::optional<at::Tensor>& weights,
                                const at::Tensor& temperature, const at::Tensor& lam,
                                const std::string& plan) {
  const bool cache_rows = check_plan(plan);
  check_logits_arg(logits);
  at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  interpolate_into(logits, tokens, scores, weights, temperature, lam, cache_rows, out);
  return out;
}

void knn_interpolate_out_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                              const c10::optional<at::Tensor>& scores,
                              const c10::optional<at::Tensor>& weights,
                              const at::Tensor& temperature, const at::Tensor& lam,
                              const std::string& plan, at::Tensor& out) {
  const bool cache_rows = check_plan(plan);
  check_logits_arg(logits);
  check_cuda_tensor(out, logits.device(), kOp, "out");
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous() &&
                        out.sizes() == logits.sizes(),
                    kOp, ": out must be a contiguous float32 tensor of shape ", logits.sizes(),
                    ", got ", out.scalar_type(), " ", out.sizes());
  interpolate_into(logits, tokens, scores, weights, temperature, lam, cache_rows, out);
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) {
  m.impl("knn_interpolate", &knn_interpolate_cuda);
  m.impl("knn_interpolate.out", &knn_interpolate_out_cuda);
}

}  // namespace knnfast::cuda
