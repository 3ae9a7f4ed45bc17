// routed_mix forward and backward on the CPU, framework-free. The caller (the
// torch or ORT binding) supplies a Backend with
//
//   template <class F> void parallel_for(int64_t n, const F& f) const;
//       runs f(begin, end) over disjoint pieces of [0, n), possibly in parallel
//   void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
//             const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) const;
//       row-major C[M, N] = alpha * op(A) @ op(B) + beta * C (beta == 0: C is not read)
//
// so the large GEMMs go to the host framework's BLAS. Everything around them
// (routing, bank contraction, small-N products, the softmax backward) is done
// here in fused passes. Work is split into pieces whose size depends only on
// the problem, and partial sums are added in a fixed order: the result does not
// depend on the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "contract.h"
#include "cpu_primitives.h"

namespace lily {
namespace cpu {

// Up to this many rows per group, the combined bank is formed one column block
// at a time right before it is used (it never leaves the cache), and the small
// product is done by gemm_small instead of the BLAS.
constexpr int64_t kSmallRows = 64;
// Rows per piece of the row-wise passes, and per piece of the (W kron h) matrix.
constexpr int64_t kRowPiece = 256;
constexpr int64_t kKronRows = 2048;
// Elements of a bank plane per piece of the bank-gradient pass.
constexpr int64_t kPlanePiece = 16384;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct Routing {
  std::vector<T> probs;      // [N, E] router softmax per row (not for static)
  std::vector<T> weights;    // [groups, E] mixing weights of each group
  std::vector<T> inv_count;  // sequence: 1 / valid rows per group, 0 when fully masked
};

template <typename T, typename Backend>
Routing<T> compute_routing(const Backend& be, const MixShape& s, const T* hidden, const T* router,
                           const uint8_t* mask) {
  const int64_t N = s.rows, E = s.experts, r = s.rank;
  Routing<T> rt;
  rt.weights.assign(s.groups * E, T(0));
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

// delta[g rows] = scaling * hidden[g rows] @ (sum_e W[g, e] bank[e]) for each group.
template <typename T, typename Backend>
void mix_grouped(const Backend& be, const MixShape& s, T scaling, const T* hidden, const T* bank,
                 const T* W, T* delta) {
  const int64_t E = s.experts, r = s.rank, out = s.out, L = s.group_rows;
  if (L <= kSmallRows) {
    constexpr int64_t CB = kColBlock<T>;
    const int64_t blocks = ceil_div(out, CB);
    be.parallel_for(s.groups * blocks, [&](int64_t t0, int64_t t1) {
      std::vector<T> comb(r * CB);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / blocks, c0 = (t % blocks) * CB, cols = std::min(CB, out - c0);
        combine_bank(W + g * E, bank, E, r, out, 0, r, c0, cols, comb.data(), CB);
        gemm_small(L, r, cols, scaling, hidden + g * L * r, r, comb.data(), CB,
                   delta + g * L * out + c0, out);
      }
    });
    return;
  }
  std::vector<T> comb(r * out);
  for (int64_t g = 0; g < s.groups; ++g) {
    be.parallel_for(r, [&](int64_t i0, int64_t i1) {
      combine_bank(W + g * E, bank, E, r, out, i0, i1, 0, out, comb.data() + i0 * out, out);
    });
    be.gemm(false, false, L, out, r, scaling, hidden + g * L * r, r, comb.data(), out, T(0),
            delta + g * L * out, out);
  }
}

// delta[n] = scaling * (W[n] kron hidden[n]) @ bank_flat, rows in pieces so the
// [rows, E * r] operand stays bounded.
template <typename T, typename Backend>
void mix_per_row(const Backend& be, const MixShape& s, T scaling, const T* hidden, const T* bank,
                 const T* W, T* delta) {
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out, K = E * r;
  std::vector<T> Z(std::min(N, kKronRows) * K);
  for (int64_t n0 = 0; n0 < N; n0 += kKronRows) {
    const int64_t rows = std::min(kKronRows, N - n0);
    be.parallel_for(ceil_div(rows, kRowPiece), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kRowPiece, m1 = std::min(rows, m0 + kRowPiece);
        kron_rows(W + (n0 + m0) * E, hidden + (n0 + m0) * r, m1 - m0, E, r, Z.data() + m0 * K);
      }
    });
    T* d = delta + n0 * out;
    if (rows <= kSmallRows) {
      constexpr int64_t CB = kColBlock<T>;
      be.parallel_for(ceil_div(out, CB), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t c0 = b * CB;
          gemm_small(rows, K, std::min(CB, out - c0), scaling, Z.data(), K, bank + c0, out, d + c0, out);
        }
      });
    } else {
      be.gemm(false, false, rows, out, K, scaling, Z.data(), K, bank, out, T(0), d, out);
    }
  }
}

