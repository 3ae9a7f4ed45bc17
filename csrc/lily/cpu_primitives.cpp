// See cpu_primitives.h. The loops are written over GCC/Clang vector types and
// compiled once per x86-64 level, so one binary uses AVX-512 or AVX2 where the
// host has it and plain SSE2 elsewhere: loops the compiler vectorises itself
// through target_clones, loops written over Simd<T, Bytes> through one
// target("...") overload per level with Bytes sized to its registers (below).
#include "cpu_primitives.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(LILY_NO_MULTIVERSION)
#define LILY_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LILY_MULTIVERSION
#endif
#define LILY_INLINE inline __attribute__((always_inline))

namespace lily {
namespace cpu {
namespace {

// Bytes: the vector width the loops are written over, chosen per x86-64 level.
template <typename T, int Bytes>
struct Simd {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int64_t width = Bytes / sizeof(T);
  static LILY_INLINE type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static LILY_INLINE void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  // Horizontal sum by halving down to 16 bytes, then in lane order (fixed order, so deterministic).
  static LILY_INLINE T sum(type v) {
    typedef T quarter __attribute__((vector_size(16)));
    quarter q;
    if constexpr (Bytes == 64) {
      typedef T half __attribute__((vector_size(32)));
      half h0, h1;
      std::memcpy(&h0, &v, sizeof(h0));
      std::memcpy(&h1, reinterpret_cast<const char*>(&v) + sizeof(h0), sizeof(h1));
      h0 += h1;
      quarter q1;
      std::memcpy(&q, &h0, sizeof(q));
      std::memcpy(&q1, reinterpret_cast<const char*>(&h0) + sizeof(q), sizeof(q1));
      q += q1;
    } else if constexpr (Bytes == 32) {
      quarter q1;
      std::memcpy(&q, &v, sizeof(q));
      std::memcpy(&q1, reinterpret_cast<const char*>(&v) + sizeof(q), sizeof(q1));
      q += q1;
    } else {
      static_assert(Bytes == 16, "Simd: 16, 32 or 64 bytes");
      std::memcpy(&q, &v, sizeof(q));
    }
    T s = 0;
    for (size_t l = 0; l < sizeof(q) / sizeof(T); ++l) s += q[l];
    return s;
  }
};

template <typename T, int Bytes>
LILY_INLINE T dot(const T* x, const T* y, int64_t n) {
  using S = Simd<T, Bytes>;
  typename S::type acc = {};
  int64_t i = 0;
  for (; i + S::width <= n; i += S::width) acc += S::load(x + i) * S::load(y + i);
  T s = S::sum(acc);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

template <typename T>
LILY_INLINE void softmax_row(T* p, int64_t experts) {
  T top = -INFINITY;
  for (int64_t e = 0; e < experts; ++e) top = p[e] > top ? p[e] : top;
  T total = 0;
  for (int64_t e = 0; e < experts; ++e) {
    p[e] = std::exp(p[e] - top);
    total += p[e];
  }
  const T inv = T(1) / total;
  for (int64_t e = 0; e < experts; ++e) p[e] *= inv;
}

// Logits four rows at a time: four independent FMA chains hide the FMA latency
// a single dot product would wait on, and each router load feeds four rows.
template <typename T, int Bytes>
LILY_INLINE void router_softmax_impl(const T* hidden, int64_t rows, int64_t rank, const T* router, int64_t experts,
                                     T* probs) {
  using S = Simd<T, Bytes>;
  using V = typename S::type;
  constexpr int64_t W = S::width;
  const int64_t rv = rank - rank % W;
  int64_t n = 0;
  for (; n + 4 <= rows; n += 4) {
    const T* h0 = hidden + n * rank;
    const T* h1 = h0 + rank;
    const T* h2 = h1 + rank;
    const T* h3 = h2 + rank;
    for (int64_t e = 0; e < experts; ++e) {
      const T* re = router + e * rank;
      V a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t i = 0; i < rv; i += W) {
        const V w = S::load(re + i);
        a0 += S::load(h0 + i) * w;
        a1 += S::load(h1 + i) * w;
        a2 += S::load(h2 + i) * w;
        a3 += S::load(h3 + i) * w;
      }
      T s0 = S::sum(a0), s1 = S::sum(a1), s2 = S::sum(a2), s3 = S::sum(a3);
      for (int64_t i = rv; i < rank; ++i) {
        s0 += h0[i] * re[i];
        s1 += h1[i] * re[i];
        s2 += h2[i] * re[i];
        s3 += h3[i] * re[i];
      }
      probs[n * experts + e] = s0;
      probs[(n + 1) * experts + e] = s1;
      probs[(n + 2) * experts + e] = s2;
      probs[(n + 3) * experts + e] = s3;
    }
    for (int64_t m = n; m < n + 4; ++m) softmax_row(probs + m * experts, experts);
  }
  for (; n < rows; ++n) {
    T* p = probs + n * experts;
    for (int64_t e = 0; e < experts; ++e) p[e] = dot<T, Bytes>(router + e * rank, hidden + n * rank, rank);
    softmax_row(p, experts);
  }
}

// One pass per row: each vector of the row sums every expert's plane in expert order and is
// stored once. Keeping the sum in dst and adding one expert per pass over the row gave the
// same bits 1.6-2.1x slower (one thread, r = 128, out 512 / 1408, E = 4, planes from L3).
template <typename T, int Bytes>
LILY_INLINE void combine_bank_impl(const T* weights, const T* bank, int64_t experts, int64_t rank, int64_t out,
                                   int64_t i0, int64_t i1, int64_t c0, int64_t cols, T* dst, int64_t ld_dst) {
  using S = Simd<T, Bytes>;
  constexpr int64_t W = S::width;
  const int64_t plane = rank * out;
  for (int64_t i = i0; i < i1; ++i) {
    T* d = dst + (i - i0) * ld_dst;
    const T* src = bank + i * out + c0;
    // sum_e weights[e] * bank[e, i, c0 + j ...] for one vector, its loads by `load`
    auto combined = [&](auto load) {
      typename S::type c = weights[0] * load(src);
      for (int64_t e = 1; e < experts; ++e) c += weights[e] * load(src + e * plane);
      return c;
    };
    int64_t j = 0;
    for (; j + W <= cols; j += W) S::store(d + j, combined([&](const T* p) { return S::load(p + j); }));
    if (j < cols) {  // the last cols % W through the same vector code, so each lane's bits match
      const int64_t rest = cols - j;
      T lane[W];
      S::store(lane, combined([&](const T* p) {
                 T padded[W] = {};
                 std::copy_n(p + j, rest, padded);
                 return S::load(padded);
               }));
      std::copy_n(lane, rest, d + j);
    }
  }
}

// Register-tiled C = alpha * A @ B for one block of two vectors of columns:
// four rows share each B load (4 x 2 accumulators: 8 of the 16 AVX2 / SSE2
// registers at 32 / 16 bytes, 8 of 32 at 64 bytes with AVX-512). The B panel is
// first copied to a contiguous buffer: rows of B a power-of-two apart (out =
// 1024 floats is 4 KiB) would all land in the same L1 sets and evict each other.
template <typename T, int Bytes>
LILY_INLINE void gemm_small_block(int64_t M, int64_t K, T alpha, const T* A, int64_t a_row, int64_t a_col, const T* B,
                                  int64_t ldb, T* C, int64_t ldc) {
  using S = Simd<T, Bytes>;
  using V = typename S::type;
  constexpr int64_t W = S::width;
  thread_local std::vector<T> panel;
  if (ldb != 2 * W && M >= 8) {
    panel.resize(static_cast<size_t>(K * 2 * W));
    for (int64_t k = 0; k < K; ++k) std::memcpy(panel.data() + k * 2 * W, B + k * ldb, sizeof(T) * 2 * W);
    B = panel.data();
    ldb = 2 * W;
  }
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    const T* a0 = A + m * a_row;
    const T* a1 = a0 + a_row;
    const T* a2 = a1 + a_row;
    const T* a3 = a2 + a_row;
    V c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
    for (int64_t k = 0; k < K; ++k) {
      const V b0 = S::load(B + k * ldb);
      const V b1 = S::load(B + k * ldb + W);
      const int64_t ak = k * a_col;
      c00 += a0[ak] * b0;
      c01 += a0[ak] * b1;
      c10 += a1[ak] * b0;
      c11 += a1[ak] * b1;
      c20 += a2[ak] * b0;
      c21 += a2[ak] * b1;
      c30 += a3[ak] * b0;
      c31 += a3[ak] * b1;
    }
    T* c = C + m * ldc;
    S::store(c, alpha * c00);
    S::store(c + W, alpha * c01);
    S::store(c + ldc, alpha * c10);
    S::store(c + ldc + W, alpha * c11);
    S::store(c + 2 * ldc, alpha * c20);
    S::store(c + 2 * ldc + W, alpha * c21);
    S::store(c + 3 * ldc, alpha * c30);
    S::store(c + 3 * ldc + W, alpha * c31);
  }
  for (; m < M; ++m) {
    const T* a = A + m * a_row;
    V c0 = {}, c1 = {};
    for (int64_t k = 0; k < K; ++k) {
      c0 += a[k * a_col] * S::load(B + k * ldb);
      c1 += a[k * a_col] * S::load(B + k * ldb + W);
    }
    S::store(C + m * ldc, alpha * c0);
    S::store(C + m * ldc + W, alpha * c1);
  }
}

// C[M, cols] = alpha * A @ B: whole two-vector blocks, then the ragged rest.
template <typename T, int Bytes>
LILY_INLINE void gemm_small_impl(int64_t M, int64_t K, int64_t cols, T alpha, const T* A, int64_t a_row, int64_t a_col,
                                 const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t W = Simd<T, Bytes>::width;
  int64_t c0 = 0;
  for (; c0 + 2 * W <= cols; c0 += 2 * W)
    gemm_small_block<T, Bytes>(M, K, alpha, A, a_row, a_col, B + c0, ldb, C + c0, ldc);
  if (c0 == cols) return;
  B += c0;
  C += c0;
  cols -= c0;
  // Ragged last block: only `cols` columns of B may be read.
  T acc[2 * W];
  for (int64_t m = 0; m < M; ++m) {
    const T* a = A + m * a_row;
    for (int64_t j = 0; j < cols; ++j) acc[j] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < cols; ++j) acc[j] += a[k * a_col] * b[j];
    }
    for (int64_t j = 0; j < cols; ++j) C[m * ldc + j] = alpha * acc[j];
  }
}

