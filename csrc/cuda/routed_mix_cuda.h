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
// Precision policy (independent of torch's TF32 switch): every path computes
// float32 inputs in full float32, whatever the caller's cuBLAS handle allows.
// The hand-written kernels compute float32 on CUDA cores in float32 (tensor
// cores only for float16 / bfloat16, accumulating in float32); the cuBLAS GEMMs use
// CUBLAS_COMPUTE_32F (64F for float64), never a _FAST_* compute type, and run
// with the handle's math mode set to kBlasMathMode for the duration of each
// call and restored afterwards: no TF32 (torch sets CUBLAS_TF32_TENSOR_OP_MATH
// on its handle when torch.backends.cuda.matmul.allow_tf32 is on, or with
// torch.set_float32_matmul_precision("high"/"medium")), and for float16 /
// bfloat16 inputs no reduced-precision (16-bit) split-K reductions either,
// whatever torch's allow_fp16/bf16_reduced_precision_reduction say: those GEMMs
// run on tensor cores with float32 accumulation throughout. So results do not
// depend on the path a shape takes nor on torch's matmul settings, and float32
// agrees with the CPU kernels at ~1e-5 on every path. float64 uses plain FP64
// (no fixed-point emulation).
//
// Functions return "" on success, else a message naming the failed call; a
// CUDA error left pending by earlier, unrelated work is reported as such, not
// as the failure of the kernel that was about to launch (common.cuh).
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

// The cuBLAS math mode of every GEMM (see the precision policy above): default
// math (no TF32, no emulation) and no reduced-precision reductions.
constexpr cublasMath_t kBlasMathMode =
    static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);

// What a call of a given shape and dtype needs from its caller. Depends on the
// current device (its compute capability, queried once per device and process)
// and on the LILY_CUDA_KRON / LILY_CUDA_SCRATCH_BYTES environment variables,
// which are read once per process (at the first planning pass; reload_knobs()
// reads them again), so ask on the device that then makes the call.
struct CallPlan {
  // device scratch the call needs (may be 0: the small-N forward without split-K
  // and the empty call need none; pass a null workspace then)
  size_t workspace_bytes = 0;
  // whether the call makes cuBLAS calls; when false, `blas` may be null and is
  // never touched (the small-N forward, the tiled per-row forward, N = 0)
  bool uses_blas = false;
  // bytes of cuBLAS workspace a caller that owns its cuBLAS handle should bind
  // to it (cublasSetWorkspace, after cublasSetStream): 0 when !uses_blas, else
  // NVIDIA's recommended size for the current device
  size_t blas_workspace_bytes = 0;
};
CallPlan plan_forward_call(const MixShape& shape, DType dtype);
CallPlan plan_backward_call(const MixShape& shape, DType dtype);

// The fields of the plans above, one at a time.
size_t forward_workspace_bytes(const MixShape& shape, DType dtype);
size_t backward_workspace_bytes(const MixShape& shape, DType dtype);
size_t forward_blas_workspace_bytes(const MixShape& shape, DType dtype);

// Reads LILY_CUDA_KRON and LILY_CUDA_SCRATCH_BYTES again (tests, benchmarks and
// tools that change them within a process; otherwise they are read once).
// Thread-safe, but a call planned before and run after a reload may find its
// workspace too small and fail with a message saying so.
void reload_knobs();

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
