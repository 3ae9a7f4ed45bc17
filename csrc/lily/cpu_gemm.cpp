// See cpu_gemm.h. The usual three-level blocking (BLIS's loop order): per
// tile of C and per KC-deep slice of K, op(A) and op(B) are packed into
// micro-panels (MR rows x KC and KC x NR columns, zero-padded), then an
// MR x NR register-blocked micro-kernel runs over every pair of them.
//
// The micro-kernel is written once over GCC/Clang vector types. Its best
// shape depends on the register file (32 x 64-byte registers with AVX-512,
// 16 x 32-byte with AVX2, 16 x 16-byte with SSE2), which target_clones cannot
// vary per clone, so each x86-64 level gets its own instantiation through
// function multiversioning (target("...") overloads, dispatched once at load
// time exactly like target_clones).
#include "cpu_gemm.h"

#include <cstring>
#include <new>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(LILY_NO_MULTIVERSION)
#define LILY_GEMM_MULTIVERSION 1
#endif
#define LILY_INLINE inline __attribute__((always_inline))

namespace lily {
namespace cpu {
namespace {

// Depth of one packed slice (256 floats): a KC x NR micro-panel of B (32 KiB
// for AVX-512 floats) stays in L1/L2 while the tile's A micro-panels stream
// past it; deeper slices measured slower on a 1 MiB-L2 Zen 4.
template <typename T>
constexpr int64_t kDepth = 1024 / sizeof(T);

// Per-thread packing buffers, grown on demand, 64-byte aligned.
template <typename T>
struct PackBuffer {
  T* data = nullptr;
  size_t size = 0;
  T* get(size_t n) {
    if (n > size) {
      ::operator delete[](data, std::align_val_t(64));
      data = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(64)));
      size = n;
    }
    return data;
  }
  ~PackBuffer() { ::operator delete[](data, std::align_val_t(64)); }
};

// panel[p][k][i] = op(A)[r0 + p * MR + i, k0 + k] for the tile's rows, zero past `rows`.
template <typename T, int MR>
LILY_INLINE void pack_a(bool trans, const T* A, int64_t lda, int64_t r0, int64_t rows, int64_t k0, int64_t kc,
                        T* panel) {
  for (int64_t p = 0; p * MR < rows; ++p, panel += MR * kc) {
    const int64_t i0 = r0 + p * MR, n = std::min<int64_t>(MR, rows - p * MR);
    if (trans) {  // op(A)[i, k] = A[k, i]: MR contiguous values per k
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = A + (k0 + k) * lda + i0;
        T* dst = panel + k * MR;
        for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
        for (int64_t i = n; i < MR; ++i) dst[i] = T(0);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const T* src = A + (i0 + i) * lda + k0;
        for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = src[k];
      }
      for (int64_t i = n; i < MR; ++i)
        for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = T(0);
    }
  }
}

// panel[p][k][j] = op(B)[k0 + k, c0 + p * NR + j], zero past `cols`.
template <typename T, int NR>
LILY_INLINE void pack_b(bool trans, const T* B, int64_t ldb, int64_t c0, int64_t cols, int64_t k0, int64_t kc,
                        T* panel) {
  for (int64_t p = 0; p * NR < cols; ++p, panel += NR * kc) {
    const int64_t j0 = c0 + p * NR, n = std::min<int64_t>(NR, cols - p * NR);
    if (!trans) {  // NR contiguous values per k
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = B + (k0 + k) * ldb + j0;
        T* dst = panel + k * NR;
        if (n == NR) {
          std::memcpy(dst, src, sizeof(T) * NR);
        } else {
          for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
          for (int64_t j = n; j < NR; ++j) dst[j] = T(0);
        }
      }
    } else {  // op(B)[k, j] = B[j, k]
      for (int64_t j = 0; j < n; ++j) {
        const T* src = B + (j0 + j) * ldb + k0;
        for (int64_t k = 0; k < kc; ++k) panel[k * NR + j] = src[k];
      }
      for (int64_t j = n; j < NR; ++j)
        for (int64_t k = 0; k < kc; ++k) panel[k * NR + j] = T(0);
    }
  }
}

// C[rows, cols] (<= MR x NR) = alpha * a_panel @ b_panel + beta * C; beta == 0 does not read C.
template <typename T, int VB, int MR, int NV>
LILY_INLINE void micro_kernel(int64_t kc, const T* __restrict__ a, const T* __restrict__ b, T* C, int64_t ldc,
                              int64_t rows, int64_t cols, T alpha, T beta) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int W = VB / sizeof(T), NR = NV * W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }
  if (rows == MR && cols == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        T* c = C + i * ldc + v * W;
        V r = alpha * acc[i][v];
        if (beta != T(0)) {
          V old;
          std::memcpy(&old, c, sizeof(V));
          r += beta * old;
        }
        std::memcpy(c, &r, sizeof(V));
      }
    return;
  }
  // Edge tile: only the valid part of C may be touched.
  T tmp[MR * NR];
  std::memcpy(tmp, acc, sizeof(tmp));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      T* c = C + i * ldc + j;
      *c = beta == T(0) ? alpha * tmp[i * NR + j] : alpha * tmp[i * NR + j] + beta * *c;
    }
}