// gemm_stream: rows of B per k-block. Within a block each column chunk's MR x NV
// accumulators stay in registers and C is read and written once. A block's rows are as
// many streams as it has rows, more than the hardware prefetcher follows, so the tile
// prefetches the next block: with 32-byte vectors at any row count, with 64-byte ones
// from 4 rows of A (below that they measured slower, from cache and from memory).
// 8 / 16 / 32 rows measured, 32 fastest with the prefetch (BENCHMARKS.md, "Decode-sized
// products").
constexpr int64_t kStreamBlockRows = 32;

// C[MR, NV vectors] over rows [k0, k1) of B: accumulators start from C (0 in the first
// block) and take alpha in the last, so each element is summed over k in order.
template <typename T, int Bytes, int MR, int NV>
LILY_INLINE void stream_tile(int64_t k0, int64_t k1, bool first, bool last, T alpha, const T* A, int64_t a_row,
                             int64_t a_col, const T* B, int64_t ldb, T* C, int64_t ldc) {
  using S = Simd<T, Bytes>;
  using V = typename S::type;
  constexpr int64_t W = S::width;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = first ? V{} : S::load(C + i * ldc + v * W);
  for (int64_t k = k0; k < k1; ++k) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      b[v] = S::load(B + k * ldb + v * W);
      if ((MR >= 4 || Bytes < 64) && v * Bytes % 64 == 0)  // one prefetch per 64-byte line
        __builtin_prefetch(B + (k + kStreamBlockRows) * ldb + v * W);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * a_row + k * a_col];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) S::store(C + i * ldc + v * W, last ? alpha * acc[i][v] : acc[i][v]);
}

