// Vectorised CPU building blocks of routed_mix. Framework-free; compiled once
// (cpu_primitives.cpp) into both the torch extension and the ORT library.
// Each exists for float and double; every reduction runs in a fixed order, so
// results do not depend on how callers split work across threads.
#pragma once

#include <cstdint>

namespace lily {
namespace cpu {

// Widest column block gemm_small handles in one call.
template <typename T>
constexpr int64_t kColBlock = 64 / sizeof(T) * 2;

#define LILY_DECLARE_PRIMITIVES(T)                                                                                     \
  /* probs[n, :] = softmax(router @ hidden[n, :]) for n < rows */                                                      \
  void router_softmax(const T* hidden, int64_t rows, int64_t rank, const T* router, int64_t experts, T* probs);        \
  /* dst[i - i0, j] = sum_e weights[e] * bank[e, i, c0 + j] for i in [i0, i1), j < cols */                             \
  void combine_bank(const T* weights, const T* bank, int64_t experts, int64_t rank, int64_t out, int64_t i0,           \
                    int64_t i1, int64_t c0, int64_t cols, T* dst, int64_t ld_dst);                                     \
  /* C[M, cols] = alpha * A[M, K] @ B[K, cols], cols <= kColBlock<T>, A[m, k] at             */                        \
  /* A + m * a_row + k * a_col (so A may be a transposed view)                                  */                     \
  void gemm_small(int64_t M, int64_t K, int64_t cols, T alpha, const T* A, int64_t a_row, int64_t a_col, const T* B,   \
                  int64_t ldb, T* C, int64_t ldc);                                                                     \
  /* The same for any cols, B read row by row: for a few rows of A and a B larger than the cache */                    \
  void gemm_stream(int64_t M, int64_t K, int64_t cols, T alpha, const T* A, int64_t a_row, int64_t a_col, const T* B,  \
                   int64_t ldb, T* C, int64_t ldc);                                                                    \
  /* C[M, N] = alpha * A[M, K] @ B[N, K]^T: row dot products, for small M */                                           \
  void gemm_small_nt(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, \
                     int64_t ldc);                                                                                     \
  /* One pass over flat positions [j0, j1) of each bank plane (plane = r * out):              */                       \
  /*   dbank[e, j] (+)= weights[e] * dcomb[j];  dweights[e] = sum_j bank[e, j] * dcomb[j];      */                     \
  /*   comb[j] = sum_e weights[e] * bank[e, j]                                                  */                     \
  void bank_grad(const T* weights, const T* dcomb, const T* bank, int64_t experts, int64_t plane, int64_t j0,          \
                 int64_t j1, bool accumulate, T* dbank, T* dweights, T* comb);                                         \
  /* Z[n, e * r + i] = W[n, e] * hidden[n, i] */                                                                       \
  void kron_rows(const T* W, const T* hidden, int64_t rows, int64_t experts, int64_t rank, T* Z);                      \
  /* dW[n, e] = <dZ[n, e, :], hidden[n, :]>;  dhidden[n, :] = sum_e W[n, e] dZ[n, e, :] */                             \
  void kron_rows_backward(const T* W, const T* hidden, const T* dZ, int64_t rows, int64_t experts, int64_t rank,       \
                          T* dW, T* dhidden);                                                                          \
  /* Softmax backward through the router, per row:                                             */                      \
  /*   dlogit = P * (dP - <P, dP>);  dhidden[n] += dlogit @ router;  drouter += dlogit^T h[n]   */                     \
  void router_backward(const T* hidden, const T* probs, const T* dprobs, int64_t rows, int64_t rank, const T* router,  \
                       int64_t experts, T* dhidden, T* drouter);

LILY_DECLARE_PRIMITIVES(float)
LILY_DECLARE_PRIMITIVES(double)
#undef LILY_DECLARE_PRIMITIVES

}  // namespace cpu
}  // namespace lily
