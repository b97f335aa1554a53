// knn_rescore on CUDA: argument checks (common/op_checks.h) and launch (kernel in
// knn_rescore.cu).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/knn_rescore_cuda.h"

#include "cuda/cuda_utils.h"
#include "cuda/knn_rescore.h"

namespace knnfast::cuda {

at::Tensor knn_rescore_cuda(const at::Tensor& queries_in, const at::Tensor& keys_in,
                            const at::Tensor& indices_in, const std::string& metric_name) {
  constexpr const char* kOp = "knn_rescore";
  const Metric metric =
      check_knn_rescore_args(queries_in, keys_in, indices_in, metric_name, Backend::CUDA);
  const at::Device device = queries_in.device();
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor queries = as_float32(queries_in);
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor indices = as_int64(indices_in);
  const int64_t B = indices.size(0), k = indices.size(1);
  at::Tensor out = at::empty({B, k}, queries.options());
  const at::Tensor status = new_status(device);
  launch_knn_rescore(queries.data_ptr<float>(), keys.data_ptr(), float_type(keys), B,
                     keys.size(0), queries.size(1), indices.data_ptr<int64_t>(), k,
                     static_cast<int>(metric), out.data_ptr<float>(), status_ptr(status),
                     current_stream());
  StatusContext c;
  c.op = kOp;
  c.tokens = indices;
  c.names.tokens = "indices";
  c.token_bound = keys.size(0);
  raise_on_status(status, c);
  return out;
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("knn_rescore", &knn_rescore_cuda); }

}  // namespace knnfast::cuda