// Vectors per chunk for MR rows: enough independent FMA chains to hide the FMA's
// latency at one or two rows, within the registers (32 at 64 bytes, 16 below).
constexpr int stream_vectors(int MR, int Bytes) {
  const int accumulators = Bytes == 64 ? 16 : 8;
  int nv = 1;
  while (nv < 8 && 2 * nv * MR <= accumulators) nv *= 2;
  return nv;
}

// MR rows of C, columns [0, cols), over rows [k0, k1) of B: chunks of NV vectors,
// what is left in chunks of NV / 2, ..., one vector, then single columns.
template <typename T, int Bytes, int MR, int NV>
LILY_INLINE void stream_rows(int64_t cols, int64_t k0, int64_t k1, bool first, bool last, T alpha, const T* A,
                             int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t W = Simd<T, Bytes>::width;
  int64_t j = 0;
  for (; j + NV * W <= cols; j += NV * W)
    stream_tile<T, Bytes, MR, NV>(k0, k1, first, last, alpha, A, a_row, a_col, B + j, ldb, C + j, ldc);
  if constexpr (NV > 1) {
    stream_rows<T, Bytes, MR, NV / 2>(cols - j, k0, k1, first, last, alpha, A, a_row, a_col, B + j, ldb, C + j, ldc);
  } else if (j < cols) {
    // Fewer than W columns: k outer, columns inner, as gemm_small's ragged block (the
    // compiler contracts the two loops alike, so the bits match).
    const int64_t rest = cols - j;
    T acc[W];
    for (int i = 0; i < MR; ++i) {
      for (int64_t c = 0; c < rest; ++c) acc[c] = first ? T(0) : C[i * ldc + j + c];
      for (int64_t k = k0; k < k1; ++k) {
        const T a = A[i * a_row + k * a_col];
        const T* b = B + k * ldb + j;
        for (int64_t c = 0; c < rest; ++c) acc[c] += a * b[c];
      }
      for (int64_t c = 0; c < rest; ++c) C[i * ldc + j + c] = last ? alpha * acc[c] : acc[c];
    }
  }
}

