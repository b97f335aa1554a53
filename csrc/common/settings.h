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
  // 1: the CUDA wrappers read the status buffer back after each op (one small device-to-host
  // copy, which waits for the kernels) and raise ValueError on a bad value. 0: no host sync
  // (e.g. for CUDA graphs); bad values then go unreported but never cause out-of-bounds
  // accesses.
  std::atomic<int64_t> cuda_checks{1};
  // 1: the CPU bf16 search prints how many candidates it rescored per row to stderr.
  std::atomic<int64_t> debug{0};
};

Settings& settings();

// Sets setting `name` ("cuda_checks" or "debug") to `value` (0 or 1) and returns the previous
// value; anything else is a ValueError.
int64_t configure(const std::string& name, int64_t value);

}  // namespace knnfast
