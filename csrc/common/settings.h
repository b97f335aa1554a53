// Process-wide settings of the C++ layer, in one place. They change only through the
// configure() op (torch.ops.knnfast.configure, called by knnfast/settings.py, which reads the
// KNNFAST_* environment once at import); kernels never read the environment per call.
// Defaults are the behaviour with no environment variable set.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace knnfast {

struct Settings {
  // How CUDA ops report the bad values their kernels find (never an out-of-bounds access):
  // 1 (kCudaChecksSync): each op reads its status back (one small device-to-host copy, which
  //   waits for the kernels) and raises ValueError;
  // 2 (kCudaChecksDeferred): the kernels record into one persistent status buffer per device
  //   and the op returns without a host sync; take_cuda_status reads and clears it (Python:
  //   knnfast.check_cuda_errors, called by the decoding loops), e.g. for CUDA graphs;
  // 0 (kCudaChecksOff): nothing is read back; bad values go unreported.
  std::atomic<int64_t> cuda_checks{1};
  // 1: the CPU bf16 search checks every approximate rank against its float64 value (raises if
  // an error bound fails) and prints how many candidates it rescored per row to stderr.
  std::atomic<int64_t> debug{0};
};

Settings& settings();

enum CudaChecks : int64_t { kCudaChecksOff = 0, kCudaChecksSync = 1, kCudaChecksDeferred = 2 };

// Sets setting `name` ("cuda_checks": 0-2, see above; "debug": 0 or 1) to `value` and returns the
// previous value; anything else is a ValueError.
int64_t configure(const std::string& name, int64_t value);

}  // namespace knnfast