// C[M, cols] = alpha * A @ B with B read row by row, a block of rows at a time, each
// row from start to end: for one to a few rows of A, where gemm_small's column
// blocks would walk B down its columns (one 64-byte piece per row, a new page every
// row or two) and wait on memory. Each C element is summed over k in order, as
// gemm_small sums it (same bits).
template <typename T, int Bytes>
LILY_INLINE void gemm_stream_impl(int64_t M, int64_t K, int64_t cols, T alpha, const T* A, int64_t a_row, int64_t a_col,
                                  const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + cols, alpha * T(0));
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kStreamBlockRows) {
    const int64_t k1 = std::min(K, k0 + kStreamBlockRows);
    const bool first = k0 == 0, last = k1 == K;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const T* a = A + m0 * a_row;
      T* c = C + m0 * ldc;
#define LILY_STREAM_ROWS(R)                                                                                          \
  case R:                                                                                                            \
    stream_rows<T, Bytes, R, stream_vectors(R, Bytes)>(cols, k0, k1, first, last, alpha, a, a_row, a_col, B, ldb, c, \
                                                       ldc);                                                         \
    break;
      switch (std::min<int64_t>(8, M - m0)) {
        LILY_STREAM_ROWS(1)
        LILY_STREAM_ROWS(2)
        LILY_STREAM_ROWS(3)
        LILY_STREAM_ROWS(4)
        LILY_STREAM_ROWS(5)
        LILY_STREAM_ROWS(6)
        LILY_STREAM_ROWS(7)
        LILY_STREAM_ROWS(8)
      }
#undef LILY_STREAM_ROWS
    }
  }
}

// gemm_small_nt fetches rows of B this many rows ahead: at decode B is a layer's weight
// read from memory, its rows 2 KiB apart (in = 512), two to a page, and the hardware
// prefetcher stops at each page's end (decode at 8 rows on an AVX-512 host: 0.57 -> 0.43
// of PEFT's adapter cost).
constexpr int64_t kPrefetchRows = 4;

