// label_counts on CUDA: argument checks (common/op_checks.h) and launch (kernel in
// label_counts.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_utils.h"
#include "cuda/label_counts.h"

namespace knnfast::cuda {

at::Tensor label_counts_cuda(const at::Tensor& tokens_in) {
  constexpr const char* kOp = "label_counts";
  check_label_counts_args(tokens_in, Backend::CUDA);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = as_int64(tokens_in);
  const int64_t B = tokens.size(0), k = tokens.size(1);
  at::Tensor out = at::empty({B, k}, tokens.options());
  const at::Tensor status = new_status(tokens.device());
  launch_label_counts(tokens.data_ptr<int64_t>(), B, k, out.data_ptr<int64_t>(),
                      status_ptr(status), current_stream());
  StatusContext c;
  c.op = kOp;
  c.tokens = tokens;
  raise_on_status(status, c);
  return out;
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("label_counts", &label_counts_cuda); }

}  // namespace knnfast::cuda
