// cudasim: the CUDA of csrc/cuda/*.cu on the CPU, for tests (tests/cudasim/build.py compiles the library's own
// sources against this header with g++; tests/test_cudasim.py runs the cuda backend's op tests on it).
//
// A launch runs its grid block by block, in a shuffled order (blocks may not count on running in order). Each
// thread of a block is a fiber with its own stack, run until it exits or waits at a collective. A warp picked at
// random runs as far as it can (its lanes in a shuffled order between warp collectives) before another starts, so
// one warp gets ahead of the others up to each __syncthreads (CUDASIM_SEED seeds the orders). The kernels' code
// runs with CUDA's semantics where they matter to correctness:
// * __syncthreads releases the block's threads, a warp collective (__syncwarp, shuffles, __match_any_sync,
//   __ballot_sync) the warp's 32 lanes, once all of them have arrived; a shuffle reads what its source lane posted;
// * __shared__ variables are per block, filled with 0xFF bytes at each block's start: a read before any write
//   gives NaN or -1, or a bool that -fsanitize=bool reports;
// * uint4 / float4 are 16-byte aligned types: -fsanitize=alignment reports a misaligned vector access, and
//   -fsanitize=address any access outside a buffer (tests/cudasim/build.py's "sanitize" variant);
// * a launch outside CUDA's limits (grid.y or grid.z above 65535, more than 1024 threads per block) fails with
//   cudaErrorInvalidConfiguration, as on a GPU.
// What CUDA leaves undefined stops the process with a message naming the kernel, block and thread: a __syncthreads
// or full-mask warp collective reached after some of its threads exited, lanes of a warp at different collectives,
// threads that can never be released (deadlock).
// Not modelled: timing, concurrency inside a block beyond the interleavings at collectives, memory ordering,
// streams (launches run synchronously), __expf's approximation (expf here), bank conflicts, occupancy, the 48 KB
// static shared-memory limit.
#pragma once

#include <math.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// tests/cudasim/build.py rewrites each `__shared__ T name[...];` into a static plus a cudasim::shared_region call
#define __shared__ static