// gemm_small_nt for MR rows of A (and of C) against every row of B: tiles of MR rows of
// A x NB rows of B, so that each load of B feeds MR FMAs, each B row is read once for the
// MR rows, and MR x NB independent FMA chains hide the FMA's latency. Every C element is
// one dot product summed in one order: S::sum of the vector lanes, then the tail (the same
// as dot(), so the same bits whatever its tile).
template <typename T, int Bytes, int MR, int NB>
LILY_INLINE void small_nt_rows(int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                               int64_t ldc) {
  using S = Simd<T, Bytes>;
  using V = typename S::type;
  constexpr int64_t W = S::width;
  const int64_t kv = K - K % W;
  const T* a[MR];
  for (int i = 0; i < MR; ++i) a[i] = A + i * lda;
  int64_t n = 0;
  for (; n + NB <= N; n += NB) {
    const T* b[NB];
    for (int j = 0; j < NB; ++j) b[j] = B + (n + j) * ldb;
    V s[MR][NB] = {};
    for (int64_t k = 0; k < kv; k += W) {
      V y[MR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) y[i] = S::load(a[i] + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) __builtin_prefetch(b[j] + kPrefetchRows * ldb + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const V x = S::load(b[j] + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) s[i][j] += y[i] * x;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        T t = S::sum(s[i][j]);
        for (int64_t k = kv; k < K; ++k) t += a[i][k] * b[j][k];
        C[i * ldc + n + j] = alpha * t;
      }
  }
  for (; n < N; ++n)
    for (int i = 0; i < MR; ++i) C[i * ldc + n] = alpha * dot<T, Bytes>(a[i], B + n * ldb, K);
}

// C = alpha * A @ B^T as dot products: tiles of 8 rows of A (at 64 bytes: 32 registers)
// and 4 rows x 2 rows of B, then the last M % 4 rows (all of them at decode, M = 1)
// against 4 rows of B at a time. The A tile stays in L1 while every row of B streams past
// it once.
template <typename T, int Bytes>
LILY_INLINE void gemm_small_nt_impl(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                                    int64_t ldb, T* C, int64_t ldc) {
  int64_t m = 0;
  if constexpr (Bytes == 64)
    for (; m + 8 <= M; m += 8) small_nt_rows<T, Bytes, 8, 2>(N, K, alpha, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  for (; m + 4 <= M; m += 4) small_nt_rows<T, Bytes, 4, 2>(N, K, alpha, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  const T* a = A + m * lda;
  T* c = C + m * ldc;
  switch (M - m) {
    case 1:
      small_nt_rows<T, Bytes, 1, 4>(N, K, alpha, a, lda, B, ldb, c, ldc);
      break;
    case 2:
      small_nt_rows<T, Bytes, 2, 4>(N, K, alpha, a, lda, B, ldb, c, ldc);
      break;
    case 3:
      small_nt_rows<T, Bytes, 3, 4>(N, K, alpha, a, lda, B, ldb, c, ldc);
      break;
    default:
      break;
  }
}

// One streaming pass: each vector of dcomb is loaded once and every expert's plane advances
// with it (the dbank store, the dot product into a register per expert, the comb sum in
// expert order), so the pass runs at the memory's speed: walking a block of 1024 once per
// expert was 2.1-2.5x slower (one thread, r = 128, out 512 / 1408, E = 4, planes from L3).
// Experts go kGroup at a time (the accumulators' registers); comb is summed in expert order
// whatever the grouping. Accumulate is a template argument and the first expert is peeled,
// so each product has one use and contracts into an FMA as in the other kernels. The last
// (j1 - j0) % W positions are scalar: one body without the peel, its tail padded through it,
// gave the same bits 10-15 % slower at out = 1408.
template <typename T, int Bytes, bool Accumulate>
LILY_INLINE void bank_grad_pass(const T* weights, const T* dcomb, const T* bank, int64_t experts, int64_t plane,
                                int64_t j0, int64_t j1, T* dbank, T* dweights, T* comb) {
  using S = Simd<T, Bytes>;
  using V = typename S::type;
  constexpr int64_t W = S::width, kGroup = 8;
  const int64_t vec_end = j0 + (j1 - j0) / W * W;
  for (int64_t e0 = 0; e0 < experts; e0 += kGroup) {
    const int64_t group = std::min(kGroup, experts - e0);
    V acc[kGroup] = {};
    for (int64_t j = j0; j < vec_end; j += W) {
      const V g = S::load(dcomb + j);
      V c;
      int64_t k = 0;
      if (e0 == 0) {  // the first expert starts comb
        const V b = S::load(bank + j);
        S::store(dbank + j, Accumulate ? S::load(dbank + j) + weights[0] * g : weights[0] * g);
        acc[0] += b * g;
        c = weights[0] * b;
        k = 1;
      } else {
        c = S::load(comb + j);
      }
      for (; k < group; ++k) {
        const int64_t e = e0 + k;
        const V b = S::load(bank + e * plane + j);
        T* db = dbank + e * plane + j;
        S::store(db, Accumulate ? S::load(db) + weights[e] * g : weights[e] * g);
        acc[k] += b * g;
        c += weights[e] * b;
      }
      S::store(comb + j, c);
    }
    for (int64_t k = 0; k < group; ++k) dweights[e0 + k] = S::sum(acc[k]);
    for (int64_t j = vec_end; j < j1; ++j) {
      const T g = dcomb[j];
      for (int64_t e = e0; e < e0 + group; ++e) {
        const T b = bank[e * plane + j];
        T& db = dbank[e * plane + j];
        db = Accumulate ? db + weights[e] * g : weights[e] * g;
        dweights[e] += b * g;
        if (e == 0)
          comb[j] = weights[0] * b;
        else
          comb[j] += weights[e] * b;
      }
    }
  }
}

template <typename T, int Bytes>
LILY_INLINE void bank_grad_impl(const T* weights, const T* dcomb, const T* bank, int64_t experts, int64_t plane,
                                int64_t j0, int64_t j1, bool accumulate, T* dbank, T* dweights, T* comb) {
  if (accumulate)
    bank_grad_pass<T, Bytes, true>(weights, dcomb, bank, experts, plane, j0, j1, dbank, dweights, comb);
  else
    bank_grad_pass<T, Bytes, false>(weights, dcomb, bank, experts, plane, j0, j1, dbank, dweights, comb);
}

template <typename T>
LILY_INLINE void kron_rows_impl(const T* W, const T* hidden, int64_t rows, int64_t experts, int64_t rank, T* Z) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* h = hidden + n * rank;
    for (int64_t e = 0; e < experts; ++e) {
      const T w = W[n * experts + e];
      T* z = Z + (n * experts + e) * rank;
      for (int64_t i = 0; i < rank; ++i) z[i] = w * h[i];
    }
  }
}

template <typename T, int Bytes>
LILY_INLINE void kron_rows_backward_impl(const T* W, const T* hidden, const T* dZ, int64_t rows, int64_t experts,
                                         int64_t rank, T* dW, T* dhidden) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* h = hidden + n * rank;
    T* dh = dhidden + n * rank;
    for (int64_t i = 0; i < rank; ++i) dh[i] = 0;
    for (int64_t e = 0; e < experts; ++e) {
      const T* dz = dZ + (n * experts + e) * rank;
      const T w = W[n * experts + e];
      dW[n * experts + e] = dot<T, Bytes>(dz, h, rank);
      for (int64_t i = 0; i < rank; ++i) dh[i] += w * dz[i];
    }
  }
}

