// A CPU emulation of the CUDA execution model, just enough to run the
// project's kernels (csrc/cuda/*.cu) unchanged on a machine without a GPU:
// every CUDA thread is a fiber (its own stack) on the calling thread, blocks
// run one after another, and __syncthreads / __syncwarp / warp shuffles are real
// barriers and exchanges, so index math, bounds, barrier placement and warp-level
// reductions are exercised as written. A fiber runs until it waits at a barrier or
// exits. Successive blocks and launches run their fibers first to last, then last
// to first, so a read of another thread's write that lacks a barrier sees stale
// (NaN) data in one of the two orders, every time; threads that wait at a barrier
// the others never reach stop the run with a message (a GPU would hang).
// Fibers, not OS threads: barrier hand-offs between hundreds of OS threads on two
// cores cost the kernel far more time than the emulation itself.
// WMMA fragments hold the whole 16 x 16 tile per thread.
// Force-included (-include emu.h) into the transformed kernel sources.
#pragma once

// Real headers first, with their own host-side macro definitions.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __forceinline__
#undef __align__
#undef __launch_bounds__
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Static locals are shared by all threads; blocks run one at a time, so this is
// per-block shared memory.
#define __shared__ static
#define __CUDA_ARCH__ 900

namespace emu {

inline uint64_t g_progress = 0;  // barrier arrivals and exits: a round of fibers without any is a deadlock

#if defined(__x86_64__)
// emu_runtime.cpp: pushes the callee-saved registers, stores the stack pointer in *from, and
// resumes the stack at `to` (pops its registers, returns there). A few instructions, where
// swapcontext also saves and restores the signal mask (two system calls per switch).
extern "C" void emu_switch(void** from, void* to);
#endif

// Runs a block's CUDA threads as fibers on the calling thread.
class Fibers {
 public:
  static constexpr size_t kStack = 256 * 1024, kGuard = 4096;

  // task(t) for t in [0, threads): each fiber runs until it yields (waiting at a barrier) or
  // returns; rounds go first to last (or last to first) until all have returned.
  void run(int threads, const std::function<void(int)>& task, bool reverse, uint3* thread_index) {
    grow(threads);
    task_ = &task;
    for (int t = 0; t < threads; ++t) start(t);
    for (int live = threads; live > 0;) {
      const uint64_t before = g_progress;
      for (int i = 0; i < threads; ++i) {
        const int t = reverse ? threads - 1 - i : i;
        if (finished_[t]) continue;
        current_ = t;
        *thread_index = uint3{static_cast<unsigned>(t), 0, 0};
        resume(t);
        if (finished_[t]) --live;
      }
      if (live > 0 && g_progress == before) {
        std::fprintf(stderr, "emu: deadlock: %d of %d threads wait at a barrier the others never reach\n", live,
                     threads);
        std::abort();
      }
    }
  }

  // Back to the scheduler (from a fiber waiting at a barrier, or one that has returned).
  void yield() {
#if defined(__x86_64__)
    emu_switch(&sp_[current_], scheduler_sp_);
#else
    swapcontext(&contexts_[current_], &scheduler_);
#endif
  }

 private:
  static void entry();

  void start(int t) {
    finished_[t] = false;
#if defined(__x86_64__)
    // The first switch pops six zero registers and returns into entry(), whose own return
    // address slot (never used) keeps the stack aligned as at a call.
    void** p = reinterpret_cast<void**>(stacks_[t] + kStack);
    *--p = nullptr;
    *--p = reinterpret_cast<void*>(&Fibers::entry);
    for (int i = 0; i < 6; ++i) *--p = nullptr;
    sp_[t] = p;
#else
    getcontext(&contexts_[t]);
    contexts_[t].uc_stack.ss_sp = stacks_[t];
    contexts_[t].uc_stack.ss_size = kStack;
    contexts_[t].uc_link = nullptr;
    makecontext(&contexts_[t], &Fibers::entry, 0);
#endif
  }

  void resume(int t) {
#if defined(__x86_64__)
    emu_switch(&scheduler_sp_, sp_[t]);
#else
    swapcontext(&scheduler_, &contexts_[t]);
#endif
  }

  void grow(int threads) {
    while (static_cast<int>(stacks_.size()) < threads) {
      // a guard page below each stack: an overflow faults instead of writing into a neighbour
      void* p =
          mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED || mprotect(p, kGuard, PROT_NONE) != 0) {
        std::fprintf(stderr, "emu: cannot map a fiber stack\n");
        std::abort();
      }
      stacks_.push_back(static_cast<char*>(p) + kGuard);
    }
#if defined(__x86_64__)
    sp_.resize(stacks_.size());
#else
    contexts_.resize(stacks_.size());
#endif
    finished_.resize(stacks_.size());
  }

  std::vector<char*> stacks_;
#if defined(__x86_64__)
  std::vector<void*> sp_;  // each fiber's saved stack pointer
  void* scheduler_sp_ = nullptr;
#else
  std::vector<ucontext_t> contexts_;
  ucontext_t scheduler_{};
#endif
  std::vector<char> finished_;
  const std::function<void(int)>* task_ = nullptr;
  int current_ = 0;
};

