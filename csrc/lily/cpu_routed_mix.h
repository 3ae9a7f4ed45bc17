// routed_mix forward and backward on the CPU, framework-free. The caller (the
// torch or ORT binding) supplies a Backend with
//
//   template <class F> void parallel_for(int64_t n, const F& f) const;
//       runs f(begin, end) over disjoint pieces of [0, n), possibly in parallel
//   void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
//             const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) const;
//       row-major C[M, N] = alpha * op(A) @ op(B) + beta * C (beta == 0: C is not read)
//   void gemm_batched(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K,
//                     T alpha, const T* A, int64_t lda, int64_t stride_a, const T* B, int64_t ldb,
//                     int64_t stride_b, T* C, int64_t ldc, int64_t stride_c) const;
//       the same with beta = 0 for `batch` problems, matrix i at A + i * stride_a etc.
//
// so the large GEMMs go to the host framework's BLAS. Everything around them
// (routing, bank contraction, small-N products, the softmax backward) is done
// here in fused passes. Work is split into pieces whose size depends only on
// the problem, and partial sums are added in a fixed order: the result does not
// depend on the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "contract.h"
#include "cpu_primitives.h"

namespace lily {
namespace cpu {

// Up to this many rows per group, the combined bank is formed one column block
// at a time right before it is used (it never leaves the cache), and the small
// product is done by gemm_small instead of the BLAS.
constexpr int64_t kSmallRows = 64;
constexpr int64_t kSmallRowsNT = 16;
// Columns of the combined bank formed per task on that path.
constexpr int64_t kWideCols = 256;
// Rows per piece of the row-wise passes, and per piece of the (W kron h) matrix.
constexpr int64_t kRowPiece = 256;
constexpr int64_t kKronRows = 2048;
// Elements of a bank plane per piece of the bank-gradient pass.
constexpr int64_t kPlanePiece = 16384;
// Combined banks of sequence samples formed at once for a batched GEMM.
constexpr int64_t kBatchedPlanesBytes = int64_t(16) << 20;

// Up to this many rows per group, the backward goes through the per-row
// (W kron h) form: E times the GEMM work, but no pass over the bank per group.
constexpr int64_t kPerRowBackwardRows = 4;

// Up to kStreamRows rows of A, NN / TN products read B row by row (gemm_stream) rather
// than down its columns (gemm_small). In a model B is a layer's weight (decode's bank),
// read from the L3 cache or memory: one thread, AVX2, 1.2-2.2x faster at 1-8 rows from
// memory, 2.5x at 8 rows in ONNX Runtime with 64 layers' banks in L3; gemm_small's
// register tiles win only when the same B is reused while still in L2 (a loop over one
// layer), and from 16 rows. Pieces of at most kStreamCols columns, so that two threads
// get even shares of out = 1408 (six pieces, not three).
constexpr int64_t kStreamRows = 8;
constexpr int64_t kStreamCols = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch that is fully written before it is read: no zero-fill.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// C[M, N] = alpha * op(A) @ op(B) + beta * C, row-major. Shapes where the
// gemm_small kernels beat the BLAS (measured against MKL, 1 thread, r = 128,
// out = 1024): NN with M <= 64 and TN with K <= 64 (L1-friendly packed panels,
// no BLAS call overhead); NT only for M <= 16 (row dot products; MKL wins above).
template <typename T, typename Backend>
void matmul(const Backend& be, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
            int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const bool small =
      beta == T(0) && !(trans_a && trans_b) && (trans_b ? M <= kSmallRowsNT : (trans_a ? K : M) <= kSmallRows);
  if (!small) {
    be.gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else if (!trans_b && M <= kStreamRows) {
    if (N == 0) return;
    // Two pieces at least where there is work for a second thread; every C element is
    // summed in the same order whatever the pieces.
    const int64_t pieces = std::max(ceil_div(N, kStreamCols), std::min<int64_t>(2, N / 128));
    const int64_t width = ceil_div(ceil_div(N, pieces), 16) * 16;
    const int64_t a_row = trans_a ? 1 : lda, a_col = trans_a ? lda : 1;
    be.parallel_for(ceil_div(N, width), [&](int64_t p0, int64_t p1) {
      const int64_t c0 = p0 * width, c1 = std::min(N, p1 * width);
      gemm_stream(M, K, c1 - c0, alpha, A, a_row, a_col, B + c0, ldb, C + c0, ldc);
    });
  } else if (trans_b) {
    constexpr int64_t kRowsOfB = 16;
    be.parallel_for(ceil_div(N, kRowsOfB), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kRowsOfB;
        gemm_small_nt(M, std::min(kRowsOfB, N - n0), K, alpha, A, lda, B + n0 * ldb, ldb, C + n0, ldc);
      }
    });
  } else {
    constexpr int64_t CB = kColBlock<T>, kRowsOfC = 128;
    const int64_t a_row = trans_a ? 1 : lda, a_col = trans_a ? lda : 1;
    const int64_t col_tasks = ceil_div(N, CB);
    be.parallel_for(ceil_div(M, kRowsOfC) * col_tasks, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = (t / col_tasks) * kRowsOfC, c0 = (t % col_tasks) * CB;
        gemm_small(std::min(kRowsOfC, M - m0), K, std::min(CB, N - c0), alpha, A + m0 * a_row, a_row, a_col, B + c0,
                   ldb, C + m0 * ldc + c0, ldc);
      }
    });
  }
}