template <typename T>
LILY_INLINE void router_backward_impl(const T* hidden, const T* probs, const T* dprobs, int64_t rows, int64_t rank,
                                      const T* router, int64_t experts, T* dhidden, T* drouter) {
  for (int64_t n = 0; n < rows; ++n) {
    const T* p = probs + n * experts;
    const T* dp = dprobs + n * experts;
    const T* h = hidden + n * rank;
    T* dh = dhidden + n * rank;
    T inner = 0;
    for (int64_t e = 0; e < experts; ++e) inner += p[e] * dp[e];
    for (int64_t e = 0; e < experts; ++e) {
      const T dlogit = p[e] * (dp[e] - inner);
      const T* re = router + e * rank;
      T* dre = drouter + e * rank;
      for (int64_t i = 0; i < rank; ++i) {
        dh[i] += dlogit * re[i];
        dre[i] += dlogit * h[i];
      }
    }
  }
}

}  // namespace

// Loops over Simd<T, Bytes> keep their vectors in registers only at the host's
// width (32 x 64-byte registers with AVX-512, 16 x 32-byte with AVX2, 16 x
// 16-byte with SSE2): 64-byte vectors on an AVX2 host spill the accumulators
// (gemm_small measured 20x slower, the router softmax and the bank gradient
// pass 3x). target_clones cannot vary the width per clone, so each x86-64 level
// gets its own instantiation: target("...") overloads, as in cpu_gemm.cpp.
// LILY_PER_LEVEL(name, impl, T, params, args) defines `void name params`
// calling impl<T, Bytes> args. LILY_GEMM_NO_AVX512 (tests only, as in cpu_gemm.cpp)
// drops the 64-byte level so that an AVX-512 host checks the 32-byte kernels.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) && \
    !defined(LILY_NO_MULTIVERSION)