// ---- types of the CUDA runtime -----------------------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
typedef struct CUstream_st* cudaStream_t;
struct cudaFuncAttributes {
  int maxThreadsPerBlock = 1024;
  size_t sharedSizeBytes = 0;
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---- 16-bit floats (round to nearest even, as the __*_rn intrinsics) ----------------------------------------------

struct alignas(2) __half {
  uint16_t bits;
};
struct alignas(2) __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---- arithmetic and memory intrinsics (IEEE fp32 on the host: the build has -ffp-contract=off) ---------------------

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __expf(float v) { return expf(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline float atomicAdd(float* a, float v) { return std::atomic_ref<float>(*a).fetch_add(v); }
inline int atomicAdd(int* a, int v) { return std::atomic_ref<int>(*a).fetch_add(v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return std::atomic_ref<unsigned>(*a).fetch_add(v); }

// ---- the simulator -----------------------------------------------------------------------------------------------

namespace cudasim {

inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local int current_device = 0;
constexpr int kDevices = 1;
constexpr size_t kStackBytes = 256 << 10;  // per CUDA thread (a fiber)

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

enum class State { Ready, AtBlock, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = State::Ready;
  const char* what = "";        // the collective it waits at
  void* fake_stack = nullptr;   // AddressSanitizer's, while switched away
};

// One launch, run on the calling host thread: each CUDA thread of a block is a fiber (its own stack), run until it
// exits or waits at a collective; the scheduler releases a collective once every thread it names has arrived.
struct Launch {
  const char* kernel;
  dim3 grid, block;
  int threads;
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> slots;  // one per thread: the value each lane posts to a warp collective
  std::mt19937_64 rng;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  int current = -1;
  uint64_t block_serial = 0;
  std::vector<std::pair<void*, uint64_t>> shared_poisoned;  // (region, block serial it was poisoned for)
};

inline thread_local Launch* this_launch = nullptr;

inline void fail(const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (this_launch != nullptr && this_launch->current >= 0) {
    std::fprintf(stderr, "cudasim: %s, block (%u, %u, %u), thread (%u, %u, %u): %s\n", this_launch->kernel, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, msg);
  } else {
    std::fprintf(stderr, "cudasim: %s\n", msg);
  }
  std::fflush(stderr);
  std::abort();
}

#if defined(__SANITIZE_ADDRESS__)
inline void start_switch(void** fake, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake, bottom, size);
}
inline void finish_switch(void* fake, const void** bottom, size_t* size) {
  __sanitizer_finish_switch_fiber(fake, bottom, size);
}
#else
inline void start_switch(void**, const void*, size_t) {}
inline void finish_switch(void*, const void**, size_t*) {}
#endif

inline void to_scheduler(Fiber& f, bool finished) {
  Launch* l = this_launch;
  start_switch(finished ? nullptr : &f.fake_stack, l->scheduler_stack, l->scheduler_stack_size);
  swapcontext(&f.ctx, &l->scheduler);
  finish_switch(f.fake_stack, nullptr, nullptr);
}

inline void fiber_entry() {
  Launch* l = this_launch;
  finish_switch(nullptr, &l->scheduler_stack, &l->scheduler_stack_size);
  l->body();
  Fiber& f = l->fibers[l->current];
  f.state = State::Done;
  to_scheduler(f, true);
}

inline void set_thread(Launch* l, int i) {
  l->current = i;
  threadIdx = dim3(i % l->block.x, (i / l->block.x) % l->block.y, i / (l->block.x * l->block.y));
}

inline void resume(Launch* l, int i) {
  set_thread(l, i);
  Fiber& f = l->fibers[i];
  void* fake = nullptr;
  start_switch(&fake, f.stack, kStackBytes);
  swapcontext(&l->scheduler, &f.ctx);
  finish_switch(fake, nullptr, nullptr);
}

// The running thread waits at a collective until the scheduler releases it.
inline void wait(State at, const char* what) {
  Launch* l = this_launch;
  Fiber& f = l->fibers[l->current];
  f.state = at;
  f.what = what;
  to_scheduler(f, false);
}

// Names the first thread of [lo, hi) in `state`, then fails.
[[noreturn]] inline void fail_at(Launch* l, int lo, int hi, State state, const char* msg) {
  for (int i = lo; i < hi; ++i) {
    if (l->fibers[i].state == state) {
      set_thread(l, i);
      break;
    }
  }
  fail("%s", msg);
}

// Releases warp w's lanes when every live one waits at a warp collective; true if it did.
inline bool release_warp(Launch* l, int w) {
  int lane_done = 0, at_warp = 0;
  const char* what = nullptr;
  for (int i = 32 * w; i < 32 * w + 32; ++i) {
    const Fiber& f = l->fibers[i];
    lane_done += f.state == State::Done;
    if (f.state != State::AtWarp) continue;
    ++at_warp;
    if (what == nullptr) what = f.what;
    if (std::strcmp(what, f.what) != 0) {
      char msg[256];
      std::snprintf(msg, sizeof msg, "lanes of a warp meet at different collectives (%s and %s)", what, f.what);
      fail_at(l, i, i + 1, State::AtWarp, msg);
    }
  }
  if (at_warp == 0 || at_warp + lane_done < 32) return false;
  if (lane_done > 0) {
    char msg[256];
    std::snprintf(msg, sizeof msg, "%s with the full mask after %d lanes of the warp exited", what, lane_done);
    fail_at(l, 32 * w, 32 * w + 32, State::AtWarp, msg);
  }
  for (int i = 32 * w; i < 32 * w + 32; ++i) l->fibers[i].state = State::Ready;
  return true;
}

// One block. A warp, picked at random among those with runnable lanes, runs as far as it can (its lanes in a
// shuffled order between its warp collectives) before another starts: one warp runs ahead of the others up to a
// __syncthreads, which exposes a read of shared memory that another warp has not yet written (poisoned).
inline void run_block(Launch* l) {
  ++l->block_serial;
  for (int i = 0; i < l->threads; ++i) {
    Fiber& f = l->fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
    f.fake_stack = nullptr;
  }
  const int warps = l->threads / 32;
  std::vector<int> lanes(32), runnable;
  std::iota(lanes.begin(), lanes.end(), 0);
  for (;;) {
    runnable.clear();
    for (int w = 0; w < warps; ++w) {
      for (int i = 32 * w; i < 32 * w + 32; ++i) {
        if (l->fibers[i].state == State::Ready) {
          runnable.push_back(w);
          break;
        }
      }
    }
    if (!runnable.empty()) {
      const int w = runnable[std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(l->rng)];
      do {
        std::shuffle(lanes.begin(), lanes.end(), l->rng);
        for (const int lane : lanes)
          if (l->fibers[32 * w + lane].state == State::Ready) resume(l, 32 * w + lane);
      } while (release_warp(l, w));
      continue;
    }
    int done = 0, at_block = 0;
    for (const Fiber& f : l->fibers) {
      done += f.state == State::Done;
      at_block += f.state == State::AtBlock;
    }
    if (done == l->threads) break;
    if (at_block > 0 && at_block + done == l->threads) {
      if (done > 0) fail_at(l, 0, l->threads, State::AtBlock, "__syncthreads after some threads of the block exited");
      for (Fiber& f : l->fibers) f.state = State::Ready;
      continue;
    }
    char msg[256];
    std::snprintf(msg, sizeof msg, "deadlock: %d threads exited, %d at __syncthreads, the rest at warp collectives of "
                  "warps not all there", done, at_block);
    fail_at(l, 0, l->threads, State::AtWarp, msg);
  }
  l->current = -1;
}

// The first thread of a block to reach a __shared__ declaration fills the variable with 0xFF bytes.
inline void shared_region(void* p, size_t bytes) {
  Launch* l = this_launch;
  for (auto& r : l->shared_poisoned) {
    if (r.first == p) {
      if (r.second != l->block_serial) {
        std::memset(p, 0xFF, bytes);
        r.second = l->block_serial;
      }
      return;
    }
  }
  std::memset(p, 0xFF, bytes);
  l->shared_poisoned.emplace_back(p, l->block_serial);
}

inline void syncthreads() { wait(State::AtBlock, "__syncthreads"); }

// This lane posts `mine`; returns its warp's 32 posted values, valid until warp_done.
inline const uint64_t* warp_post(uint64_t mine, unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail("%s with mask %#x: cudasim supports full-warp masks only", what, mask);
  Launch* l = this_launch;
  l->slots[l->current] = mine;
  wait(State::AtWarp, what);
  return l->slots.data() + (l->current / 32) * 32;
}
inline void warp_done(const char* what) { wait(State::AtWarp, what); }
inline int lane_id() { return this_launch->current & 31; }

template <typename T>
inline uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8, "warp collectives of values up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T value_of(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
T shuffle(unsigned mask, T v, int src, const char* what) {
  const uint64_t* warp = warp_post(bits_of(v), mask, what);
  const T out = value_of<T>(warp[src & 31]);
  warp_done(what);
  return out;
}

inline bool valid_launch(dim3 grid, dim3 block) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= 65535u && grid.z >= 1 &&
         grid.z <= 65535u && block.x >= 1 && block.x <= 1024 && block.y >= 1 && block.y <= 1024 && block.z >= 1 &&
         block.z <= 64 && threads <= 1024;
}

// Launches per launch site ("int8.cu:152 stochastic_round_int8_cuda_kernel<scalar_t>"), read by
// cudasim_launch_counts (tests/cudasim/report.cpp).
inline std::map<std::string, uint64_t>& launch_counts() {
  static std::map<std::string, uint64_t> counts;
  return counts;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Stacks for the fibers, kept between launches (launches run one at a time).
inline char* fiber_stacks(int threads) {
  static char* base = nullptr;
  static int count = 0;
  if (threads > count) {
    if (base != nullptr) munmap(base, count * kStackBytes);
    void* p = mmap(nullptr, threads * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) fail("cannot map %d fiber stacks", threads);
    base = static_cast<char*>(p);
    count = threads;
  }
  return base;
}

inline uint64_t order_seed() {
  const char* seed = std::getenv("CUDASIM_SEED");
  return seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0x5eedu;
}

// Runs body() as every thread of every block of the grid.
inline void run_grid(const char* name, dim3 grid, dim3 block, std::function<void()> body) {
  if (!valid_launch(grid, block)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads % 32 != 0) fail("%s: a block of %d threads (cudasim runs whole warps only)", name, threads);
  const std::lock_guard<std::mutex> one_launch(launch_mutex());  // __shared__ variables are statics
  ++launch_counts()[name];
  Launch l;
  l.kernel = name;
  l.grid = grid;
  l.block = block;
  l.threads = threads;
  l.body = std::move(body);
  l.fibers.resize(threads);
  char* stacks = fiber_stacks(threads);
  for (int i = 0; i < threads; ++i) l.fibers[i].stack = stacks + i * kStackBytes;
  l.slots.assign(threads, 0);
  l.rng.seed(order_seed());
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), uint64_t{0});
  std::shuffle(block_order.begin(), block_order.end(), l.rng);
  Launch* const outer = this_launch;
  this_launch = &l;
  blockDim = block;
  gridDim = grid;
  for (const uint64_t b : block_order) {
    blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y)));
    run_block(&l);
  }
  this_launch = outer;
}

