// A CPU emulation of the CUDA execution model, just enough to run the
// project's kernels (csrc/cuda/*.cu) unchanged on a machine without a GPU:
// every CUDA thread is an OS thread, blocks run one after another, and
// __syncthreads / __syncwarp / warp shuffles are real barriers and exchanges,
// so index math, bounds, barrier placement and warp-level reductions are
// exercised as written. WMMA fragments hold the whole 16 x 16 tile per thread.
// Force-included (-include emu.h) into the transformed kernel sources.
#pragma once

// Real headers first, with their own host-side macro definitions.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <barrier>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
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

struct Block {
  explicit Block(int threads)
      : bar(threads), warps(static_cast<size_t>((threads + 31) / 32)), slots(warps.size() * 32) {
    for (size_t w = 0; w < warps.size(); ++w) {
      const int n = std::min(32, threads - static_cast<int>(w) * 32);
      warps[w] = std::make_unique<std::barrier<>>(n);
    }
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
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

// Persistent workers, one per CUDA thread of a block (thread creation would
// dominate the run time otherwise).
class Pool {
 public:
  void run(int threads, const std::function<void(int)>& task) {
    while (static_cast<int>(workers_.size()) < threads) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
    }
    std::unique_lock<std::mutex> lock(mutex_);
    task_ = &task;
    active_ = threads;
    remaining_ = threads;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [this] { return remaining_ == 0; });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        if (index >= active_) continue;
        task = task_;
      }
      (*task)(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(int)>* task_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, remaining_ = 0;
  bool stop_ = false;
};

inline Pool& pool() {
  static Pool p;
  return p;
}

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
        const std::function<void(int)> task = [&](int t) {
          tl_thread = uint3{static_cast<unsigned>(t), 0, 0};
          tl_block = uint3{bx, by, bz};
          tl_current = &b;
          std::apply(kernel, params);
          // an exited thread no longer holds up barriers (as on the GPU)
          b.warps[static_cast<size_t>(t / 32)]->arrive_and_drop();
          b.bar.arrive_and_drop();
        };
        pool().run(threads, task);
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
  emu::tl_current->warps[static_cast<size_t>(emu::thread_rank() / 32)]->arrive_and_wait();
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
