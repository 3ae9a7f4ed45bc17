// The CPU Backend (csrc/lily/cpu_routed_mix.h) of the torch bindings.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
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

// The x-side products of lily_linear (x A^T, dh A, dh^T x) through ATen's BLAS, as nn.Linear and the
// composed path (F.linear and its autograd) compute them: MKL is faster than cpu_gemm on these
// [N, in] x [in, r] shapes and scales better over threads. Like nn.Linear's, these results may
// change in the last bits with torch.set_num_threads; the routed_mix part stays on TorchCpuBackend.
struct AtenProjection {
  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    at::parallel_for(0, n, 1, f);
  }

  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
            int64_t ldb, T beta, T* C, int64_t ldc) const {
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
      at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
      return trans ? t.t() : t;
    };
    at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
    // beta == 0: addmm ignores c (NaN in it does not propagate), the BLAS contract of Backend::gemm
    at::addmm_out(c, c, view(A, M, K, lda, trans_a), view(B, K, N, ldb, trans_b), beta, alpha);
  }
};

}  // namespace lily_torch
