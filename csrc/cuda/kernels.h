// Host-side launchers of the routed_mix CUDA kernels (internal to csrc/cuda).
// Each launcher is a template defined in one .cu file and explicitly
// instantiated there for float, double, __half and __nv_bfloat16, so the
// kernels compile in parallel translation units. All return "" on success.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "../lily/contract.h"

namespace lily {
namespace cuda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

// ---- routing (routing.cu) -------------------------------------------------------------------

// Rows per block of the router-softmax kernel (8 warps, two rows each): small,
// so a training-size call spreads over many blocks (N = 8192: 512).
constexpr int64_t kRouterRows = 16;

inline int64_t router_chunks(int64_t segment_rows) { return (segment_rows + kRouterRows - 1) / kRouterRows; }

// Softmax of the router logits of every row. The rows form `segments`
// consecutive segments of `segment_rows` rows (a routing group each); a block
// covers up to kRouterRows rows of one segment. Optional outputs (null = skip):
//   probs [N, E]; row_weights [N, E] = probs, zero where mask is 0;
//   partial [segments * router_chunks(segment_rows), E + 1]: per block, the
//   masked sum of probs over its rows, then its count of unmasked rows.
template <typename T>
std::string launch_router_rows(const T* hidden, const T* router, const uint8_t* mask, int64_t rank, int experts,
                               int64_t segment_rows, int64_t segments, acc_type<T>* probs, acc_type<T>* row_weights,
                               acc_type<T>* partial, cudaStream_t stream);

// weights[g] = (sum of the group's partials) / count, or 0 when the group has no
// unmasked row; inv_count[g] = 1 / count or 0 (inv_count may be null).
template <typename A>
std::string launch_router_finalize(const A* partial, int64_t groups, int64_t chunks, int experts, A* weights,
                                   A* inv_count, cudaStream_t stream);

// Causal weights (causal mode), one block per sample of group_rows rows, rows in
// order: weights[n] = (sum over the sample's rows u <= n with mask[u] != 0 of
// probs[u]) / (their count), or 0 while that count is 0. probs may alias weights.
template <typename A>
std::string launch_causal_weights(const A* probs, const uint8_t* mask, int64_t groups, int64_t group_rows, int experts,
                                  A* weights, cudaStream_t stream);

// Backward of launch_causal_weights, per sample: with n_t the count above,
// dprobs[u] = mask[u] * sum over the sample's rows t >= u of dweights[t] / n_t
// (terms with n_t = 0 are 0). dweights may alias dprobs.
template <typename A>
std::string launch_causal_backward(const A* dweights, const uint8_t* mask, int64_t groups, int64_t group_rows,
                                   int experts, A* dprobs, cudaStream_t stream);

// weights = softmax(theta) (static mode).
template <typename T>
std::string launch_static_weights(const T* theta, int experts, acc_type<T>* weights, cudaStream_t stream);

// Softmax backward per row: dP from the mixing-weight gradient (mode-dependent:
// batch dW / N, token dW[n], causal dW[n] (already dP, from launch_causal_backward),
// sequence mask[n] * dW[g] * inv_count[g], with inv_count null meaning 1),
// dlogit = P * (dP - <P, dP>);
// dhidden[n] = T(dh_mix[n] + dlogit @ router); dlogits[n] = dlogit.
template <typename T>
std::string launch_router_backward_rows(const T* router, const acc_type<T>* probs, const acc_type<T>* dweights,
                                        const acc_type<T>* inv_count, const uint8_t* mask, int64_t rows, int64_t rank,
                                        int experts, int64_t group_rows, Mode mode, const acc_type<T>* dh_mix,
                                        T* dhidden, acc_type<T>* dlogits, cudaStream_t stream);

// Rows per block of the router-gradient partial sums: at least 64, at most ~1024 blocks.
inline int64_t router_grad_rows(int64_t rows) { return std::max<int64_t>(64, (rows + 1023) / 1024); }
inline int64_t router_grad_blocks(int64_t rows) {
  const int64_t per = router_grad_rows(rows);
  return (rows + per - 1) / per;
}

// drouter = T(dlogits^T hidden), via partial [router_grad_blocks(rows), E * r].
template <typename T>
std::string launch_router_grad(const T* hidden, const acc_type<T>* dlogits, int64_t rows, int64_t rank, int experts,
                               acc_type<T>* partial, T* drouter, cudaStream_t stream);

// dtheta = T(w * (dw - <w, dw>)) (static mode).
template <typename T>
std::string launch_static_router_grad(const acc_type<T>* weights, const acc_type<T>* dweights, int experts, T* dtheta,
                                      cudaStream_t stream);

// out[g, e] = sum over the group's rows of row_values[n, e], rows in order.
template <typename A>
std::string launch_sum_group_rows(const A* row_values, int64_t groups, int64_t group_rows, int experts, A* out,
                                  cudaStream_t stream);

// dweights[c, e] = sum over blocks b (in order) of partial[c, b, e].
template <typename A>
std::string launch_sum_partials(const A* partial, int64_t count, int64_t blocks, int experts, A* dweights,
                                cudaStream_t stream);

// dst = T(src), n elements.
template <typename T>
std::string launch_convert(const acc_type<T>* src, int64_t n, T* dst, cudaStream_t stream);

// ---- bank passes and (W kron h) helpers (bank.cu) -------------------------------------------

// Flat plane positions per block of the grouped bank-gradient pass.
constexpr int64_t kBankGradSlice = 4096;
inline int64_t bank_grad_blocks(int64_t plane) { return (plane + kBankGradSlice - 1) / kBankGradSlice; }

// Largest batch of groups per launch (grid y).
constexpr int64_t kMaxGridY = 65535;

// dst[c, j] = T(sum_e weights[c, e] * bank[e, j]) for c < count, j < plane.
template <typename T>
std::string launch_combine(const acc_type<T>* weights, const T* bank, int experts, int64_t plane, int64_t count, T* dst,
                           cudaStream_t stream);

// Grouped backward, one pass over the bank per group c < count:
//   comb[c, j] = T(sum_e w[c, e] bank[e, j]);
//   dw_partial[c, b, e] = sum over block b's positions of bank[e, j] * dcomb[c, j];
//   dbank_single (when not null, count == 1): dbank[e, j] = T(w[0, e] * dcomb[0, j]).
template <typename T>
std::string launch_bank_grad_groups(const acc_type<T>* weights, const acc_type<T>* dcomb, const T* bank, int experts,
                                    int64_t plane, int64_t count, T* comb, acc_type<T>* dw_partial, T* dbank_single,
                                    cudaStream_t stream);

// dbank[e, j] = (prev[e, j] if prev) + sum_c weights[c, e] * dcomb[c, j], written
// to acc_out (float accumulator, may alias prev) or, for the last batch, to final_out (T).
template <typename T>
std::string launch_bank_grad_accumulate(const acc_type<T>* weights, const acc_type<T>* dcomb, int experts,
                                        int64_t plane, int64_t count, const acc_type<T>* prev, acc_type<T>* acc_out,
                                        T* final_out, cudaStream_t stream);

// Z[m, e * r + i] = T(weights[(row0 + m) / weight_rows, e] * hidden[row0 + m, i]), m < rows.
template <typename T>
std::string launch_kron_rows(const acc_type<T>* weights, int64_t weight_rows, const T* hidden, int64_t row0,
                             int64_t rows, int64_t rank, int experts, T* Z, cudaStream_t stream);

// For n = row0 + m, m < rows: dweights_row[n, e] = <dZ[m, e, :], hidden[n]>;
// dh_mix[n, i] = sum_e weights[n / weight_rows, e] * dZ[m, e, i].
template <typename T>
std::string launch_kron_rows_backward(const acc_type<T>* weights, int64_t weight_rows, const T* hidden,
                                      const acc_type<T>* dZ, int64_t row0, int64_t rows, int64_t rank, int experts,
                                      acc_type<T>* dweights_row, acc_type<T>* dh_mix, cudaStream_t stream);

// ---- small-N forward (small_mix.cu) ---------------------------------------------------------

// Rows up to which the whole forward (routing, bank combination, product) is one
// fused kernel that reads the bank once.
constexpr int64_t kSmallMixRows = 64;
constexpr int64_t kSmallMixCols = 64;     // output columns per block
constexpr int64_t kSmallMixK = 32;        // reduction rows per shared-memory tile
constexpr int64_t kSmallMixBlocks = 264;  // target grid size (split-K), fixed so results depend only on the shape
constexpr size_t kSmallMixMaxSmem = 48 * 1024;

struct SmallMixPlan {
  bool per_row = false;  // (W kron h) Bk_flat with K = E * r; else h (sum_e w_e Bk_e), K = r
  int64_t k_total = 0;
  int64_t k_per_split = 0;
  int64_t splits = 0;
  int64_t col_tiles = 0;
  size_t smem_bytes = 0;
  bool fits = false;  // N <= kSmallMixRows and the shared memory fits
};

inline SmallMixPlan plan_small_mix(const MixShape& s, size_t acc_size) {
  SmallMixPlan p;
  if (s.rows < 1 || s.rows > kSmallMixRows) return p;
  const bool causal = s.mode == Mode::kCausal;  // weights per row: [N, E]
  p.per_row = s.groups > 1 || causal;
  p.k_total = p.per_row ? s.experts * s.rank : s.rank;
  p.col_tiles = (s.out + kSmallMixCols - 1) / kSmallMixCols;
  const int64_t chunks = (p.k_total + kSmallMixK - 1) / kSmallMixK;
  int64_t splits = std::min(chunks, std::max<int64_t>(1, (kSmallMixBlocks + p.col_tiles - 1) / p.col_tiles));
  const int64_t chunks_per_split = (chunks + splits - 1) / splits;
  p.splits = (chunks + chunks_per_split - 1) / chunks_per_split;
  p.k_per_split = chunks_per_split * kSmallMixK;
  const int64_t groups = s.mode == Mode::kStatic ? 1 : (causal ? s.rows : s.groups);
  p.smem_bytes = acc_size * static_cast<size_t>(kSmallMixK * kSmallMixCols + s.rows * kSmallMixK + s.rows * s.experts +
                                                groups * s.experts);
  p.fits = p.smem_bytes <= kSmallMixMaxSmem;
  return p;
}

// delta = scaling * routed mix, for N <= kSmallMixRows; when plan.splits > 1 the
// block results go to partial [splits, N, out] and a second kernel adds them in
// split order.
template <typename T>
std::string launch_small_mix(const MixShape& s, const SmallMixPlan& plan, acc_type<T> scaling, const T* hidden,
                             const T* router, const T* bank, const uint8_t* mask, T* delta, acc_type<T>* partial,
                             cudaStream_t stream);

// ---- tiled (W kron h) Bk_flat forward (kron_gemm.cu) ----------------------------------------

// Whether the tiled kernel has a tensor-core (or SIMT) instance for this dtype on
// a device of compute capability `cc` (major * 10 + minor).
template <typename T>
bool kron_gemm_supported(int cc);

// delta[n] = T(scaling * (weights[n] kron hidden[n]) @ bank_flat), weights [rows, E];
// the [rows, E * r] operand is formed tile by tile in shared memory only.
template <typename T>
std::string launch_kron_gemm(const acc_type<T>* weights, const T* hidden, const T* bank, int64_t rows, int64_t rank,
                             int experts, int64_t out, acc_type<T> scaling, T* delta, cudaStream_t stream);

}  // namespace cuda
}  // namespace lily
