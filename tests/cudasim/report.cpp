// What the simulated CUDA library launched: {"site": count, ...} as JSON (tests/cudasim/plugin.py reads it at the
// end of a test session, tests/test_cudasim.py checks every launch site of csrc/cuda ran).
#include <string>

#include "cudasim.h"

extern "C" __attribute__((visibility("default"))) const char* cudasim_launch_counts() {
  static std::string json;
  const std::lock_guard<std::mutex> lock(cudasim::launch_mutex());
  json = "{";
  for (const auto& [site, count] : cudasim::launch_counts()) {
    if (json.size() > 1) json += ", ";
    json += "\"" + site + "\": " + std::to_string(count);
  }
  json += "}";
  return json.c_str();
}
