// The thread pool behind parallel_for (csrc/cpu/parallel.h), on POSIX threads directly.
//
// Plain pthreads rather than std::thread / std::mutex: those live in libstdc++, and a libstdc++ linked statically
// drags in an unwinder and glibc symbols newer than the ones torch's own wheels need; with pthreads the library
// needs no C++ runtime at all (it is built with -fno-exceptions -fno-rtti, see csrc/build.py).
//
// Workers are started on first use, up to the largest `threads` asked for, and then sleep on a condition variable
// between jobs. One job runs at a time: a second Python thread calling a kernel meanwhile (each call of weightkit._C releases the GIL)
// runs its tasks inline instead of waiting, and so does a kernel called from inside a task. After fork() the child
// builds a fresh pool (the parent's threads do not exist there; the old pool is left untouched).
#include "parallel.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <new>

// glibc 2.34 moved these from libpthread into libc under a new symbol version; linking here would bind them to it and
// make glibc 2.34 the library's floor. Bind to the x86-64 baseline version instead, which every glibc still exports
// (from libpthread.so.0 before 2.34, which every Python process has loaded), so the CPU library loads on glibc >= 2.27
// (expf@GLIBC_2.27 is the next newest symbol it uses).
#if defined(__x86_64__) && defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
__asm__(".symver pthread_create,pthread_create@GLIBC_2.2.5");
__asm__(".symver pthread_detach,pthread_detach@GLIBC_2.2.5");
__asm__(".symver pthread_mutex_trylock,pthread_mutex_trylock@GLIBC_2.2.5");
#endif

namespace weightkit {
namespace {

thread_local bool in_task = false;

struct Pool {
  pthread_mutex_t job_mutex = PTHREAD_MUTEX_INITIALIZER;  // held by the caller for a whole job
  pthread_mutex_t mutex = PTHREAD_MUTEX_INITIALIZER;      // guards the fields below
  pthread_cond_t wake = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
  int workers = 0;
  void (*task)(void*, int64_t) = nullptr;
  void* ctx = nullptr;
  int64_t tasks = 0, done = 0;
  int helpers = 0, running = 0;
  uint64_t generation = 0;
  std::atomic<int64_t> next{0};
};

struct Worker {
  Pool* pool;
  int index;
};

int64_t drain(Pool* p) {
  int64_t count = 0;
  in_task = true;
  for (int64_t i = p->next.fetch_add(1, std::memory_order_relaxed); i < p->tasks;
       i = p->next.fetch_add(1, std::memory_order_relaxed)) {
    p->task(p->ctx, i);
    ++count;
  }
  in_task = false;
  return count;
}

void* work(void* arg) {
  Worker* w = static_cast<Worker*>(arg);
  Pool* p = w->pool;
  const int index = w->index;
  free(w);
  uint64_t seen = 0;
  pthread_mutex_lock(&p->mutex);
  for (;;) {
    while (p->generation == seen) pthread_cond_wait(&p->wake, &p->mutex);
    seen = p->generation;
    if (index >= p->helpers || p->task == nullptr) continue;  // not needed for this job
    ++p->running;
    pthread_mutex_unlock(&p->mutex);
    const int64_t count = drain(p);
    pthread_mutex_lock(&p->mutex);
    p->done += count;
    --p->running;
    if (p->done == p->tasks && p->running == 0) pthread_cond_broadcast(&p->finished);
  }
  return nullptr;
}

// false when the pool is busy with another caller's job (the caller then runs inline)
bool run_on(Pool* p, int64_t tasks, int threads, void (*task)(void*, int64_t), void* ctx) {
  if (pthread_mutex_trylock(&p->job_mutex) != 0) return false;
  pthread_mutex_lock(&p->mutex);
  while (p->workers < threads - 1) {  // the caller works too
    Worker* w = static_cast<Worker*>(malloc(sizeof(Worker)));
    pthread_t thread;
    if (w == nullptr) break;
    *w = Worker{p, p->workers};
    if (pthread_create(&thread, nullptr, work, w) != 0) {
      free(w);
      break;  // fewer helpers than asked: the tasks still all run (the caller drains what is left)
    }
    pthread_detach(thread);
    ++p->workers;
  }
  p->task = task;
  p->ctx = ctx;
  p->tasks = tasks;
  p->helpers = threads - 1 < p->workers ? threads - 1 : p->workers;
  p->next.store(0, std::memory_order_relaxed);
  p->done = 0;
  ++p->generation;
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mutex);

  const int64_t mine = drain(p);
  pthread_mutex_lock(&p->mutex);
  p->done += mine;
  while (!(p->done == p->tasks && p->running == 0)) pthread_cond_wait(&p->finished, &p->mutex);
  p->task = nullptr;
  pthread_mutex_unlock(&p->mutex);
  pthread_mutex_unlock(&p->job_mutex);
  return true;
}

pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER;
Pool* the_pool = nullptr;  // never destroyed: its detached workers outlive static destruction at exit
pid_t pool_pid = 0;

Pool* get_pool() {
  pthread_mutex_lock(&pool_mutex);
  const pid_t pid = getpid();
  if (the_pool == nullptr || pool_pid != pid) {  // first use, or first use in a forked child
    void* mem = malloc(sizeof(Pool));
    the_pool = mem == nullptr ? nullptr : new (mem) Pool();
    pool_pid = pid;
  }
  Pool* p = the_pool;
  pthread_mutex_unlock(&pool_mutex);
  return p;
}

}  // namespace

void run_tasks(int64_t tasks, int threads, void (*task)(void*, int64_t), void* ctx) {
  if (tasks <= 0) return;
  if (threads > 1 && tasks > 1 && !in_task) {
    Pool* p = get_pool();
    if (p != nullptr && run_on(p, tasks, threads, task, ctx)) return;
  }
  const bool outer = in_task;
  in_task = true;
  for (int64_t i = 0; i < tasks; ++i) task(ctx, i);
  in_task = outer;
}

}  // namespace weightkit