template <typename T>
struct Routing {
  std::vector<T> probs;      // [N, E] router softmax per row (not for static)
  std::vector<T> weights;    // [groups, E] mixing weights of each group; causal: [N, E], one per row
  std::vector<T> inv_count;  // sequence: 1 / valid rows per group; causal: 1 / valid rows up to each row; 0 if none
};

template <typename T, typename Backend>
Routing<T> compute_routing(const Backend& be, const MixShape& s, const T* hidden, const T* router,
                           const uint8_t* mask) {
  const int64_t N = s.rows, E = s.experts, r = s.rank;
  Routing<T> rt;
  rt.weights.assign((s.mode == Mode::kCausal ? N : s.groups) * E, T(0));
  if (s.mode == Mode::kStatic) {
    const T one = 1;  // softmax(theta) == router_softmax of a 1-wide "hidden" of ones
    router_softmax(&one, 1, 1, router, E, rt.weights.data());
    return rt;
  }
  rt.probs.resize(N * E);
  T* P = rt.probs.data();
  be.parallel_for(ceil_div(N, kRowPiece), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowPiece, n1 = std::min(N, n0 + kRowPiece);
      router_softmax(hidden + n0 * r, n1 - n0, r, router, E, P + n0 * E);
    }
  });
  if (s.mode == Mode::kToken) {
    rt.weights = rt.probs;
  } else if (s.mode == Mode::kBatch) {
    std::vector<double> total(E, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t e = 0; e < E; ++e) total[e] += P[n * E + e];
    for (int64_t e = 0; e < E; ++e) rt.weights[e] = T(total[e] / double(N));
  } else if (s.mode == Mode::kCausal) {
    // w_t = (sum_{u <= t} m_u P_u) / (sum_{u <= t} m_u): a running mean per sample, summed in
    // float64 in row order; rows before the sample's first unmasked one keep w = 0.
    const int64_t L = s.group_rows;
    rt.inv_count.assign(N, T(0));
    be.parallel_for(s.groups, [&](int64_t g0, int64_t g1) {
      std::vector<double> total(E);
      for (int64_t g = g0; g < g1; ++g) {
        std::fill(total.begin(), total.end(), 0.0);
        int64_t count = 0;
        for (int64_t n = g * L; n < (g + 1) * L; ++n) {
          if (!mask || mask[n]) {
            ++count;
            for (int64_t e = 0; e < E; ++e) total[e] += P[n * E + e];
          }
          if (count == 0) continue;
          for (int64_t e = 0; e < E; ++e) rt.weights[n * E + e] = T(total[e] / double(count));
          rt.inv_count[n] = T(1.0 / double(count));
        }
      }
    });
  } else {  // sequence
    const int64_t L = s.group_rows;
    rt.inv_count.assign(s.groups, T(0));
    be.parallel_for(s.groups, [&](int64_t g0, int64_t g1) {
      std::vector<double> total(E);
      for (int64_t g = g0; g < g1; ++g) {
        std::fill(total.begin(), total.end(), 0.0);
        int64_t count = 0;
        for (int64_t n = g * L; n < (g + 1) * L; ++n) {
          if (mask && !mask[n]) continue;
          ++count;
          for (int64_t e = 0; e < E; ++e) total[e] += P[n * E + e];
        }
        if (count == 0) continue;  // a fully masked sample mixes nothing: zero delta
        for (int64_t e = 0; e < E; ++e) rt.weights[g * E + e] = T(total[e] / double(count));
        rt.inv_count[g] = T(1.0 / double(count));
      }
    });
  }
  return rt;
}

