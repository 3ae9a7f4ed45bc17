// A portable blocked GEMM for hosts that lend no BLAS (the ONNX Runtime
// binding). Framework-free; compiled once (cpu_gemm.cpp).
//
//   C[M, N] = alpha * op(A) @ op(B) + beta * C, row-major, op(X) = X or X^T;
//   beta == 0: C is not read (so it may hold NaN or garbage).
//
// C is cut into tiles of at most kGemmTileRows x kGemmTileCols (smaller for
// mid-sized products, so that two or more threads get work). Each tile is
// one task that runs a register-blocked micro-kernel over packed panels of
// op(A) and op(B): large products pack per tile (tasks share nothing), mid-sized
// ones pack both operands once first, in parallel. Every element of C is
// summed over k in one fixed order by one task, whatever the tiling or the
// packing path: results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <new>

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
// Up to this many packed elements (op(A) and op(B) together: 4 MiB of floats), a split product
// packs both operands once for all its tiles; larger ones pack per tile, KC-deep slices that stay
// in cache (the whole packed copy of a big operand would go to memory and back).
constexpr int64_t kGemmSharedPackElements = int64_t(1) << 20;

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

// Every tile gemm_tiling makes starts on a panel boundary of every micro-kernel (MR 12, 6, 4; NR
// 32, 16, 8 floats, 16, 8, 4 doubles): the shared-packing path addresses panels by tile corner.
static_assert(kGemmTileRows % 12 == 0 && kGemmMinTileRows % 12 == 0, "tile rows: whole MR panels");
static_assert(kGemmTileCols % 32 == 0 && kGemmMinTileCols % 32 == 0, "tile columns: whole NR panels");

struct GemmPanelShape {
  int64_t mr, nr;
};

#define LILY_DECLARE_GEMM(T)                                                                                          \
  /* Computes tile `tile` of C (tiles of shape `tiling`, numbered row-major over a grid of     */                     \
  /* ceil(N / tiling.cols) tile columns).                                                       */                    \
  void gemm_tile(int64_t tile, GemmTiling tiling, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,        \
                 T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);               \
  /* Packs panels [p0, p1) of op(A) (b_side false) or op(B), every K slice (blocked_gemm's shared path) */            \
  void gemm_pack(bool b_side, int64_t p0, int64_t p1, bool trans, const T* X, int64_t ld, int64_t extent, int64_t K,  \
                 T* packed);                                                                                          \
  /* gemm_tile over operands packed by gemm_pack: the same result bits */                                             \
  void gemm_packed_tile(int64_t tile, GemmTiling tiling, int64_t M, int64_t N, int64_t K, T alpha, const T* a_packed, \
                        const T* b_packed, T beta, T* C, int64_t ldc);                                                \
  /* The running CPU's micro-tile: rows per panel of op(A), columns per panel of op(B) */                             \
  GemmPanelShape gemm_panel_shape(const T* tag);                                                                      \
  /* C[M, N] *= beta, or = 0 when beta == 0 (the K == 0 case) */                                                      \
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
  const int64_t tiles = tiling.count(M, N);
  const GemmPanelShape shape = gemm_panel_shape(A);
  const int64_t a_panels = (M + shape.mr - 1) / shape.mr, b_panels = (N + shape.nr - 1) / shape.nr;
  const int64_t packed = (a_panels * shape.mr + b_panels * shape.nr) * K;
  if (tiles == 1 || packed > kGemmSharedPackElements) {
    par.parallel_for(tiles, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        gemm_tile(t, tiling, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    });
    return;
  }
  // Both operands packed once, shared by every tile (a tile packing its own would repeat that
  // work once per tile row or column); then the tiles.
  T* a_packed = static_cast<T*>(::operator new[](size_t(packed) * sizeof(T), std::align_val_t(64)));
  struct Free {
    T* p;
    ~Free() { ::operator delete[](p, std::align_val_t(64)); }
  } owner{a_packed};
  T* b_packed = a_packed + a_panels * shape.mr * K;
  constexpr int64_t kPanelsPerTask = 4;
  const int64_t a_tasks = (a_panels + kPanelsPerTask - 1) / kPanelsPerTask;
  const int64_t b_tasks = (b_panels + kPanelsPerTask - 1) / kPanelsPerTask;
  par.parallel_for(a_tasks + b_tasks, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const bool b_side = t >= a_tasks;
      const int64_t p0 = (b_side ? t - a_tasks : t) * kPanelsPerTask;
      const int64_t p1 = std::min(p0 + kPanelsPerTask, b_side ? b_panels : a_panels);
      if (b_side)
        gemm_pack(true, p0, p1, trans_b, B, ldb, N, K, b_packed);
      else
        gemm_pack(false, p0, p1, trans_a, A, lda, M, K, a_packed);
    }
  });
  par.parallel_for(tiles, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) gemm_packed_tile(t, tiling, M, N, K, alpha, a_packed, b_packed, beta, C, ldc);
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
