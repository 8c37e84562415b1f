// parallel_for for the CPU kernels, on a small persistent pool of std::threads (csrc/cpu/parallel.cpp).
//
// It replaces at::parallel_for, which tied the kernels to libtorch; no OpenMP either, so the library never loads a
// second OpenMP runtime next to torch's. Same contract as at::parallel_for: f(begin, end) is called on disjoint
// subranges covering [begin, end); a range of at most `grain` elements, or threads <= 1, runs inline on the
// calling thread (small calls pay no synchronization). `threads` is torch.get_num_threads() of the caller.
// Every kernel is written so that its result does not depend on how the range is split.
#pragma once
#include <stdlib.h>

#include <algorithm>
#include <cstdint>

namespace weightkit {

// Calls task(ctx, i) for i in [0, tasks) on up to `threads` threads (the caller included) and returns when all are
// done. Nested calls, and calls while another thread holds the pool, run their tasks inline, in order.
void run_tasks(int64_t tasks, int threads, void (*task)(void* ctx, int64_t i), void* ctx);

template <typename F>
void parallel_for(int threads, int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (threads <= 1 || range <= grain) {
    f(begin, end);
    return;
  }
  const int64_t tasks_wanted = std::min<int64_t>(threads, (range + grain - 1) / grain);
  const int64_t chunk = (range + tasks_wanted - 1) / tasks_wanted;
  const int64_t tasks = (range + chunk - 1) / chunk;
  struct Ctx {
    const F* f;
    int64_t begin, end, chunk;
  } ctx{&f, begin, end, chunk};
  run_tasks(tasks, static_cast<int>(std::min<int64_t>(threads, tasks)), [](void* p, int64_t i) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    const int64_t b = c.begin + i * c.chunk;
    (*c.f)(b, std::min(c.end, b + c.chunk));
  }, &ctx);
}

// A malloc'ed scratch array (the library has no C++ runtime, hence no operator new); ok() is false when the
// allocation failed.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(static_cast<T*>(malloc(sizeof(T) * static_cast<size_t>(n > 0 ? n : 1)))) {}
  ~Scratch() { free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  bool ok() const { return data_ != nullptr; }
  T* data() const { return data_; }
  T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_;
};

}  // namespace weightkit
