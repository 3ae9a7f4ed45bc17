// Device helpers shared by the routed_mix CUDA kernels: accumulation types,
// conversions, fixed-order warp / block reductions, vector packs, error macros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels.h"

namespace lily {
namespace cuda {

// Accumulation (and small-intermediate) type: float for the 16-bit types and
// float32, double for float64 (defined in kernels.h for the host launchers).
template <typename T>
using acc_t = acc_type<T>;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }

// Butterfly (xor) reductions: every lane ends with the same, bitwise identical
// value (IEEE addition is commutative), so the result does not depend on timing.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Fixed-shape tree sum over a block of kThreads threads (a power of two);
// `scratch` holds kThreads values. Every thread must call it; all get the sum.
template <int kThreads, typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  const int t = threadIdx.x;
  scratch[t] = v;
  __syncthreads();
#pragma unroll
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) scratch[t] += scratch[t + stride];
    __syncthreads();
  }
  const V total = scratch[0];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// 16 bytes of T, for vector loads and stores.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
  *reinterpret_cast<Pack<T>*>(p) = x;
}

template <typename T>
__device__ __forceinline__ Pack<T> zero_pack() {
  Pack<T> x;
#pragma unroll
  for (int i = 0; i < Pack<T>::kSize; ++i) x.v[i] = from_acc<T>(acc_t<T>(0));
  return x;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace lily

// Error handling for the framework-free layer: every CUDA / cuBLAS status is
// checked and turned into a returned message; "" means success.
#define LILY_CUDA_CHECK(expr)                                                           \
  do {                                                                                  \
    const cudaError_t lily_status_ = (expr);                                            \
    if (lily_status_ != cudaSuccess)                                                    \
      return std::string(#expr) + " failed: " + cudaGetErrorName(lily_status_) + " (" + \
             cudaGetErrorString(lily_status_) + ")";                                    \
  } while (0)

// Kernel launches: LILY_LAUNCH("name", kernel<<<grid, block, smem, stream>>>(args)) launches and
// returns a message from the enclosing function when the launch failed, naming the right culprit:
// - before the launch, cudaPeekAtLastError: an error already pending on this host thread comes from
//   earlier CUDA work (another library's unchecked launch, or an asynchronous fault of an earlier
//   kernel, possibly one of this call's) and would otherwise be returned by the check after the launch
//   as if this kernel had failed. It is reported as earlier work's error and the kernel is not
//   launched; a non-sticky one is cleared by that report (it is not reported twice), a sticky one
//   stays (the CUDA context is unusable; every later call fails).
// - after the launch, cudaGetLastError: this launch's own status. Configuration, image and resource
//   errors are the launch's; any other status is asynchronous (it surfaced at this launch) and the
//   message says so.
#define LILY_LAUNCH(kernel_name, ...)                                 \
  do {                                                                \
    LILY_TRY(::lily::cuda::error_pending_before_launch(kernel_name)); \
    __VA_ARGS__;                                                      \
    LILY_TRY(::lily::cuda::launch_status(kernel_name));               \
  } while (0)

namespace lily {
namespace cuda {

// Whether `e`, returned right after a launch, is an error of the launch itself (its configuration,
// the kernel image, resources) rather than an asynchronous one from work already on the device.
inline bool is_launch_error(cudaError_t e) {
  switch (e) {
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorMissingConfiguration:
    case cudaErrorLaunchOutOfResources:
    case cudaErrorInvalidDeviceFunction:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidKernelImage:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorSharedObjectInitFailed:
    case cudaErrorInvalidResourceHandle:
    case cudaErrorCooperativeLaunchTooLarge:
    case cudaErrorMemoryAllocation:
    case cudaErrorInitializationError:
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return true;
    default:
      return false;
  }
}

inline std::string describe_cuda_error(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

// "" when no CUDA error is pending on this thread; else a message naming the pending error as earlier
// work's, not `kernel_name`'s (see LILY_LAUNCH).
inline std::string error_pending_before_launch(const char* kernel_name) {
  const cudaError_t pending = cudaPeekAtLastError();
  if (pending == cudaSuccess) return "";
  (void)cudaGetLastError();  // clears a non-sticky error; a sticky one stays
  const bool sticky = cudaPeekAtLastError() != cudaSuccess;
  return std::string("an earlier CUDA error was pending before the launch of ") + kernel_name +
         " (not caused by this call; it comes from earlier CUDA work on this thread): " + describe_cuda_error(pending) +
         (sticky ? "; the error is sticky: the CUDA context is no longer usable" : "; the pending error was cleared");
}

// After a launch: "" or the launch's failure (see LILY_LAUNCH).
inline std::string launch_status(const char* kernel_name) {
  const cudaError_t status = cudaGetLastError();
  if (status == cudaSuccess) return "";
  std::string message = std::string("launch of ") + kernel_name + " failed: " + describe_cuda_error(status);
  if (!is_launch_error(status))
    message += " (an asynchronous error that surfaced at this launch: it may come from earlier work on the device)";
  return message;
}

}  // namespace cuda
}  // namespace lily

#define LILY_TRY(expr)                            \
  do {                                            \
    std::string lily_error_ = (expr);             \
    if (!lily_error_.empty()) return lily_error_; \
  } while (0)