template <typename T>
int64_t groups_per_batch(const MixShape& s) {
  const int64_t bytes = s.rank * s.out * int64_t(sizeof(T));
  return std::max<int64_t>(1, std::min(s.groups, kBatchedPlanesBytes / bytes));
}

// delta[g rows] = scaling * hidden[g rows] @ (sum_e W[g, e] bank[e]) for each group.
template <typename T, typename Backend>
void mix_grouped(const Backend& be, const MixShape& s, T scaling, const T* hidden, const T* bank, const T* W, T* delta,
                 T beta = T(0)) {
  const int64_t E = s.experts, r = s.rank, out = s.out, L = s.group_rows;
  if (L <= kSmallRows) {
    // Wide column blocks keep the bank reads long and contiguous; gemm_small
    // then walks the block kColBlock columns at a time.
    constexpr int64_t CB = kColBlock<T>;
    const int64_t blocks = ceil_div(out, kWideCols);
    be.parallel_for(s.groups * blocks, [&](int64_t t0, int64_t t1) {
      auto comb = scratch<T>(r * kWideCols);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / blocks, c0 = (t % blocks) * kWideCols;
        const int64_t width = std::min(kWideCols, out - c0);
        combine_bank(W + g * E, bank, E, r, out, 0, r, c0, width, comb.get(), kWideCols);
        for (int64_t c = 0; c < width; c += CB)
          gemm_small(L, r, std::min(CB, width - c), scaling, hidden + g * L * r, r, 1, comb.get() + c, kWideCols,
                     delta + g * L * out + c0 + c, out);
      }
    });
    return;
  }
  // Many rows per group: combined banks for a batch of groups, then one batched BLAS call.
  const int64_t plane = r * out, batch = groups_per_batch<T>(s);
  auto comb = scratch<T>(batch * plane);
  for (int64_t g0 = 0; g0 < s.groups; g0 += batch) {
    const int64_t count = std::min(batch, s.groups - g0);
    be.parallel_for(count * r, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / r, i = t % r;
        combine_bank(W + (g0 + g) * E, bank, E, r, out, i, i + 1, 0, out, comb.get() + g * plane + i * out, out);
      }
    });
    if (count == 1)
      be.gemm(false, false, L, out, r, scaling, hidden + g0 * L * r, r, comb.get(), out, beta, delta + g0 * L * out,
              out);
    else
      be.gemm_batched(false, false, count, L, out, r, scaling, hidden + g0 * L * r, r, L * r, comb.get(), out, plane,
                      delta + g0 * L * out, out, L * out);
  }
}

// delta[n] = scaling * (W[n] kron hidden[n]) @ bank_flat, rows in pieces so the
// [rows, E * r] operand stays bounded.
template <typename T, typename Backend>
void mix_per_row(const Backend& be, const MixShape& s, T scaling, const T* hidden, const T* bank, const T* W, T* delta,
                 T beta = T(0)) {
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out, K = E * r;
  auto Z = scratch<T>(std::min(N, kKronRows) * K);
  for (int64_t n0 = 0; n0 < N; n0 += kKronRows) {
    const int64_t rows = std::min(kKronRows, N - n0);
    be.parallel_for(ceil_div(rows, kRowPiece), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kRowPiece, m1 = std::min(rows, m0 + kRowPiece);
        kron_rows(W + (n0 + m0) * E, hidden + (n0 + m0) * r, m1 - m0, E, r, Z.get() + m0 * K);
      }
    });
    matmul(be, false, false, rows, out, K, scaling, Z.get(), K, bank, out, beta, delta + n0 * out, out);
  }
}

// delta = routed_mix(...), or with beta = 1 delta += routed_mix(...): only where the
// mix ends in one BLAS call (mix_accumulates_in_place); callers add a scratch result otherwise.
template <typename T, typename Backend>
void routed_mix_forward(const Backend& be, const MixShape& s, T scaling, const T* hidden, const T* router,
                        const T* bank, const uint8_t* mask, T* delta, T beta = T(0)) {
  if (s.rows == 0) return;
  const Routing<T> rt = compute_routing<T>(be, s, hidden, router, mask);
  if (mixes_per_row(s))
    mix_per_row(be, s, scaling, hidden, bank, rt.weights.data(), delta, beta);
  else
    mix_grouped(be, s, scaling, hidden, bank, rt.weights.data(), delta, beta);
}

