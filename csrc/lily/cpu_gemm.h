// A portable blocked GEMM for hosts that lend no BLAS (the ONNX Runtime
// binding). Framework-free; compiled once (cpu_gemm.cpp).
//
//   C[M, N] = alpha * op(A) @ op(B) + beta * C, row-major, op(X) = X or X^T;
//   beta == 0: C is not read (so it may hold NaN or garbage).
//
// C is cut into tiles of at most kGemmTileRows x kGemmTileCols (smaller for
// mid-sized products, so that two or more threads get work). Each tile is
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
// Products of at least kGemmSplitWork multiply-adds get tiles down to
// kGemmMinTileRows x kGemmMinTileCols until there are kGemmMinTiles of them: a
// Lily adapter's [512, 128] and [128, 512] products are one to three 192 x 512
// tiles, which left a second thread idle. Smaller products stay one task (a
// parallel region costs more than it saves there).
constexpr int64_t kGemmMinTileRows = 48;
constexpr int64_t kGemmMinTileCols = 64;
constexpr int64_t kGemmMinTiles = 8;
constexpr int64_t kGemmSplitWork = int64_t(1) << 21;

// The tile shape of C[M, N] (rows, cols). It depends on the problem only, and
// each element of C is summed over k in the same order whatever tile holds it,
// so neither the thread count nor the tiling changes a result.
struct GemmTiling {
  int64_t rows = kGemmTileRows, cols = kGemmTileCols;
  int64_t count(int64_t M, int64_t N) const { return ((M + rows - 1) / rows) * ((N + cols - 1) / cols); }
};

inline GemmTiling gemm_tiling(int64_t M, int64_t N, int64_t K) {
  GemmTiling t;
  if (M * N * K < kGemmSplitWork) return t;
  auto round_up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
  t.rows = std::min(t.rows, round_up(M, 12));
  t.cols = std::min(t.cols, round_up(N, 32));
  while (t.count(M, N) < kGemmMinTiles) {
    const bool can_rows = t.rows > kGemmMinTileRows, can_cols = t.cols > kGemmMinTileCols;
    if (!can_rows && !can_cols) break;
    if (can_cols && (t.cols >= t.rows || !can_rows))
      t.cols = std::max(kGemmMinTileCols, round_up(t.cols / 2, 32));
    else
      t.rows = std::max(kGemmMinTileRows, round_up(t.rows / 2, 12));
  }
  return t;
}

#define LILY_DECLARE_GEMM(T)                                                                                   \
  /* Computes tile `tile` of C (tiles of shape `tiling`, numbered row-major over a grid of     */              \
  /* ceil(N / tiling.cols) tile columns).                                                       */             \
  void gemm_tile(int64_t tile, GemmTiling tiling, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, \
                 T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);        \
  /* C[M, N] *= beta, or = 0 when beta == 0 (the K == 0 case) */                                               \
  void gemm_scale(int64_t M, int64_t N, T beta, T* C, int64_t ldc);

LILY_DECLARE_GEMM(float)
LILY_DECLARE_GEMM(double)
#undef LILY_DECLARE_GEMM

// Name of the micro-kernel the running CPU gets ("avx512", "avx2", "generic").
const char* gemm_kernel_name();

// The whole GEMM, tiles spread over `par.parallel_for(n, f(begin, end))`.
template <typename T, class Par>
void blocked_gemm(const Par& par, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                  int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == T(0)) {
    gemm_scale(M, N, beta, C, ldc);
    return;
  }
  const GemmTiling tiling = gemm_tiling(M, N, K);
  par.parallel_for(tiling.count(M, N), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      gemm_tile(t, tiling, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
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
  const GemmTiling tiling = gemm_tiling(M, N, K);
  const int64_t tiles = tiling.count(M, N);
  par.parallel_for(batch * tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / tiles;
      gemm_tile(t % tiles, tiling, trans_a, trans_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, T(0),
                C + i * stride_c, ldc);
    }
  });
}

}  // namespace cpu
}  // namespace lily
