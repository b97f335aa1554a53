// knn_interpolate on CUDA: argument checks (common/op_checks.h) and launch (kernels in
// knn_interpolate.cu). plan="global" turns off keeping logits rows in shared memory (tests
// both paths); "auto" and "row_cache" keep them where they fit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"
#include "cuda/knn_interpolate.h"

namespace knnfast::cuda {
namespace {

constexpr const char* kOp = "knn_interpolate";

// After check_knn_interpolate_args: converts, launches and reports bad values.
void interpolate_into(const at::Tensor& logits_in, const at::Tensor& tokens,
                      const c10::optional<at::Tensor>& scores,
                      const c10::optional<at::Tensor>& weights, const at::Tensor& temperature,
                      const at::Tensor& lam, int plan, at::Tensor& out) {
  const at::Device device = logits_in.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  NeighbourCall n = neighbour_call(tokens, scores, weights, temperature, V);
  at::Tensor lam_storage;
  const RowScalarArg lam_arg = row_scalar(lam_storage, lam);
  const bool cache_rows = static_cast<CudaInterpolatePlan>(plan) != CudaInterpolatePlan::Global;
  const at::Tensor status = new_status(device);
  launch_knn_interpolate(logits.data_ptr(), float_type(logits), B, V, n.args, lam_arg,
                         out.data_ptr<float>(), cache_rows, status_ptr(status), current_stream());
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
  const int p = check_knn_interpolate_args(logits, tokens, scores, weights, temperature, lam,
                                           plan, nullptr, Backend::CUDA);
  at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  interpolate_into(logits, tokens, scores, weights, temperature, lam, p, out);
  return out;
}

void knn_interpolate_out_cuda(const at::Tensor& logits, const at::Tensor& tokens,
                              const c10::optional<at::Tensor>& scores,
                              const c10::optional<at::Tensor>& weights,
                              const at::Tensor& temperature, const at::Tensor& lam,
                              const std::string& plan, at::Tensor& out) {
  const int p = check_knn_interpolate_args(logits, tokens, scores, weights, temperature, lam,
                                           plan, &out, Backend::CUDA);
  interpolate_into(logits, tokens, scores, weights, temperature, lam, p, out);
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) {
  m.impl("knn_interpolate", &knn_interpolate_cuda);
  m.impl("knn_interpolate.out", &knn_interpolate_out_cuda);
}

}  // namespace knnfast::cuda
