// Passes over the bank (combination, grouped backward) and the (W kron h)
// helpers of the per-row backward. Memory-bound, coalesced along the flat
// plane index; 16-byte vector accesses where sizes and alignment allow.
#include "common.cuh"

namespace lily {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// dst[c, j] = T(sum_e w[c, e] * bank[e, j]); each thread forms one pack of
// consecutive positions (vector path) or one position (scalar path).
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const acc_t<T>* __restrict__ weights, const T* __restrict__ bank, int experts, int64_t plane,
                   T* __restrict__ dst) {
  using A = acc_t<T>;
  constexpr int V = kVector ? Pack<T>::kSize : 1;
  const int64_t c = blockIdx.y;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  if (j >= plane) return;
  const A* w = weights + c * experts;
  A acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = 0;
  for (int e = 0; e < experts; ++e) {
    const A we = w[e];
    if constexpr (kVector) {
      const Pack<T> b = load_pack(bank + e * plane + j);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += we * to_acc(b.v[v]);
    } else {
      acc[0] += we * to_acc(bank[e * plane + j]);
    }
  }
  if constexpr (kVector) {
    Pack<T> o;
#pragma unroll
    for (int v = 0; v < V; ++v) o.v[v] = from_acc<T>(acc[v]);
    store_pack(dst + c * plane + j, o);
  } else {
    dst[c * plane + j] = from_acc<T>(acc[0]);
  }
}

// Grouped backward over one block's slice of the plane for group c = blockIdx.y:
// first the combined bank (and dbank for a single group), then, expert by
// expert, the fixed-tree block sum of bank[e] . dcomb[c] (the slice is re-read
// from L1/L2; no per-expert register arrays, so E is not bounded here).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    bank_grad_groups_kernel(const acc_t<T>* __restrict__ weights, const acc_t<T>* __restrict__ dcomb,
                            const T* __restrict__ bank, int experts, int64_t plane, T* __restrict__ comb,
                            acc_t<T>* __restrict__ dw_partial, T* __restrict__ dbank_single) {
  using A = acc_t<T>;
  __shared__ A scratch[kThreads];
  const int64_t c = blockIdx.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBankGradSlice;
  const int64_t j1 = min(plane, j0 + kBankGradSlice);
  const A* w = weights + c * experts;
  const A* g = dcomb + c * plane;
  for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) {
    A acc = 0;
    const A gj = g[j];
    for (int e = 0; e < experts; ++e) {
      acc += w[e] * to_acc(bank[e * plane + j]);
      if (dbank_single != nullptr) dbank_single[e * plane + j] = from_acc<T>(w[e] * gj);
    }
    comb[c * plane + j] = from_acc<T>(acc);
  }
  A* out = dw_partial + (c * gridDim.x + blockIdx.x) * experts;
  for (int e = 0; e < experts; ++e) {
    A dot = 0;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kThreads) dot += to_acc(bank[e * plane + j]) * g[j];
    dot = block_sum<kThreads>(dot, scratch);
    if (threadIdx.x == 0) out[e] = dot;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bank_grad_accumulate_kernel(const acc_t<T>* __restrict__ weights, const acc_t<T>* __restrict__ dcomb, int experts,
                                int64_t plane, int64_t count, const acc_t<T>* prev, acc_t<T>* acc_out,
                                T* __restrict__ final_out) {
  using A = acc_t<T>;
  const int64_t e = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= plane) return;
  A acc = prev != nullptr ? prev[e * plane + j] : A(0);
  for (int64_t c = 0; c < count; ++c) acc += weights[c * experts + e] * dcomb[c * plane + j];
  if (final_out != nullptr)
    final_out[e * plane + j] = from_acc<T>(acc);
  else
    acc_out[e * plane + j] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_rows_kernel(const acc_t<T>* __restrict__ weights, int64_t weight_rows, const T* __restrict__ hidden,
                     int64_t row0, int64_t rows, int64_t rank, int experts, T* __restrict__ Z) {
  const int64_t K = rank * experts;
  const int64_t total = rows * K;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t m = q / K, k = q - m * K;
    const int64_t e = k / rank, i = k - e * rank;
    const int64_t n = row0 + m;
    Z[q] = from_acc<T>(weights[(n / weight_rows) * experts + e] * to_acc(hidden[n * rank + i]));
  }
}

// One warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_rows_backward_kernel(const acc_t<T>* __restrict__ weights, int64_t weight_rows, const T* __restrict__ hidden,
                              const acc_t<T>* __restrict__ dZ, int64_t row0, int64_t rows, int64_t rank, int experts,
                              acc_t<T>* __restrict__ dweights_row, acc_t<T>* __restrict__ dh_mix) {
  using A = acc_t<T>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;
  if (m >= rows) return;
  const int64_t n = row0 + m;
  const T* h = hidden + n * rank;
  const A* dz = dZ + m * rank * experts;
  const A* w = weights + (n / weight_rows) * experts;
  for (int e = 0; e < experts; ++e) {
    A dot = 0;
    for (int64_t i = lane; i < rank; i += 32) dot += dz[e * rank + i] * to_acc(h[i]);
    dot = warp_sum(dot);
    if (lane == 0) dweights_row[n * experts + e] = dot;
  }
  for (int64_t i = lane; i < rank; i += 32) {
    A acc = 0;
    for (int e = 0; e < experts; ++e) acc += w[e] * dz[e * rank + i];
    dh_mix[n * rank + i] = acc;
  }
}

