// lily_linear on the CPU, framework-free. lily_adapter_forward: everything of
//
//   y = x W^T + b + scaling * routed_mix(x A^T, router, bank)
//
// that is not the base layer's own GEMM. The caller computes y = x W^T + b
// (with the host's BLAS, in the base layer's dtype) and hands it over; the
// adapter is added into it in place: h = x A^T, the routing, the mix, and the
// sum, with no [N, out] temporary where the mix ends in one BLAS call and a
// small one (<= kSmallRows rows) elsewhere. The backward computes the
// routed_mix gradients, then dx += dh A and dA = dh^T x. Backend: as in
// cpu_routed_mix.h; with a Backend whose gemm has a fixed reduction order
// (cpu_gemm), results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "contract.h"
#include "cpu_routed_mix.h"

namespace lily {
namespace cpu {

// y[N, out] += delta[N, out] (contiguous), rows in pieces.
template <typename T, typename Backend>
void add_rows(const Backend& be, int64_t rows, int64_t out, const T* delta, T* y) {
  const int64_t piece = std::max<int64_t>(1, 16384 / std::max<int64_t>(out, 1));
  be.parallel_for(ceil_div(rows, piece), [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * piece, n1 = std::min(rows, b1 * piece);
    for (int64_t j = n0 * out; j < n1 * out; ++j) y[j] += delta[j];
  });
}

// Runs a Backend's work on the calling thread: for products too small to pay for a
// parallel region (the same pieces in the same order, so the same bits).
template <typename Backend>
struct SerialBackend {
  const Backend& be;
  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    if (n > 0) f(0, n);
  }
  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
            int64_t ldb, T beta, T* C, int64_t ldc) const {
    be.gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
};

// y [N, out] += routed_mix(hidden, ...): in place where the mix ends in one BLAS call, else
// formed in a scratch and added in one pass.
template <typename T, typename Backend>
void add_mix(const Backend& be, const MixShape& s, T scaling, const T* hidden, const T* router, const T* bank,
             const uint8_t* mask, T* y) {
  if (mix_accumulates_in_place(s)) {
    routed_mix_forward(be, s, scaling, hidden, router, bank, mask, y, T(1));
    return;
  }
  auto delta = scratch<T>(s.rows * s.out);
  routed_mix_forward(be, s, scaling, hidden, router, bank, mask, delta.get());
  add_rows(be, s.rows, s.out, delta.get(), y);
}

// Up to this many multiply-adds, h = x A^T runs on the calling thread (decode, N = 1, r = 128,
// in = 512: 64 Ki), saving a parallel region per layer.
constexpr int64_t kSerialProjection = int64_t(1) << 17;

// s: the routed_mix shape of hidden = x A^T (rows N, rank r, ...); `in` = x's features.
// Writes hidden [N, r] and adds the adapter output into y [N, out] (accumulate), or
// writes it there (!accumulate: y = the adapter output alone).
template <typename T, typename Backend>
void lily_adapter_forward(const Backend& be, const MixShape& s, int64_t in, T scaling, const T* x, const T* A,
                          const T* router, const T* bank, const uint8_t* mask, T* hidden, T* y, bool accumulate) {
  const int64_t N = s.rows, r = s.rank;
  if (N == 0) return;
  if (N * r * in <= kSerialProjection)  // h = x A^T
    matmul(SerialBackend<Backend>{be}, false, true, N, r, in, T(1), x, in, A, in, T(0), hidden, r);
  else
    matmul(be, false, true, N, r, in, T(1), x, in, A, in, T(0), hidden, r);
  if (accumulate)
    add_mix(be, s, scaling, hidden, router, bank, mask, y);
  else
    routed_mix_forward(be, s, scaling, hidden, router, bank, mask, y);
}

// Up to this many rows (decode), lily_layer_forward_rows computes the base layer too.
constexpr int64_t kLayerRows = kStreamRows;
// Rows of A or W per task of its first pass.
constexpr int64_t kLayerTaskRows = 32;

// The whole layer for a few rows (decode), base included: y = x W^T + b + adapter.
// At decode the layer is a pass over its weights (W, A, the bank), not over math; two
// parallel passes read them: the first computes h = x A^T and y = x W^T + b together,
// as dot products of x with the rows of [A; W]; the second the routing and the mix,
// added into y. x, W and the adapter share T.
template <typename T, typename Backend>
void lily_layer_forward_rows(const Backend& be, const MixShape& s, int64_t in, T scaling, const T* x, const T* weight,
                             const T* bias, const T* A, const T* router, const T* bank, const uint8_t* mask, T* hidden,
                             T* y) {
  const int64_t N = s.rows, r = s.rank, out = s.out;
  if (N == 0) return;
  const int64_t a_tasks = ceil_div(r, kLayerTaskRows), tasks = a_tasks + ceil_div(out, kLayerTaskRows);
  be.parallel_for(tasks, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < a_tasks) {
        const int64_t i0 = t * kLayerTaskRows, rows = std::min(kLayerTaskRows, r - i0);
        gemm_small_nt(N, rows, in, T(1), x, in, A + i0 * in, in, hidden + i0, r);
        continue;
      }
      const int64_t o0 = (t - a_tasks) * kLayerTaskRows, rows = std::min(kLayerTaskRows, out - o0);
      gemm_small_nt(N, rows, in, T(1), x, in, weight + o0 * in, in, y + o0, out);
      if (bias != nullptr)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t j = o0; j < o0 + rows; ++j) y[n * out + j] += bias[j];
    }
  });
  add_mix(be, s, scaling, hidden, router, bank, mask, y);
}

// grad [N, out]; x [N, in]; hidden = x A^T [N, r] as the forward computed it.
// dx (nullable): dx += dh A. dA (nullable): dA = dh^T x. drouter, dbank: as routed_mix_backward.
template <typename T, typename Backend>
void lily_adapter_backward(const Backend& be, const MixShape& s, int64_t in, T scaling, const T* grad, const T* x,
                           const T* hidden, const T* A, const T* router, const T* bank, const uint8_t* mask, T* dx,
                           T* dA, T* drouter, T* dbank) {
  const int64_t N = s.rows, r = s.rank;
  auto dh = scratch<T>(N * r);
  routed_mix_backward(be, s, scaling, grad, hidden, router, bank, mask, dh.get(), drouter, dbank);
  if (N == 0) {
    if (dA != nullptr) std::fill(dA, dA + r * in, T(0));
    return;
  }
  if (dx != nullptr) matmul(be, false, false, N, in, r, T(1), dh.get(), r, A, in, T(1), dx, in);
  if (dA != nullptr) matmul(be, true, false, r, in, N, T(1), dh.get(), r, x, in, T(0), dA, in);
}

}  // namespace cpu
}  // namespace lily
