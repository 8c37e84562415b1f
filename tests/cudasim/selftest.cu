// Kernels that test cudasim itself (tests/test_cudasim.py): the collectives compute what CUDA's do, and each
// undefined behaviour cudasim claims to catch is caught. Built like csrc/cuda (tests/cudasim/build.py), C entry points.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#define SELFTEST extern "C" __attribute__((visibility("default")))

namespace {

// out[t] = per-lane results of the warp collectives, 8 ints per thread
__global__ void collectives_kernel(int* out) {
  const int t = threadIdx.x, lane = t & 31;
  int sum = lane;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  int scan = 1;
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += v;
  }
  const int from7 = __shfl_sync(0xffffffffu, lane * 10, 7);
  const unsigned peers = __match_any_sync(0xffffffffu, lane % 3);
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  __shared__ int block_sum;
  if (t == 0) block_sum = 0;
  __syncthreads();
  atomicAdd(&block_sum, 1);
  __syncthreads();
  int* o = out + 8 * (blockIdx.x * blockDim.x + t);
  o[0] = sum;
  o[1] = scan;
  o[2] = from7;
  o[3] = static_cast<int>(peers);
  o[4] = static_cast<int>(odd);
  o[5] = block_sum;
  o[6] = static_cast<int>(blockIdx.x);
  o[7] = static_cast<int>(threadIdx.x);
}

// Each thread writes its slot of shared memory and reads the slot of its peer in the other warp, with or without
// the block barrier between (the __syncwarp alone does not order the two warps).
__global__ void neighbour_kernel(int* out, bool sync) {
  __shared__ int s[64];
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncwarp();
  if (sync) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 32) % 64];
}

__global__ void exit_then_syncthreads_kernel() {
  if (threadIdx.x == 3) return;
  __syncthreads();
}

__global__ void shuffle_after_exit_kernel(int* out) {
  if ((threadIdx.x & 31) == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void divergent_collectives_kernel(int* out) {
  if (threadIdx.x & 1) {
    __syncwarp();
  } else {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  }
}

__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x < 48) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);  // lanes 32..47 of this warp are at __syncthreads
  }
}

__global__ void out_of_bounds_kernel(const float* x, float* out, int n) {
  out[threadIdx.x] = x[threadIdx.x + n - 16];  // threads 16..31 read past the end
}

__global__ void misaligned_vector_kernel(const unsigned char* bytes, unsigned* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(bytes + 4);  // 4 bytes past a 16-byte boundary
  out[threadIdx.x] = v.x;
}

__global__ void noop_kernel() {}

}  // namespace

SELFTEST int selftest_collectives(int* out, int blocks) {
  collectives_kernel<<<blocks, 64>>>(out);
  return cudaGetLastError();
}

SELFTEST int selftest_neighbour(int* out, int sync) {
  neighbour_kernel<<<1, 64>>>(out, sync != 0);
  return cudaGetLastError();
}

SELFTEST int selftest_bad_config(void) {
  noop_kernel<<<dim3(1, 70000), 32>>>();
  const int first = cudaGetLastError();
  noop_kernel<<<1, 2048>>>();
  const int second = cudaGetLastError();
  return first == cudaErrorInvalidConfiguration && second == cudaErrorInvalidConfiguration &&
         cudaGetLastError() == cudaSuccess;
}

// The cases that must stop the process (or, under the sanitizers, be reported).
SELFTEST void selftest_undefined(const char* name) {
  static int out[128];
  const std::string_view n(name);
  if (n == "exit_then_syncthreads") exit_then_syncthreads_kernel<<<1, 64>>>();
  if (n == "shuffle_after_exit") shuffle_after_exit_kernel<<<1, 64>>>(out);
  if (n == "divergent_collectives") divergent_collectives_kernel<<<1, 32>>>(out);
  if (n == "deadlock") deadlock_kernel<<<1, 64>>>(out);
  if (n == "out_of_bounds") {
    float* x = static_cast<float*>(std::malloc(32 * sizeof(float)));
    float* y = static_cast<float*>(std::malloc(32 * sizeof(float)));
    for (int i = 0; i < 32; ++i) x[i] = static_cast<float>(i);
    out_of_bounds_kernel<<<1, 32>>>(x, y, 32);
    std::free(x);
    std::free(y);
  }
  if (n == "misaligned_vector") {
    alignas(16) static unsigned char bytes[64] = {};
    static unsigned got[32];
    misaligned_vector_kernel<<<1, 32>>>(bytes, got);
  }
}