unsigned grid_1d(int64_t n, int64_t per_block) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, per_block), int64_t(1) << 30));
}

}  // namespace

template <typename T>
std::string launch_combine(const acc_t<T>* weights, const T* bank, int experts, int64_t plane, int64_t count, T* dst,
                           cudaStream_t stream) {
  if (count == 0 || plane == 0) return "";
  if (count > kMaxGridY) return "combine: too many groups in one launch";
  constexpr int64_t V = Pack<T>::kSize;
  const bool vector = plane % V == 0 && aligned16(bank) && aligned16(dst);
  const int64_t per_thread = vector ? V : 1;
  const dim3 grid(static_cast<unsigned>(ceil_div(plane, kThreads * per_thread)), static_cast<unsigned>(count));
  if (vector)
    LILY_LAUNCH("combine_kernel",
                combine_kernel<T, true><<<grid, kThreads, 0, stream>>>(weights, bank, experts, plane, dst));
  else
    LILY_LAUNCH("combine_kernel",
                combine_kernel<T, false><<<grid, kThreads, 0, stream>>>(weights, bank, experts, plane, dst));
  return "";
}

template <typename T>
std::string launch_bank_grad_groups(const acc_t<T>* weights, const acc_t<T>* dcomb, const T* bank, int experts,
                                    int64_t plane, int64_t count, T* comb, acc_t<T>* dw_partial, T* dbank_single,
                                    cudaStream_t stream) {
  if (count == 0 || plane == 0) return "";
  if (count > kMaxGridY) return "bank_grad_groups: too many groups in one launch";
  const dim3 grid(static_cast<unsigned>(bank_grad_blocks(plane)), static_cast<unsigned>(count));
  LILY_LAUNCH("bank_grad_groups_kernel", bank_grad_groups_kernel<T>
              <<<grid, kThreads, 0, stream>>>(weights, dcomb, bank, experts, plane, comb, dw_partial, dbank_single));
  return "";
}

template <typename T>
std::string launch_bank_grad_accumulate(const acc_t<T>* weights, const acc_t<T>* dcomb, int experts, int64_t plane,
                                        int64_t count, const acc_t<T>* prev, acc_t<T>* acc_out, T* final_out,
                                        cudaStream_t stream) {
  if (plane == 0) return "";
  if (experts > kMaxGridY) return "bank_grad_accumulate: too many experts";
  const dim3 grid(static_cast<unsigned>(ceil_div(plane, kThreads)), static_cast<unsigned>(experts));
  LILY_LAUNCH("bank_grad_accumulate_kernel", bank_grad_accumulate_kernel<T>
              <<<grid, kThreads, 0, stream>>>(weights, dcomb, experts, plane, count, prev, acc_out, final_out));
  return "";
}

template <typename T>
std::string launch_kron_rows(const acc_t<T>* weights, int64_t weight_rows, const T* hidden, int64_t row0, int64_t rows,
                             int64_t rank, int experts, T* Z, cudaStream_t stream) {
  const int64_t total = rows * rank * experts;
  if (total == 0) return "";
  LILY_LAUNCH("kron_rows_kernel", kron_rows_kernel<T><<<grid_1d(total, kThreads), kThreads, 0, stream>>>(
                                      weights, weight_rows, hidden, row0, rows, rank, experts, Z));
  return "";
}

template <typename T>
std::string launch_kron_rows_backward(const acc_t<T>* weights, int64_t weight_rows, const T* hidden, const acc_t<T>* dZ,
                                      int64_t row0, int64_t rows, int64_t rank, int experts, acc_t<T>* dweights_row,
                                      acc_t<T>* dh_mix, cudaStream_t stream) {
  if (rows == 0) return "";
  LILY_LAUNCH("kron_rows_backward_kernel", kron_rows_backward_kernel<T>
              <<<static_cast<unsigned>(ceil_div(rows, kThreads / 32)), kThreads, 0, stream>>>(
                  weights, weight_rows, hidden, dZ, row0, rows, rank, experts, dweights_row, dh_mix));
  return "";
}

#define LILY_INSTANTIATE(T)                                                                                          \
  template std::string launch_combine<T>(const acc_t<T>*, const T*, int, int64_t, int64_t, T*, cudaStream_t);        \
  template std::string launch_bank_grad_groups<T>(const acc_t<T>*, const acc_t<T>*, const T*, int, int64_t, int64_t, \
                                                  T*, acc_t<T>*, T*, cudaStream_t);                                  \
  template std::string launch_bank_grad_accumulate<T>(const acc_t<T>*, const acc_t<T>*, int, int64_t, int64_t,       \
                                                      const acc_t<T>*, acc_t<T>*, T*, cudaStream_t);                 \
  template std::string launch_kron_rows<T>(const acc_t<T>*, int64_t, const T*, int64_t, int64_t, int64_t, int, T*,   \
                                           cudaStream_t);                                                            \
  template std::string launch_kron_rows_backward<T>(const acc_t<T>*, int64_t, const T*, const acc_t<T>*, int64_t,    \
                                                    int64_t, int64_t, int, acc_t<T>*, acc_t<T>*, cudaStream_t);

LILY_INSTANTIATE(float)
LILY_INSTANTIATE(double)
LILY_INSTANTIATE(__half)
LILY_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace lily