// Rows [r0, r0 + rows) and columns [c0, c0 + cols) of tile `tile` of C.
struct TileBounds {
  int64_t r0, c0, rows, cols;
};

LILY_INLINE TileBounds tile_bounds(int64_t tile, GemmTiling tiling, int64_t M, int64_t N) {
  const int64_t col_tiles = (N + tiling.cols - 1) / tiling.cols;
  const int64_t r0 = (tile / col_tiles) * tiling.rows, c0 = (tile % col_tiles) * tiling.cols;
  return {r0, c0, std::min(tiling.rows, M - r0), std::min(tiling.cols, N - c0)};
}

// One kc-deep slice of a tile: the micro-kernel over every (B panel, A panel) pair, panel i of
// the tile's A at a + i * kc (i a row offset), panel j of its B at b + j * kc; C at the tile's corner.
template <typename T, int VB, int MR, int NV>
LILY_INLINE void sweep_slice(int64_t kc, const T* a, const T* b, T* C, int64_t ldc, int64_t rows, int64_t cols, T alpha,
                             T beta) {
  constexpr int NR = NV * int(VB / sizeof(T));
  for (int64_t j = 0; j < cols; j += NR)
    for (int64_t i = 0; i < rows; i += MR)
      micro_kernel<T, VB, MR, NV>(kc, a + i * kc, b + j * kc, C + i * ldc + j, ldc, std::min<int64_t>(MR, rows - i),
                                  std::min<int64_t>(NR, cols - j), alpha, beta);
}

template <typename T, int VB, int MR, int NV>
LILY_INLINE void gemm_tile_impl(int64_t tile, GemmTiling tiling, bool trans_a, bool trans_b, int64_t M, int64_t N,
                                int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
                                int64_t ldc) {
  constexpr int NR = NV * int(VB / sizeof(T));
  constexpr int64_t KC = kDepth<T>;
  thread_local PackBuffer<T> a_buf, b_buf;
  const TileBounds t = tile_bounds(tile, tiling, M, N);
  const int64_t a_panels = (t.rows + MR - 1) / MR, b_panels = (t.cols + NR - 1) / NR;
  T* a_pack = a_buf.get(static_cast<size_t>(a_panels * MR * std::min(KC, K)));
  T* b_pack = b_buf.get(static_cast<size_t>(b_panels * NR * std::min(KC, K)));
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    pack_b<T, NR>(trans_b, B, ldb, t.c0, t.cols, k0, kc, b_pack);
    pack_a<T, MR>(trans_a, A, lda, t.r0, t.rows, k0, kc, a_pack);
    // later slices accumulate onto the first
    sweep_slice<T, VB, MR, NV>(kc, a_pack, b_pack, C + t.r0 * ldc + t.c0, ldc, t.rows, t.cols, alpha,
                               k0 == 0 ? beta : T(1));
  }
}

// Shared packing (blocked_gemm's small-operand path): panels [p0, p1) of op(A) (b_side false, MR
// rows each) or op(B) (NR columns each), every K slice, into `packed`. Slice k0 of an operand of
// `extent` rows (columns) padded to whole panels starts at k0 * padded; panel p of it at p * R * kc.
template <typename T, int MR, int NR>
LILY_INLINE void pack_panels_impl(bool b_side, int64_t p0, int64_t p1, bool trans, const T* X, int64_t ld,
                                  int64_t extent, int64_t K, T* packed) {
  constexpr int64_t KC = kDepth<T>;
  const int64_t R = b_side ? NR : MR, padded = (extent + R - 1) / R * R;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    T* slice = packed + k0 * padded;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t first = p * R, count = std::min<int64_t>(R, extent - first);
      if (b_side)
        pack_b<T, NR>(trans, X, ld, first, count, k0, kc, slice + first * kc);
      else
        pack_a<T, MR>(trans, X, ld, first, count, k0, kc, slice + first * kc);
    }
  }
}

// gemm_tile_impl over operands packed once by pack_panels_impl: the same micro-kernel calls on the
// same panel contents in the same order, so the same bits.
template <typename T, int VB, int MR, int NV>
LILY_INLINE void packed_tile_impl(int64_t tile, GemmTiling tiling, int64_t M, int64_t N, int64_t K, T alpha,
                                  const T* a_packed, const T* b_packed, T beta, T* C, int64_t ldc) {
  constexpr int NR = NV * int(VB / sizeof(T));
  constexpr int64_t KC = kDepth<T>;
  const TileBounds t = tile_bounds(tile, tiling, M, N);
  const int64_t m_padded = (M + MR - 1) / MR * MR, n_padded = (N + NR - 1) / NR * NR;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    sweep_slice<T, VB, MR, NV>(kc, a_packed + k0 * m_padded + t.r0 * kc, b_packed + k0 * n_padded + t.c0 * kc,
                               C + t.r0 * ldc + t.c0, ldc, t.rows, t.cols, alpha, k0 == 0 ? beta : T(1));
  }
}

