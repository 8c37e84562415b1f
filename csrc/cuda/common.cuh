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

// True when p may be read or written with 16-byte vector accesses.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Store the 16 floats v[0..15], rounded once to T, at dst (16-byte aligned) with 16-byte stores: 4 for fp32, 2 for bf16/fp16.
__device__ __forceinline__ void store16(float* dst, const float* v) {
#pragma unroll
  for (int k = 0; k < 4; ++k) reinterpret_cast<float4*>(dst)[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2],
                                                                              v[4 * k + 3]);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);  // .x = a (low half), .y = b
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ void store16(T* dst, const float* v) {
  uint4 lo, hi;
  lo.x = pack2<T>(v[0], v[1]);
  lo.y = pack2<T>(v[2], v[3]);
  lo.z = pack2<T>(v[4], v[5]);
  lo.w = pack2<T>(v[6], v[7]);
  hi.x = pack2<T>(v[8], v[9]);
  hi.y = pack2<T>(v[10], v[11]);
  hi.z = pack2<T>(v[12], v[13]);
  hi.w = pack2<T>(v[14], v[15]);
  reinterpret_cast<uint4*>(dst)[0] = lo;
  reinterpret_cast<uint4*>(dst)[1] = hi;
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
