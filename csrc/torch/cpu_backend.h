// The CPU Backends (csrc/lily/cpu_routed_mix.h) of the torch bindings: TorchCpuBackend for
// routed_mix, AtenBackend for lily_linear.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>

#include "../lily/cpu_gemm.h"

namespace lily_torch {

// The large GEMMs go to the same blocked GEMM as the ONNX Runtime binding
// (csrc/lily/cpu_gemm.h), not to ATen's BLAS: MKL splits the reduction over
// rows (h^T G) between threads for small outputs, so its results change with
// torch.set_num_threads; cpu_gemm sums every element in one fixed order.
struct TorchCpuBackend {
  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    at::parallel_for(0, n, 1, f);
  }

  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
            int64_t ldb, T beta, T* C, int64_t ldc) const {
    lily::cpu::blocked_gemm(*this, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  template <typename T>
  void gemm_batched(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b, T* C, int64_t ldc,
                    int64_t stride_c) const {
    lily::cpu::blocked_gemm_batched(*this, trans_a, trans_b, batch, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b,
                                    C, ldc, stride_c);
  }
};

// lily_linear's Backend: the same loops, every GEMM through ATen's BLAS, as the base layer (nn.Linear)
// beside it and the composed path (F.linear and its autograd) compute theirs. On the 2-core AVX2 host
// cpu_gemm took 1.3x MKL's time on one thread and scaled worse over two, and the fused train step was
// slower than the composed one until its products moved here. Like nn.Linear's, these results may
// change in the last bits with torch.set_num_threads (the base layer's already do); lily::routed_mix
// itself stays on TorchCpuBackend, thread-count independent.
struct AtenBackend {
  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    at::parallel_for(0, n, 1, f);
  }

  // rows x cols matrix at p, leading dim ld, batch stride `stride` (batch 0: a 2-D view); transposed view if trans
  template <typename T>
  static at::Tensor view(const T* p, int64_t batch, int64_t stride, int64_t rows, int64_t cols, int64_t ld,
                         bool trans) {
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    const int64_t r = trans ? cols : rows, c = trans ? rows : cols;
    at::Tensor t = batch == 0 ? at::from_blob(const_cast<T*>(p), {r, c}, {ld, 1}, options)
                              : at::from_blob(const_cast<T*>(p), {batch, r, c}, {stride, ld, 1}, options);
    return trans ? t.transpose(-1, -2) : t;
  }

  // beta == 0: addmm / baddbmm ignore C (NaN in it does not propagate), the Backend::gemm contract
  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
            int64_t ldb, T beta, T* C, int64_t ldc) const {
    at::Tensor c = view<T>(C, 0, 0, M, N, ldc, false);
    at::addmm_out(c, c, view(A, 0, 0, M, K, lda, trans_a), view(B, 0, 0, K, N, ldb, trans_b), beta, alpha);
  }

  template <typename T>
  void gemm_batched(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b, T* C, int64_t ldc,
                    int64_t stride_c) const {
    at::Tensor c = view<T>(C, batch, stride_c, M, N, ldc, false);
    at::baddbmm_out(c, c, view(A, batch, stride_a, M, K, lda, trans_a), view(B, batch, stride_b, K, N, ldb, trans_b),
                    T(0), alpha);
  }
};

}  // namespace lily_torch