// Micro-kernel shapes per level (accumulator registers + operand registers):
//   AVX-512: 12 x 2 zmm = 24 accumulators + 2 B vectors + 1 broadcast of 32;
//   AVX2:     6 x 2 ymm = 12 accumulators + 2 + 1 of 16 (the classic 6x16);
//   SSE2:     4 x 2 xmm =  8 accumulators + 2 + 1 of 16.
#define LILY_GEMM_TILE_ARGS(T)                                                                                       \
  int64_t tile, GemmTiling tiling, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T *A, \
      int64_t lda, const T *B, int64_t ldb, T beta, T *C, int64_t ldc
#define LILY_GEMM_TILE_PASS tile, tiling, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc
#define LILY_GEMM_PACK_ARGS(T) \
  bool b_side, int64_t p0, int64_t p1, bool trans, const T *X, int64_t ld, int64_t extent, int64_t K, T *packed
#define LILY_GEMM_PACK_PASS b_side, p0, p1, trans, X, ld, extent, K, packed
#define LILY_GEMM_PACKED_ARGS(T)                                                                                   \
  int64_t tile, GemmTiling tiling, int64_t M, int64_t N, int64_t K, T alpha, const T *a_packed, const T *b_packed, \
      T beta, T *C, int64_t ldc
#define LILY_GEMM_PACKED_PASS tile, tiling, M, N, K, alpha, a_packed, b_packed, beta, C, ldc

// One level's kernels: (T, function attribute, vector bytes, MR, vectors per row of the micro-tile).
#define LILY_DEFINE_LEVEL(T, ATTR, VB, MR, NV)                                                                       \
  ATTR void tile_kernel(LILY_GEMM_TILE_ARGS(T)) { gemm_tile_impl<T, VB, MR, NV>(LILY_GEMM_TILE_PASS); }              \
  ATTR void pack_kernel(LILY_GEMM_PACK_ARGS(T)) {                                                                    \
    pack_panels_impl<T, MR, NV* int(VB / sizeof(T))>(LILY_GEMM_PACK_PASS);                                           \
  }                                                                                                                  \
  ATTR void packed_tile_kernel(LILY_GEMM_PACKED_ARGS(T)) { packed_tile_impl<T, VB, MR, NV>(LILY_GEMM_PACKED_PASS); } \
  ATTR GemmPanelShape panel_shape_kernel(const T*) { return {MR, NV * int64_t(VB / sizeof(T))}; }

#ifdef LILY_GEMM_MULTIVERSION
// LILY_GEMM_NO_AVX512 (tests only) drops the AVX-512 level so that an AVX-512
// host can check the AVX2 kernel.
#ifndef LILY_GEMM_NO_AVX512
#define LILY_LEVEL_V4(T) LILY_DEFINE_LEVEL(T, __attribute__((target("arch=x86-64-v4"))), 64, 12, 2)
#else
#define LILY_LEVEL_V4(T)
#endif
#define LILY_DEFINE_LEVELS(T)                                               \
  LILY_LEVEL_V4(T)                                                          \
  LILY_DEFINE_LEVEL(T, __attribute__((target("arch=x86-64-v3"))), 32, 6, 2) \
  LILY_DEFINE_LEVEL(T, __attribute__((target("default"))), 16, 4, 2)
#else
#define LILY_DEFINE_LEVELS(T) LILY_DEFINE_LEVEL(T, , 16, 4, 2)
#endif

LILY_DEFINE_LEVELS(float)
LILY_DEFINE_LEVELS(double)

#ifdef LILY_GEMM_MULTIVERSION
#ifndef LILY_GEMM_NO_AVX512
__attribute__((target("arch=x86-64-v4"))) const char* kernel_name() { return "avx512"; }
#endif
__attribute__((target("arch=x86-64-v3"))) const char* kernel_name() { return "avx2"; }
__attribute__((target("default"))) const char* kernel_name() { return "generic"; }
#else
const char* kernel_name() { return "generic"; }
#endif

template <typename T>
void scale_impl(int64_t M, int64_t N, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (beta == T(0)) {
      std::fill(c, c + N, T(0));
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
}

}  // namespace

const char* gemm_kernel_name() { return kernel_name(); }

#define LILY_DEFINE_GEMM(T)                                                                      \
  void gemm_tile(LILY_GEMM_TILE_ARGS(T)) { tile_kernel(LILY_GEMM_TILE_PASS); }                   \
  void gemm_pack(LILY_GEMM_PACK_ARGS(T)) { pack_kernel(LILY_GEMM_PACK_PASS); }                   \
  void gemm_packed_tile(LILY_GEMM_PACKED_ARGS(T)) { packed_tile_kernel(LILY_GEMM_PACKED_PASS); } \
  GemmPanelShape gemm_panel_shape(const T* tag) { return panel_shape_kernel(tag); }              \
  void gemm_scale(int64_t M, int64_t N, T beta, T* C, int64_t ldc) { scale_impl(M, N, beta, C, ldc); }

LILY_DEFINE_GEMM(float)
LILY_DEFINE_GEMM(double)

}  // namespace cpu
}  // namespace lily