template <typename T, typename Backend>
void routed_mix_forward(const Backend& be, const MixShape& s, T scaling, const T* hidden,
                        const T* router, const T* bank, const uint8_t* mask, T* delta) {
  if (s.rows == 0) return;
  const Routing<T> rt = compute_routing<T>(be, s, hidden, router, mask);
  if (mixes_per_row(s))
    mix_per_row(be, s, scaling, hidden, bank, rt.weights.data(), delta);
  else
    mix_grouped(be, s, scaling, hidden, bank, rt.weights.data(), delta);
}

// Backward of mix_grouped: writes dhidden (mixing part), dbank and dW [groups, E].
template <typename T, typename Backend>
void mix_grouped_backward(const Backend& be, const MixShape& s, T scaling, const T* grad,
                          const T* hidden, const T* bank, const T* W, T* dhidden, T* dbank, T* dW) {
  const int64_t E = s.experts, r = s.rank, out = s.out, L = s.group_rows, plane = r * out;
  const int64_t pieces = ceil_div(plane, kPlanePiece);
  std::vector<T> dcomb(plane), comb(plane), partial(pieces * E);
  for (int64_t g = 0; g < s.groups; ++g) {
    const T* h = hidden + g * L * r;
    const T* G = grad + g * L * out;
    // dBc_g = s h_g^T G_g
    be.gemm(true, false, r, out, L, scaling, h, r, G, out, T(0), dcomb.data(), out);
    // dBk += w_g (x) dBc_g and dw_g = <Bk_e, dBc_g>, one pass over the bank
    be.parallel_for(pieces, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t j0 = p * kPlanePiece, j1 = std::min(plane, j0 + kPlanePiece);
        bank_grad(W + g * E, dcomb.data(), bank, E, plane, j0, j1, g > 0, dbank, partial.data() + p * E);
      }
    });
    for (int64_t e = 0; e < E; ++e) {
      T total = 0;
      for (int64_t p = 0; p < pieces; ++p) total += partial[p * E + e];
      dW[g * E + e] = total;
    }
    // dh_g = s G_g Bc_g^T
    be.parallel_for(r, [&](int64_t i0, int64_t i1) {
      combine_bank(W + g * E, bank, E, r, out, i0, i1, 0, out, comb.data() + i0 * out, out);
    });
    be.gemm(false, true, L, r, out, scaling, G, out, comb.data(), out, T(0), dhidden + g * L * r, r);
  }
}