// Whether routed_mix_forward can add into `delta` (beta = 1) with the BLAS: the per-row
// product beyond the small-N kernels, or one group of many rows. Elsewhere the small-N
// kernels (which overwrite their output) or batched GEMMs do the mix.
inline bool mix_accumulates_in_place(const MixShape& s) {
  return mixes_per_row(s) ? s.rows > kSmallRows : (s.groups == 1 && s.group_rows > kSmallRows);
}

// Backward of mix_grouped: writes dhidden (mixing part), dbank and dW [groups, E].
// Groups of up to kSmallRows rows use the gemm_small kernels one group at a
// time; larger groups go to the BLAS in batches.
template <typename T, typename Backend>
void mix_grouped_backward(const Backend& be, const MixShape& s, T scaling, const T* grad, const T* hidden,
                          const T* bank, const T* W, T* dhidden, T* dbank, T* dW) {
  const int64_t E = s.experts, r = s.rank, out = s.out, L = s.group_rows, plane = r * out;
  const int64_t pieces = ceil_div(plane, kPlanePiece);
  const int64_t batch = L <= kSmallRows ? 1 : groups_per_batch<T>(s);
  auto dcomb = scratch<T>(batch * plane), comb = scratch<T>(batch * plane), partial = scratch<T>(pieces * E);
  for (int64_t g0 = 0; g0 < s.groups; g0 += batch) {
    const int64_t count = std::min(batch, s.groups - g0);
    const T* h = hidden + g0 * L * r;
    const T* G = grad + g0 * L * out;
    // dBc_g = s h_g^T G_g
    if (count == 1)
      matmul(be, true, false, r, out, L, scaling, h, r, G, out, T(0), dcomb.get(), out);
    else
      be.gemm_batched(true, false, count, r, out, L, scaling, h, r, L * r, G, out, L * out, dcomb.get(), out, plane);
    for (int64_t c = 0; c < count; ++c) {
      const int64_t g = g0 + c;
      // one pass over the bank: dBk += w_g (x) dBc_g, dw_g = <Bk_e, dBc_g>, Bc_g = sum_e w_ge Bk_e
      be.parallel_for(pieces, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t j0 = p * kPlanePiece, j1 = std::min(plane, j0 + kPlanePiece);
          bank_grad(W + g * E, dcomb.get() + c * plane, bank, E, plane, j0, j1, g > 0, dbank, partial.get() + p * E,
                    comb.get() + c * plane);
        }
      });
      for (int64_t e = 0; e < E; ++e) {
        T total = 0;
        for (int64_t p = 0; p < pieces; ++p) total += partial[p * E + e];
        dW[g * E + e] = total;
      }
    }
    // dh_g = s G_g Bc_g^T
    if (count == 1)
      matmul(be, false, true, L, r, out, scaling, G, out, comb.get(), out, T(0), dhidden + g0 * L * r, r);
    else
      be.gemm_batched(false, true, count, L, r, out, scaling, G, out, L * out, comb.get(), out, plane,
                      dhidden + g0 * L * r, r, L * r);
  }
}

// Backward of mix_per_row, W given per row: with Z = W kron h,
// dBk_flat = s Z^T G and dZ = s G Bk_flat^T; writes dhidden, dbank, dW [N, E].
template <typename T, typename Backend>
void mix_per_row_backward(const Backend& be, const MixShape& s, T scaling, const T* grad, const T* hidden,
                          const T* bank, const T* W, T* dhidden, T* dbank, T* dW) {
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out, K = E * r;
  const int64_t chunk = std::min(N, kKronRows);
  auto Z = scratch<T>(chunk * K), dZ = scratch<T>(chunk * K);
  for (int64_t n0 = 0; n0 < N; n0 += kKronRows) {
    const int64_t rows = std::min(kKronRows, N - n0);
    const int64_t pieces = ceil_div(rows, kRowPiece);
    be.parallel_for(pieces, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kRowPiece, m1 = std::min(rows, m0 + kRowPiece);
        kron_rows(W + (n0 + m0) * E, hidden + (n0 + m0) * r, m1 - m0, E, r, Z.get() + m0 * K);
      }
    });
    const T* G = grad + n0 * out;
    matmul(be, true, false, K, out, rows, scaling, Z.get(), K, G, out, T(n0 > 0 ? 1 : 0), dbank, out);
    matmul(be, false, true, rows, K, out, scaling, G, out, bank, out, T(0), dZ.get(), K);
    be.parallel_for(pieces, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kRowPiece, m1 = std::min(rows, m0 + kRowPiece), n = n0 + m0;
        kron_rows_backward(W + n * E, hidden + n * r, dZ.get() + m0 * K, m1 - m0, E, r, dW + n * E, dhidden + n * r);
      }
    });
  }
}

