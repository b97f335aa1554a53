// Deferred CUDA value checks (configure("cuda_checks", 2), common/settings.h): one persistent
// status buffer per device that every op's kernels atomicMin into, read and cleared by
// take_cuda_status. Ops then never wait for their kernels, and the buffer's fixed address lets
// a decoding step run inside a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include "cuda/cuda_utils.h"

namespace knnfast::cuda {
namespace {

constexpr int kMaxDevices = 64;

struct Buffers {
  std::mutex mutex;
  std::array<at::Tensor, kMaxDevices> status;
};

// Never destroyed: freeing CUDA memory during static destruction, after the driver may have
// shut down, can crash at exit.
Buffers& buffers() {
  static Buffers* instance = new Buffers();
  return *instance;
}

int device_slot(const at::Device& device) {
  const int index = device.index();
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "knnfast: deferred CUDA checks support devices "
              "0..", kMaxDevices - 1, ", got ", device);
  return index;
}

at::Tensor take_cuda_status(const at::Tensor& like) {
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor status;
  {
    Buffers& b = buffers();
    std::lock_guard<std::mutex> lock(b.mutex);
    status = b.status[device_slot(like.device())];
  }
  if (!status.defined()) return at::full({kNumStatusCodes}, -1, at::kLong);
  at::Tensor host = status.cpu();  // waits for the kernels queued on the current stream
  status.fill_(-1);
  return host;
}

}  // namespace

at::Tensor deferred_status(const at::Device& device) {
  Buffers& b = buffers();
  std::lock_guard<std::mutex> lock(b.mutex);
  at::Tensor& status = b.status[device_slot(device)];
  if (!status.defined())
    status = at::full({kNumStatusCodes}, -1, at::TensorOptions().dtype(at::kLong).device(device));
  return status;
}

TORCH_LIBRARY_IMPL(knnfast, CUDA, m) { m.impl("take_cuda_status", &take_cuda_status); }

}  // namespace knnfast::cuda
