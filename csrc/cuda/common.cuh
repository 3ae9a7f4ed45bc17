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

// After a kernel launch: launch-configuration errors surface here.
#define LILY_LAUNCH_CHECK(kernel_name)                                                                         \
  do {                                                                                                         \
    const cudaError_t lily_status_ = cudaGetLastError();                                                       \
    if (lily_status_ != cudaSuccess)                                                                           \
      return std::string("launch of ") + (kernel_name) + " failed: " + cudaGetErrorName(lily_status_) + " (" + \
             cudaGetErrorString(lily_status_) + ")";                                                           \
  } while (0)

#define LILY_TRY(expr)                            \
  do {                                            \
    std::string lily_error_ = (expr);             \
    if (!lily_error_.empty()) return lily_error_; \
  } while (0)
