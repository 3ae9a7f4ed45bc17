// A portable blocked GEMM for hosts that lend no BLAS (the ONNX Runtime
// binding). Framework-free; compiled once (cpu_gemm.cpp).
//
//   C[M, N] = alpha * op(A) @ op(B) + beta * C, row-major, op(X) = X or X^T;
//   beta == 0: C is not read (so it may hold NaN or garbage).
//
// C is cut into tiles of at most kGemmTileRows x kGemmTileCols. Each tile is
// one task: it packs its own panels of op(A) and op(B) and runs a
// register-blocked micro-kernel over them, so tasks share nothing and can run
// on any threads. Every element of C is summed over k in one fixed order by
// one task: results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lily {
namespace cpu {

// Tile sizes: multiples of every micro-kernel's MR (12, 6, 4) and NR (32, 16,
// 8 floats), small enough that the packed panels of one tile stay in L2.
constexpr int64_t kGemmTileRows = 192;
constexpr int64_t kGemmTileCols = 512;

#define LILY_DECLARE_GEMM(T)                                                                                     \
  /* Computes tile `tile` of C (tiles numbered row-major over a grid of                       */                 \
  /* ceil(N / kGemmTileCols) tile columns).                                                     */               \
  void gemm_tile(int64_t tile, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, \
                 int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);                               \
  /* C[M, N] *= beta, or = 0 when beta == 0 (the K == 0 case) */                                                 \
  void gemm_scale(int64_t M, int64_t N, T beta, T* C, int64_t ldc);

LILY_DECLARE_GEMM(float)
LILY_DECLARE_GEMM(double)
#undef LILY_DECLARE_GEMM

// Name of the micro-kernel the running CPU gets ("avx512", "avx2", "generic").
const char* gemm_kernel_name();

inline int64_t gemm_tile_count(int64_t M, int64_t N) {
  return ((M + kGemmTileRows - 1) / kGemmTileRows) * ((N + kGemmTileCols - 1) / kGemmTileCols);
}

// The whole GEMM, tiles spread over `par.parallel_for(n, f(begin, end))`.
template <typename T, class Par>
void blocked_gemm(const Par& par, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                  int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == T(0)) {
    gemm_scale(M, N, beta, C, ldc);
    return;
  }
  par.parallel_for(gemm_tile_count(M, N), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemm_tile(t, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  });
}

// `batch` independent GEMMs with beta = 0, matrix i at A + i * stride_a etc.;
// one task per tile of every matrix, so small matrices still fill the threads.
template <typename T, class Par>
void blocked_gemm_batched(const Par& par, bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
                          T alpha, const T* A, int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b,
                          T* C, int64_t ldc, int64_t stride_c) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == T(0)) {
    for (int64_t i = 0; i < batch; ++i) gemm_scale(M, N, T(0), C + i * stride_c, ldc);
    return;
  }
  const int64_t tiles = gemm_tile_count(M, N);
  par.parallel_for(batch * tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / tiles;
      gemm_tile(t % tiles, trans_a, trans_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, T(0),
                C + i * stride_c, ldc);
    }
  });
}

}  // namespace cpu
}  // namespace lily