#ifndef LILY_GEMM_NO_AVX512
#define LILY_PER_LEVEL_V4(name, impl, T, params, args) \
  __attribute__((target("arch=x86-64-v4"))) void name params { impl<T, 64> args; }
#else
#define LILY_PER_LEVEL_V4(name, impl, T, params, args)
#endif
#define LILY_PER_LEVEL(name, impl, T, params, args)                                \
  LILY_PER_LEVEL_V4(name, impl, T, params, args)                                   \
  __attribute__((target("arch=x86-64-v3"))) void name params { impl<T, 32> args; } \
  __attribute__((target("default"))) void name params { impl<T, 16> args; }
#else
#define LILY_PER_LEVEL(name, impl, T, params, args) \
  void name params { impl<T, 16> args; }
#endif

#define LILY_SMALL_PARAMS(T)                                                                                       \
  (int64_t M, int64_t K, int64_t cols, T alpha, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, \
   T* C, int64_t ldc)
#define LILY_SMALL_ARGS (M, K, cols, alpha, A, a_row, a_col, B, ldb, C, ldc)
#define LILY_SMALL_NT_PARAMS(T) \
  (int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc)
#define LILY_SMALL_NT_ARGS (M, N, K, alpha, A, lda, B, ldb, C, ldc)
#define LILY_ROUTER_PARAMS(T) (const T* hidden, int64_t rows, int64_t rank, const T* router, int64_t experts, T* probs)
#define LILY_ROUTER_ARGS (hidden, rows, rank, router, experts, probs)
#define LILY_BANK_GRAD_PARAMS(T)                                                                            \
  (const T* weights, const T* dcomb, const T* bank, int64_t experts, int64_t plane, int64_t j0, int64_t j1, \
   bool accumulate, T* dbank, T* dweights, T* comb)
#define LILY_BANK_GRAD_ARGS (weights, dcomb, bank, experts, plane, j0, j1, accumulate, dbank, dweights, comb)
#define LILY_COMBINE_PARAMS(T)                                                                                      \
  (const T* weights, const T* bank, int64_t experts, int64_t rank, int64_t out, int64_t i0, int64_t i1, int64_t c0, \
   int64_t cols, T* dst, int64_t ld_dst)
#define LILY_COMBINE_ARGS (weights, bank, experts, rank, out, i0, i1, c0, cols, dst, ld_dst)
#define LILY_KRON_BACKWARD_PARAMS(T) \
  (const T* W, const T* hidden, const T* dZ, int64_t rows, int64_t experts, int64_t rank, T* dW, T* dhidden)
#define LILY_KRON_BACKWARD_ARGS (W, hidden, dZ, rows, experts, rank, dW, dhidden)