inline Fibers& fibers() {
  static Fibers f;
  return f;
}

// A fiber's first frame: runs its thread of the block, then hands back for good.
inline void Fibers::entry() {
  Fibers& f = fibers();
  const int t = f.current_;
  (*f.task_)(t);
  f.finished_[t] = true;
  ++g_progress;
  f.yield();  // never resumed
  std::abort();
}

// std::barrier's arrive_and_wait / arrive_and_drop for fibers.
struct Barrier {
  explicit Barrier(int n) : expected(n), pending(n) {}
  void arrive() {
    ++g_progress;
    if (--pending == 0) {
      pending = expected;
      ++phase;
    }
  }
  void arrive_and_wait() {
    const uint64_t mine = phase;
    arrive();
    while (phase == mine) fibers().yield();
  }
  // leaves: later phases wait for one thread fewer (the current one counts it as arrived)
  void arrive_and_drop() {
    --expected;
    arrive();
  }
  int expected, pending;
  uint64_t phase = 0;
};

struct Block {
  explicit Block(int threads) : bar(threads), slots(static_cast<size_t>((threads + 31) / 32) * 32) {
    for (int w = 0; w * 32 < threads; ++w) warps.emplace_back(std::min(32, threads - w * 32));
  }
  Barrier bar;
  std::vector<Barrier> warps;
  std::vector<uint64_t> slots;  // one 8-byte exchange slot per thread
  std::vector<unsigned char> dynamic_smem;
};

inline thread_local uint3 tl_thread;
inline thread_local uint3 tl_block;
inline thread_local Block* tl_current = nullptr;
inline dim3 g_grid, g_block;
inline int64_t g_launches = 0, g_threads = 0;

// The runtime's per-thread error state (the harness is single-threaded on the
// host side): cudaGetLastError returns and clears the pending error unless it
// is sticky (then every later call keeps returning it), cudaPeekAtLastError
// returns it without clearing (emu_runtime.cpp). g_fail_next_launch makes the
// next launch fail with that error without running (set by the harness).
inline cudaError_t g_pending_error = cudaSuccess;
inline bool g_pending_sticky = false;
inline cudaError_t g_fail_next_launch = cudaSuccess;

inline void set_error(cudaError_t e, bool sticky) {
  if (g_pending_sticky) return;  // a sticky error is never replaced
  g_pending_error = e;
  g_pending_sticky = sticky;
}

inline unsigned char* dynamic_smem() { return tl_current->dynamic_smem.data(); }

template <typename... P, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...), Args&&... args) {
  const std::tuple<P...> params(std::forward<Args>(args)...);
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024 || smem > 48 * 1024 || grid.y > 65535 ||
      grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    std::fprintf(stderr, "emu: invalid launch configuration grid (%u, %u, %u) block %u smem %zu\n", grid.x, grid.y,
                 grid.z, block.x, smem);
    std::abort();
  }
  if (g_pending_sticky) return;  // a dead context runs nothing; the check after the launch reports it
  if (g_fail_next_launch != cudaSuccess) {
    const cudaError_t e = g_fail_next_launch;
    g_fail_next_launch = cudaSuccess;
    // launch errors are not sticky; an asynchronous fault surfacing here is
    set_error(e, e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure);
    return;
  }
  g_grid = grid;
  g_block = block;
  ++g_launches;
  const int threads = static_cast<int>(block.x);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b(threads);
        b.dynamic_smem.assign(smem + 16, 0xFF);  // NaN bytes: reads before writes show up
        tl_block = uint3{bx, by, bz};
        tl_current = &b;
        const std::function<void(int)> task = [&](int t) {
          std::apply(kernel, params);
          // an exited thread no longer holds up barriers (as on the GPU)
          b.warps[static_cast<size_t>(t / 32)].arrive_and_drop();
          b.bar.arrive_and_drop();
        };
        fibers().run(threads, task, ((g_launches + bx + by + bz) & 1) != 0, &tl_thread);
        g_threads += threads;
      }
}

inline int thread_rank() { return static_cast<int>(tl_thread.x); }

}  // namespace emu

// Counters for the harness (which does not include this header).
int64_t emu_launch_count();
int64_t emu_thread_count();

#define threadIdx (::emu::tl_thread)
#define blockIdx (::emu::tl_block)
#define blockDim (::emu::g_block)
#define gridDim (::emu::g_grid)

inline void __syncthreads() { emu::tl_current->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::tl_current->warps[static_cast<size_t>(emu::thread_rank() / 32)].arrive_and_wait();
}

template <typename V>
V __shfl_xor_sync(unsigned, V v, int offset, int = 32) {
  static_assert(sizeof(V) <= 8, "slot size");
  emu::Block& b = *emu::tl_current;
  const int t = emu::thread_rank(), base = t & ~31, lane = t & 31;
  std::memcpy(&b.slots[static_cast<size_t>(t)], &v, sizeof(V));
  __syncwarp();
  V r;
  std::memcpy(&r, &b.slots[static_cast<size_t>(base + (lane ^ offset))], sizeof(V));
  __syncwarp();
  return r;
}

[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "emu: __trap()\n");
  std::abort();
}

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
using std::exp;

using std::fmax;
