// Compile-only check (make cuda-check): csrc/common/knn_math.h must build as device code for
// sm_80 and sm_90, because the CUDA kernels share it with the CPU backend.
#include "common/knn_math.h"

namespace {

__global__ void use_common_math(const float* x, const int64_t* ids, int n, float* out,
                                int64_t* out_ids) {
  using namespace knnfast;
  SoftmaxState st = softmax_state_empty();
  for (int i = 0; i < n; ++i) st = softmax_state_add(st, x[i]);
  float acc = logaddexp(softmax_state_logsumexp(st), x[0]);
  acc += ranking_key(Metric::L2, x[0], x[1]) + final_score(Metric::COS, x[1], x[2]);
  acc += exact_score(Metric::IP, x[0], x[1], x[2], x[3]) + interpolate_log(x[0], x[1]);
  float hs[4] = {x[0], x[1], x[2], x[3]};
  int64_t hi[4] = {ids[0], ids[1], ids[2], ids[3]};
  if (better(x[4], ids[4], hs[0], hi[0])) heap_replace_root(hs, hi, 4, x[4], ids[4]);
  merge_sorted_topk(hs, hi, 4, x, ids, n, 4, out + 1, out_ids);
  out[0] = acc + hs[0];
}

}  // namespace

void launch_use_common_math(const float* x, const int64_t* ids, int n, float* out,
                            int64_t* out_ids) {
  use_common_math<<<1, 1>>>(x, ids, n, out, out_ids);
}
