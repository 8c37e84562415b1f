// The CUDA library's identity and health: ABI version, the architectures built in, and a probe that tells whether
// its kernels can run on a device (a driver older than the CUDA runtime linked in, or a GPU whose architecture has
// neither SASS nor compatible PTX here, both show up as an error code, which weightkit/backend.py reports).
#include "common.cuh"

#ifndef WK_CUDA_ARCHS
#define WK_CUDA_ARCHS "unknown"
#endif

namespace {
__global__ void probe_kernel(int* out) {
  if (out != nullptr) *out = 1;
}
}  // namespace

WK_API int wk_cuda_abi_version(void) { return WK_ABI_VERSION; }

WK_API const char* wk_cuda_archs(void) { return WK_CUDA_ARCHS; }

WK_API const char* wk_cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

WK_API int wk_cuda_probe(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (device < 0 || device >= count) return static_cast<int>(cudaErrorInvalidDevice);
  const weightkit::DeviceGuard guard(device);
  cudaFuncAttributes attr;
  // loads the module for this device: fails when no kernel image fits it (nothing is launched)
  return static_cast<int>(cudaFuncGetAttributes(&attr, probe_kernel));
}
