// What every CUDA source of the library shares: the device guard, dtype dispatch over the wk_dtype codes, float
// conversions of the storage types, grid sizes, and the entry-point preamble.
//
// The library links the CUDA runtime statically and not torch: the caller passes the device index and torch's
// current stream (cudaStream_t) on that device. The runtime binds to the device's primary context, the same one
// torch uses, so pointers and streams from torch are valid here.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../weightkit.h"

namespace weightkit {

// Makes `device` current for the scope of a call, restoring the caller's device after it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) {
      if (cudaSetDevice(device) == cudaSuccess) restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool restore_ = false;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with T the device storage type of a float dtype code; false for any other code.
template <typename F>
bool dispatch_float(int dtype, F&& f) {
  switch (dtype) {
    case WK_F32: f(float{}); return true;
    case WK_F16: f(__half{}); return true;
    case WK_BF16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements, capped (the loop covers the rest).
inline unsigned blocks_for(int64_t n, int64_t cap = 65535LL * 8) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, cap)));
}

// The end of every entry point: the launch error, if any (a bad dtype code is reported as cudaErrorInvalidValue).
inline int launch_status(bool dtype_ok = true) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  return dtype_ok ? static_cast<int>(cudaSuccess) : static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace weightkit
