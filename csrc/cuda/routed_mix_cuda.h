// routed_mix forward and backward on CUDA, framework-free: raw device pointers,
// sizes from lily::MixShape, the caller's stream and cuBLAS handle, and a
// workspace the caller allocates (torch: caching allocator; ORT: the kernel
// context's allocator). No torch or ORT headers; plain host C++ can include this.
//
// Tensors are contiguous, row-major, all of one dtype: hidden [N, r], router
// [E, r] (theta [E] for static), bank [E, r, out], delta / grad [N, out]; mask
// is null or N bytes (nonzero = the token counts for routing). Floating point
// math runs in float32 for float16 / bfloat16 / float32 inputs and in float64
// for float64. Every output element is written (N = 0: drouter and dbank are
// zeroed). Results are reproducible run to run: reductions run in a fixed
// order that depends only on the shape, and no kernel uses float atomics.
//
// Functions return "" on success, else a message naming the failed call.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../lily/contract.h"

namespace lily {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Largest number of experts the CUDA kernels take (shared-memory bound of the
// routing kernels); larger E is reported as an error, not run.
constexpr int64_t kMaxExperts = 256;

// Device scratch bytes a forward / backward call of this shape needs (may be 0).
// Depends on the current device (its compute capability) and on the
// LILY_CUDA_KRON / LILY_CUDA_SCRATCH_BYTES environment variables, so ask on the
// device and thread that then makes the call.
size_t forward_workspace_bytes(const MixShape& shape, DType dtype);
size_t backward_workspace_bytes(const MixShape& shape, DType dtype);

// Bytes of cuBLAS workspace a caller that owns its cuBLAS handle should bind to
// it (cublasSetWorkspace, after cublasSetStream) for a forward call of this
// shape: 0 when the call makes no cuBLAS call at all (then `blas` may be null),
// else NVIDIA's recommended size for the current device. Same dependencies as
// forward_workspace_bytes.
size_t forward_blas_workspace_bytes(const MixShape& shape, DType dtype);

std::string routed_mix_forward(const MixShape& shape, DType dtype, double scaling, const void* hidden,
                               const void* router, const void* bank, const uint8_t* mask, void* delta, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream, cublasHandle_t blas);

std::string routed_mix_backward(const MixShape& shape, DType dtype, double scaling, const void* grad,
                                const void* hidden, const void* router, const void* bank, const uint8_t* mask,
                                void* dhidden, void* drouter, void* dbank, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream, cublasHandle_t blas);

// A mask of any element type as the byte mask the calls above take:
// dst[i] = 1 where the i-th of n elements at src (elem_bytes = 1, 2, 4 or 8
// each) is nonzero, else 0. float_bits: the elements are IEEE floats (float16,
// bfloat16, float32, float64) whose sign bit is ignored, so -0.0 counts as zero
// and NaN as nonzero (torch's mask != 0). Asynchronous on `stream`.
std::string mask_to_bytes(const void* src, int64_t n, int elem_bytes, bool float_bits, uint8_t* dst,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace lily
