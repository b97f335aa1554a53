// label_counts on CPU: number of distinct valid tokens among the first j+1 neighbours (the
// adaptive kNN-MT feature). Token 0 is a label like any other; only -1 slots are skipped.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/cpu_utils.h"

namespace knnfast::cpu {

at::Tensor label_counts_cpu(const at::Tensor& tokens_in) {
  constexpr const char* kOp = "label_counts";
  check_label_counts_args(tokens_in, Backend::CPU);
  const at::Tensor tokens = checked_ids(tokens_in, -1, kOp, "tokens");
  const int64_t B = tokens.size(0), k = tokens.size(1);
  at::Tensor out = at::empty({B, k}, tokens.options());
  const int64_t* t = tokens.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, B, row_grain(k * k / 2), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* row = t + r * k;
      int64_t distinct = 0;
      for (int64_t j = 0; j < k; ++j) {
        bool seen = row[j] < 0;  // -1 slots are not labels
        for (int64_t i = 0; i < j && !seen; ++i) seen = row[i] == row[j];
        distinct += seen ? 0 : 1;
        o[r * k + j] = distinct;
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(knnfast, CPU, m) { m.impl("label_counts", &label_counts_cpu); }

}  // namespace knnfast::cpu
