// knn_rescore on CPU: exact fp32 scores of given candidate ids (the "real score" of an
// approximate search). Rows of the keys are gathered by index; the datastore is not copied.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/cpu_utils.h"
#include "cpu/knn_rescore_cpu.h"
#include "cpu/vec_math.h"

namespace knnfast::cpu {

at::Tensor knn_rescore_cpu(const at::Tensor& queries_in, const at::Tensor& keys_in,
                           const at::Tensor& indices_in, const std::string& metric_name) {
  constexpr const char* kOp = "knn_rescore";
  const Metric metric =
      check_knn_rescore_args(queries_in, keys_in, indices_in, metric_name, Backend::CPU);
  const at::Tensor queries = as_float32(queries_in);
  if (!all_finite(queries)) raise_bad_queries(kOp);
  const at::Tensor keys = keys_in.contiguous();
  const at::Tensor indices = checked_ids(indices_in, keys.size(0), kOp, "indices");
  const int64_t B = indices.size(0), k = indices.size(1), D = queries.size(1);
  at::Tensor out = at::empty({B, k}, queries.options());
  const float* q = queries.data_ptr<float>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const char* key_base = static_cast<const char*>(keys.data_ptr());
  const int64_t row_bytes = D * keys.element_size();
  at::parallel_for(0, B, row_grain(k * D), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* qb = q + b * D;
      float qq = 0.0f;
      for (int64_t d = 0; d < D; ++d) qq += qb[d] * qb[d];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t id = idx[b * k + j];
        if (id < 0) {
          o[b * k + j] = -INFINITY;
          continue;
        }
        const PairSums p = pair_sums(qb, key_base + id * row_bytes, keys.scalar_type(), D);
        o[b * k + j] = exact_score(metric, p.diff_sq, p.dot, qq, p.key_sq);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) { m.impl("knn_rescore", &knn_rescore_cpu); }

}  // namespace knnfast::cpu
