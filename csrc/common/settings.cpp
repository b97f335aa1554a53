// The one instance of the process-wide settings (see settings.h) and the configure() op.
#include "common/settings.h"

#include <c10/util/Exception.h>

namespace knnfast {

Settings& settings() {
  static Settings instance;
  return instance;
}

int64_t configure(const std::string& name, int64_t value) {
  std::atomic<int64_t>* slot = nullptr;
  if (name == "cuda_checks") slot = &settings().cuda_checks;
  if (name == "debug") slot = &settings().debug;
  TORCH_CHECK_VALUE(slot != nullptr, "configure: name must be 'cuda_checks' or 'debug', got '",
                    name, "'");
  const int64_t top = slot == &settings().cuda_checks ? kCudaChecksDeferred : 1;
  TORCH_CHECK_VALUE(value >= 0 && value <= top, "configure: ", name, " must be in [0, ", top,
                    "], got ", value);
  return slot->exchange(value);
}

}  // namespace knnfast