template <typename... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid, block;
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "a kernel launch with the wrong number of arguments");
    const std::tuple<P...> args(static_cast<P>(a)...);
    void (*k)(P...) = kernel;
    run_grid(name, grid, block, [&args, k] { std::apply(k, args); });
  }
};

// `kernel<<<grid, block, shared, stream>>>(args)` is rewritten (tests/cudasim/build.py) into
// `cudasim::launch("kernel", kernel, grid, block, shared, stream)(args)`.
template <typename... P>
Launcher<P...> launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t shared = 0,
                      cudaStream_t stream = nullptr) {
  if (shared != 0) fail("%s: dynamic shared memory is not simulated", name);
  (void)stream;
  return Launcher<P...>{name, kernel, grid, block};
}

}  // namespace cudasim

// ---- device functions of warps and blocks ------------------------------------------------------------------------

inline void __syncthreads() { cudasim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cudasim::warp_post(0, mask, "__syncwarp");
  cudasim::warp_done("__syncwarp");
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  if (width != 32) cudasim::fail("__shfl_sync width %d: cudasim supports 32 only", width);
  return cudasim::shuffle(mask, v, src, "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) cudasim::fail("__shfl_xor_sync width %d: cudasim supports 32 only", width);
  return cudasim::shuffle(mask, v, cudasim::lane_id() ^ lane_mask, "__shfl_xor_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) cudasim::fail("__shfl_up_sync width %d: cudasim supports 32 only", width);
  const int lane = cudasim::lane_id();
  const int src = lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;  // below delta: own value
  return cudasim::shuffle(mask, v, src, "__shfl_up_sync");
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  const uint64_t mine = cudasim::bits_of(v);
  const uint64_t* warp = cudasim::warp_post(mine, mask, "__match_any_sync");
  unsigned peers = 0;
  for (int j = 0; j < 32; ++j)
    if (warp[j] == mine) peers |= 1u << j;
  cudasim::warp_done("__match_any_sync");
  return peers;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* warp = cudasim::warp_post(predicate != 0, mask, "__ballot_sync");
  unsigned bits = 0;
  for (int j = 0; j < 32; ++j)
    if (warp[j] != 0) bits |= 1u << j;
  cudasim::warp_done("__ballot_sync");
  return bits;
}

// ---- the runtime API the library calls ---------------------------------------------------------------------------

inline cudaError_t cudaGetDevice(int* device) {
  *device = cudasim::current_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= cudasim::kDevices) return cudaErrorInvalidDevice;
  cudasim::current_device = device;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = cudasim::kDevices;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cudasim::last_error;
  cudasim::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}