// Backward of mix_per_row: with Z = W kron h, dBk_flat = s Z^T G, dZ = s G Bk_flat^T.
template <typename T, typename Backend>
void mix_per_row_backward(const Backend& be, const MixShape& s, T scaling, const T* grad,
                          const T* hidden, const T* bank, const T* W, T* dhidden, T* dbank, T* dW) {
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out, K = E * r;
  const int64_t chunk = std::min(N, kKronRows);
  std::vector<T> Z(chunk * K), dZ(chunk * K);
  for (int64_t n0 = 0; n0 < N; n0 += kKronRows) {
    const int64_t rows = std::min(kKronRows, N - n0);
    const int64_t pieces = ceil_div(rows, kRowPiece);
    be.parallel_for(pieces, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kRowPiece, m1 = std::min(rows, m0 + kRowPiece);
        kron_rows(W + (n0 + m0) * E, hidden + (n0 + m0) * r, m1 - m0, E, r, Z.data() + m0 * K);
      }
    });
    const T* G = grad + n0 * out;
    be.gemm(true, false, K, out, rows, scaling, Z.data(), K, G, out, T(n0 > 0 ? 1 : 0), dbank, out);
    be.gemm(false, true, rows, K, out, scaling, G, out, bank, out, T(0), dZ.data(), K);
    be.parallel_for(pieces, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kRowPiece, m1 = std::min(rows, m0 + kRowPiece), n = n0 + m0;
        kron_rows_backward(W + n * E, hidden + n * r, dZ.data() + m0 * K, m1 - m0, E, r,
                           dW + n * E, dhidden + n * r);
      }
    });
  }
}

template <typename T, typename Backend>
void routed_mix_backward(const Backend& be, const MixShape& s, T scaling, const T* grad,
                         const T* hidden, const T* router, const T* bank, const uint8_t* mask,
                         T* dhidden, T* drouter, T* dbank) {
  const int64_t N = s.rows, E = s.experts, r = s.rank;
  const int64_t router_size = s.mode == Mode::kStatic ? E : E * r;
  if (N == 0) {
    std::fill(drouter, drouter + router_size, T(0));
    std::fill(dbank, dbank + E * r * s.out, T(0));
    return;
  }
  const Routing<T> rt = compute_routing<T>(be, s, hidden, router, mask);
  std::vector<T> dW(s.groups * E);
  if (mixes_per_row(s))
    mix_per_row_backward(be, s, scaling, grad, hidden, bank, rt.weights.data(), dhidden, dbank, dW.data());
  else
    mix_grouped_backward(be, s, scaling, grad, hidden, bank, rt.weights.data(), dhidden, dbank, dW.data());

  if (s.mode == Mode::kStatic) {  // dtheta = w * (dw - <w, dw>)
    const T* w = rt.weights.data();
    T inner = 0;
    for (int64_t e = 0; e < E; ++e) inner += w[e] * dW[e];
    for (int64_t e = 0; e < E; ++e) drouter[e] = w[e] * (dW[e] - inner);
    return;
  }
  // Gradient reaching each row's router probabilities.
  std::vector<T> dP(N * E);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t e = 0; e < E; ++e) {
      T v;
      if (s.mode == Mode::kBatch) {
        v = dW[e] / T(N);
      } else if (s.mode == Mode::kToken) {
        v = dW[n * E + e];
      } else {
        const int64_t g = n / s.group_rows;
        v = (mask && !mask[n]) ? T(0) : dW[g * E + e] * rt.inv_count[g];
      }
      dP[n * E + e] = v;
    }
  }
  // Softmax backward; per-piece router gradients are added in piece order.
  const int64_t piece = std::max(kRowPiece, ceil_div(N, 256));
  const int64_t pieces = ceil_div(N, piece);
  std::vector<T> partial(pieces * E * r, T(0));
  be.parallel_for(pieces, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * piece, n1 = std::min(N, n0 + piece);
      router_backward(hidden + n0 * r, rt.probs.data() + n0 * E, dP.data() + n0 * E, n1 - n0, r,
                      router, E, dhidden + n0 * r, partial.data() + b * E * r);
    }
  });
  std::copy(partial.begin(), partial.begin() + E * r, drouter);
  for (int64_t b = 1; b < pieces; ++b)
    for (int64_t j = 0; j < E * r; ++j) drouter[j] += partial[b * E * r + j];
}

}  // namespace cpu
}  // namespace lily