#define LILY_DEFINE_LEVEL_KERNELS(T)                                                                  \
  LILY_PER_LEVEL(small_kernel, gemm_small_impl, T, LILY_SMALL_PARAMS(T), LILY_SMALL_ARGS)             \
  LILY_PER_LEVEL(stream_kernel, gemm_stream_impl, T, LILY_SMALL_PARAMS(T), LILY_SMALL_ARGS)           \
  LILY_PER_LEVEL(small_nt_kernel, gemm_small_nt_impl, T, LILY_SMALL_NT_PARAMS(T), LILY_SMALL_NT_ARGS) \
  LILY_PER_LEVEL(router_kernel, router_softmax_impl, T, LILY_ROUTER_PARAMS(T), LILY_ROUTER_ARGS)      \
  LILY_PER_LEVEL(bank_grad_kernel, bank_grad_impl, T, LILY_BANK_GRAD_PARAMS(T), LILY_BANK_GRAD_ARGS)  \
  LILY_PER_LEVEL(combine_kernel, combine_bank_impl, T, LILY_COMBINE_PARAMS(T), LILY_COMBINE_ARGS)     \
  LILY_PER_LEVEL(kron_backward_kernel, kron_rows_backward_impl, T, LILY_KRON_BACKWARD_PARAMS(T),      \
                 LILY_KRON_BACKWARD_ARGS)

namespace {
LILY_DEFINE_LEVEL_KERNELS(float)
LILY_DEFINE_LEVEL_KERNELS(double)
}  // namespace

#define LILY_DEFINE_PRIMITIVES(T)                                                                                      \
  void router_softmax(const T* hidden, int64_t rows, int64_t rank, const T* router, int64_t experts, T* probs) {       \
    router_kernel(hidden, rows, rank, router, experts, probs);                                                         \
  }                                                                                                                    \
  void combine_bank(const T* weights, const T* bank, int64_t experts, int64_t rank, int64_t out, int64_t i0,           \
                    int64_t i1, int64_t c0, int64_t cols, T* dst, int64_t ld_dst) {                                    \
    combine_kernel(weights, bank, experts, rank, out, i0, i1, c0, cols, dst, ld_dst);                                  \
  }                                                                                                                    \
  void gemm_small(int64_t M, int64_t K, int64_t cols, T alpha, const T* A, int64_t a_row, int64_t a_col, const T* B,   \
                  int64_t ldb, T* C, int64_t ldc) {                                                                    \
    small_kernel(M, K, cols, alpha, A, a_row, a_col, B, ldb, C, ldc);                                                  \
  }                                                                                                                    \
  void gemm_stream(int64_t M, int64_t K, int64_t cols, T alpha, const T* A, int64_t a_row, int64_t a_col, const T* B,  \
                   int64_t ldb, T* C, int64_t ldc) {                                                                   \
    stream_kernel(M, K, cols, alpha, A, a_row, a_col, B, ldb, C, ldc);                                                 \
  }                                                                                                                    \
  void gemm_small_nt(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, \
                     int64_t ldc) {                                                                                    \
    small_nt_kernel(M, N, K, alpha, A, lda, B, ldb, C, ldc);                                                           \
  }                                                                                                                    \
  void bank_grad(const T* weights, const T* dcomb, const T* bank, int64_t experts, int64_t plane, int64_t j0,          \
                 int64_t j1, bool accumulate, T* dbank, T* dweights, T* comb) {                                        \
    bank_grad_kernel(weights, dcomb, bank, experts, plane, j0, j1, accumulate, dbank, dweights, comb);                 \
  }                                                                                                                    \
  LILY_MULTIVERSION void kron_rows(const T* W, const T* hidden, int64_t rows, int64_t experts, int64_t rank, T* Z) {   \
    kron_rows_impl(W, hidden, rows, experts, rank, Z);                                                                 \
  }                                                                                                                    \
  void kron_rows_backward(const T* W, const T* hidden, const T* dZ, int64_t rows, int64_t experts, int64_t rank,       \
                          T* dW, T* dhidden) {                                                                         \
    kron_backward_kernel(W, hidden, dZ, rows, experts, rank, dW, dhidden);                                             \
  }                                                                                                                    \
  LILY_MULTIVERSION void router_backward(const T* hidden, const T* probs, const T* dprobs, int64_t rows, int64_t rank, \
                                         const T* router, int64_t experts, T* dhidden, T* drouter) {                   \
    router_backward_impl(hidden, probs, dprobs, rows, rank, router, experts, dhidden, drouter);                        \
  }

LILY_DEFINE_PRIMITIVES(float)
LILY_DEFINE_PRIMITIVES(double)

}  // namespace cpu
}  // namespace lily