template <typename T, typename Backend>
void routed_mix_backward(const Backend& be, const MixShape& s, T scaling, const T* grad, const T* hidden,
                         const T* router, const T* bank, const uint8_t* mask, T* dhidden, T* drouter, T* dbank) {
  const int64_t N = s.rows, E = s.experts, r = s.rank, L = s.group_rows;
  const int64_t router_size = s.mode == Mode::kStatic ? E : E * r;
  if (N == 0) {
    std::fill(drouter, drouter + router_size, T(0));
    std::fill(dbank, dbank + E * r * s.out, T(0));
    return;
  }
  const Routing<T> rt = compute_routing<T>(be, s, hidden, router, mask);
  // dW: gradient of the mixing weights, one row per group (token, causal: per row).
  const bool per_row_weights = s.mode == Mode::kToken || s.mode == Mode::kCausal;
  std::vector<T> dW((per_row_weights ? N : s.groups) * E);
  if (per_row_weights) {
    mix_per_row_backward(be, s, scaling, grad, hidden, bank, rt.weights.data(), dhidden, dbank, dW.data());
  } else if (L <= kPerRowBackwardRows) {
    std::vector<T> row_W(N * E), row_dW(N * E);
    const T* W = rt.weights.data();
    for (int64_t n = 0; n < N; ++n) std::copy_n(W + (n / L) * E, E, row_W.data() + n * E);  // the group's weights
    mix_per_row_backward(be, s, scaling, grad, hidden, bank, row_W.data(), dhidden, dbank, row_dW.data());
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t n = g * L; n < (g + 1) * L; ++n)
        for (int64_t e = 0; e < E; ++e) dW[g * E + e] += row_dW[n * E + e];
  } else {
    mix_grouped_backward(be, s, scaling, grad, hidden, bank, rt.weights.data(), dhidden, dbank, dW.data());
  }

  if (s.mode == Mode::kStatic) {  // dtheta = w * (dw - <w, dw>)
    const T* w = rt.weights.data();
    T inner = 0;
    for (int64_t e = 0; e < E; ++e) inner += w[e] * dW[e];
    for (int64_t e = 0; e < E; ++e) drouter[e] = w[e] * (dW[e] - inner);
    return;
  }
  // Gradient reaching each row's router probabilities.
  auto dP = scratch<T>(N * E);
  if (s.mode == Mode::kCausal) {
    // dC_t = dw_t / n_t; dP_u = m_u sum_{t >= u} dC_t: a reverse running sum per sample (float64, row order).
    be.parallel_for(s.groups, [&](int64_t g0, int64_t g1) {
      std::vector<double> suffix(E);
      for (int64_t g = g0; g < g1; ++g) {
        std::fill(suffix.begin(), suffix.end(), 0.0);
        for (int64_t n = (g + 1) * L - 1; n >= g * L; --n) {
          const double inv = double(rt.inv_count[n]);
          for (int64_t e = 0; e < E; ++e) suffix[e] += double(dW[n * E + e]) * inv;
          const bool keep = !mask || mask[n];
          for (int64_t e = 0; e < E; ++e) dP[n * E + e] = keep ? T(suffix[e]) : T(0);
        }
      }
    });
  } else {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t g = n / L;
      for (int64_t e = 0; e < E; ++e) {
        T v;
        if (s.mode == Mode::kBatch) {
          v = dW[e] / T(N);
        } else if (s.mode == Mode::kToken) {
          v = dW[n * E + e];
        } else {
          v = (mask && !mask[n]) ? T(0) : dW[g * E + e] * rt.inv_count[g];
        }
        dP[n * E + e] = v;
      }
    }
  }
  // Softmax backward; per-piece router gradients are added in piece order.
  const int64_t piece = std::max(kRowPiece, ceil_div(N, 256));
  const int64_t pieces = ceil_div(N, piece);
  std::vector<T> partial(pieces * E * r, T(0));
  be.parallel_for(pieces, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * piece, n1 = std::min(N, n0 + piece);
      router_backward(hidden + n0 * r, rt.probs.data() + n0 * E, dP.get() + n0 * E, n1 - n0, r, router, E,
                      dhidden + n0 * r, partial.data() + b * E * r);
    }
  });
  std::copy(partial.begin(), partial.begin() + E * r, drouter);
  for (int64_t b = 1; b < pieces; ++b)
    for (int64_t j = 0; j < E * r; ++j) drouter[j] += partial[b * E * r + j];
}

}  // namespace cpu
}  // namespace lily
