// Routing kernels of routed_mix: router softmax with the (masked) per-group mean
// as per-block partial sums plus a fixed-order final reduction, and the softmax /
// router backward. See kernels.h for the contract of each launcher.
#include <cmath>

#include "common.cuh"

namespace lily {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// One warp per row: logits by lane-strided dot products reduced with a
// butterfly, softmax over E with lanes strided over the experts. Per-warp
// masked sums stay in shared memory (each lane owns its experts' entries) and
// are added in warp order at the end, so the partial sum of a block is fixed.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    router_rows_kernel(const T* __restrict__ hidden, const T* __restrict__ router, const uint8_t* __restrict__ mask,
                       int64_t rank, int experts, int64_t segment_rows, int64_t chunks_per_segment,
                       acc_t<T>* __restrict__ probs, acc_t<T>* __restrict__ row_weights,
                       acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* logits = reinterpret_cast<A*>(smem_raw);  // [kWarps, E]
  A* sums = logits + kWarps * experts;         // [kWarps, E]
  A* counts = sums + kWarps * experts;         // [kWarps]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t segment = blockIdx.x / chunks_per_segment, chunk = blockIdx.x % chunks_per_segment;
  const int64_t seg_begin = segment * segment_rows;
  const int64_t row0 = seg_begin + chunk * kRouterRows;
  const int64_t row1 = min(seg_begin + segment_rows, row0 + kRouterRows);
  A* my_logits = logits + warp * experts;
  A* my_sums = sums + warp * experts;
  for (int e = lane; e < experts; e += 32) my_sums[e] = A(0);
  A count = 0;
  for (int64_t n = row0 + warp; n < row1; n += kWarps) {
    const T* h = hidden + n * rank;
    A top = -INFINITY;
    __syncwarp();  // the previous row's reads of my_logits are done
    for (int e = 0; e < experts; ++e) {
      const T* re = router + e * rank;
      A dot = 0;
      for (int64_t i = lane; i < rank; i += 32) dot += to_acc(h[i]) * to_acc(re[i]);
      dot = warp_sum(dot);
      if (lane == 0) my_logits[e] = dot;
      top = fmax(top, dot);
    }
    __syncwarp();
    A total = 0;
    for (int e = lane; e < experts; e += 32) {
      const A x = acc_exp(my_logits[e] - top);
      my_logits[e] = x;
      total += x;
    }
    total = warp_sum(total);
    const A inv = A(1) / total;
    const bool keep = mask == nullptr || mask[n] != 0;
    for (int e = lane; e < experts; e += 32) {
      const A p = my_logits[e] * inv;
      if (probs != nullptr) probs[n * experts + e] = p;
      if (row_weights != nullptr) row_weights[n * experts + e] = keep ? p : A(0);
      if (keep) my_sums[e] += p;
    }
    count += keep ? A(1) : A(0);
  }
  if (lane == 0) counts[warp] = count;
  if (partial == nullptr) return;  // uniform across the block: no barrier is skipped by some threads only
  __syncthreads();
  A* out = partial + static_cast<int64_t>(blockIdx.x) * (experts + 1);
  for (int e = threadIdx.x; e < experts; e += kThreads) {
    A total = 0;
    for (int w = 0; w < kWarps; ++w) total += sums[w * experts + e];
    out[e] = total;
  }
  if (threadIdx.x == 0) {
    A total = 0;
    for (int w = 0; w < kWarps; ++w) total += counts[w];
    out[experts] = total;
  }
}

constexpr int kFinalizeThreads = 128;

// One block per group: the group's partials summed by a fixed tree.
template <typename A>
__global__ void __launch_bounds__(kFinalizeThreads)
    router_finalize_kernel(const A* __restrict__ partial, int64_t chunks, int experts, A* __restrict__ weights,
                           A* __restrict__ inv_count) {
  __shared__ A scratch[kFinalizeThreads];
  __shared__ long long count_scratch[kFinalizeThreads];
  const int64_t g = blockIdx.x;
  const A* base = partial + g * chunks * (experts + 1);
  // Counts are exact small integers per block; add them as integers.
  long long my_count = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kFinalizeThreads)
    my_count += static_cast<long long>(base[c * (experts + 1) + experts]);
  const long long count = block_sum<kFinalizeThreads>(my_count, count_scratch);
  const A inv = count > 0 ? A(1) / static_cast<A>(count) : A(0);
  for (int e = 0; e < experts; ++e) {
    A mine = 0;
    for (int64_t c = threadIdx.x; c < chunks; c += kFinalizeThreads) mine += base[c * (experts + 1) + e];
    const A total = block_sum<kFinalizeThreads>(mine, scratch);
    if (threadIdx.x == 0) weights[g * experts + e] = count > 0 ? total / static_cast<A>(count) : A(0);
  }
  if (threadIdx.x == 0 && inv_count != nullptr) inv_count[g] = inv;
}

// ---- causal running means: one block per sample, a segmented scan along its rows -------------
//
// Thread t of the block's T threads owns the contiguous rows [t * per, (t + 1) *
// per) of the sample (per = ceil(L / T), T = scan_threads(L): a power of two up
// to kScanThreads, so short samples do not pay for idle threads and barriers); per expert, each thread sums its rows in
// order, a block scan (fixed order) gives the sum of the chunks before (after,
// for the backward) its own, and a second walk over its rows writes the running
// values. The order of additions depends only on L: results are reproducible and
// do not depend on the other samples of the call.

constexpr int kScanThreads = 128;

inline int scan_threads(int64_t group_rows) {
  int threads = 1;
  while (threads < kScanThreads && threads < group_rows) threads <<= 1;
  return threads;
}

// Exclusive prefix sum over the block in the order of `pos` (a permutation of
// the thread ids): the sum of the values of the threads with a smaller pos.
// Hillis-Steele in shared memory (buf: blockDim.x values); every thread must call it.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* buf, int pos) {
  buf[pos] = v;
  __syncthreads();
  for (int offset = 1; offset < static_cast<int>(blockDim.x); offset <<= 1) {
    const V add = pos >= offset ? buf[pos - offset] : V(0);
    __syncthreads();
    if (pos >= offset) buf[pos] += add;
    __syncthreads();
  }
  const V before = pos > 0 ? buf[pos - 1] : V(0);
  __syncthreads();  // buf may be reused right after
  return before;
}

__device__ __forceinline__ bool keeps(const uint8_t* mask, int64_t n) { return mask == nullptr || mask[n] != 0; }

// probs may alias weights: each element is read, then written, by the same thread.
template <typename A>
__global__ void __launch_bounds__(kScanThreads) causal_weights_kernel(const A* probs, const uint8_t* __restrict__ mask,
                                                                      int64_t group_rows, int experts, A* weights) {
  __shared__ A scan[kScanThreads];
  __shared__ long long count_scan[kScanThreads];
  const int t = threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * group_rows;
  const int64_t per = (group_rows + blockDim.x - 1) / blockDim.x;
  const int64_t r0 = base + min(group_rows, t * per), r1 = base + min(group_rows, (t + 1) * per);
  long long mine = 0;
  for (int64_t n = r0; n < r1; ++n) mine += keeps(mask, n) ? 1 : 0;
  const long long count0 = block_exclusive_scan(mine, count_scan, t);
  for (int e = 0; e < experts; ++e) {
    A part = 0;
    for (int64_t n = r0; n < r1; ++n)
      if (keeps(mask, n)) part += probs[n * experts + e];
    A run = block_exclusive_scan(part, scan, t);
    long long count = count0;
    for (int64_t n = r0; n < r1; ++n) {
      if (keeps(mask, n)) {
        run += probs[n * experts + e];
        ++count;
      }
      weights[n * experts + e] = count > 0 ? run / static_cast<A>(count) : A(0);
    }
  }
}

// dweights may alias dprobs: each element is read, then written, by the same thread.
template <typename A>
__global__ void __launch_bounds__(kScanThreads)
    causal_backward_kernel(const A* dweights, const uint8_t* __restrict__ mask, int64_t group_rows, int experts,
                           A* dprobs) {
  __shared__ A scan[kScanThreads];
  __shared__ long long count_scan[kScanThreads];
  const int t = threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * group_rows;
  const int64_t per = (group_rows + blockDim.x - 1) / blockDim.x;
  const int64_t r0 = base + min(group_rows, t * per), r1 = base + min(group_rows, (t + 1) * per);
  long long mine = 0;
  for (int64_t n = r0; n < r1; ++n) mine += keeps(mask, n) ? 1 : 0;
  // count of unmasked rows up to and including the chunk's last row
  const long long count_end = block_exclusive_scan(mine, count_scan, t) + mine;
  for (int e = 0; e < experts; ++e) {
    // dC_n = dweights[n] / count_n, summed from the chunk's last row backwards
    A part = 0;
    long long count = count_end;
    for (int64_t n = r1 - 1; n >= r0; --n) {
      if (count > 0) part += dweights[n * experts + e] / static_cast<A>(count);
      if (keeps(mask, n)) --count;
    }
    A run = block_exclusive_scan(part, scan, static_cast<int>(blockDim.x) - 1 - t);  // the chunks after this one
    count = count_end;
    for (int64_t n = r1 - 1; n >= r0; --n) {
      const bool keep = keeps(mask, n);
      if (count > 0) run += dweights[n * experts + e] / static_cast<A>(count);
      dprobs[n * experts + e] = keep ? run : A(0);
      if (keep) --count;
    }
  }
}

template <typename T>
__global__ void static_weights_kernel(const T* __restrict__ theta, int experts, acc_t<T>* __restrict__ weights) {
  using A = acc_t<T>;
  const int lane = threadIdx.x;
  A top = -INFINITY;
  for (int e = lane; e < experts; e += 32) top = fmax(top, to_acc(theta[e]));
  top = warp_max(top);
  A total = 0;
  for (int e = lane; e < experts; e += 32) total += acc_exp(to_acc(theta[e]) - top);
  total = warp_sum(total);
  const A inv = A(1) / total;
  for (int e = lane; e < experts; e += 32) weights[e] = acc_exp(to_acc(theta[e]) - top) * inv;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    router_backward_rows_kernel(const T* __restrict__ router, const acc_t<T>* __restrict__ probs,
                                const acc_t<T>* __restrict__ dweights, const acc_t<T>* __restrict__ inv_count,
                                const uint8_t* __restrict__ mask, int64_t rows, int64_t rank, int experts,
                                int64_t group_rows, int mode, const acc_t<T>* dh_mix, T* dhidden,
                                acc_t<T>* __restrict__ dlogits) {
  // dh_mix may be dhidden itself (float32 / float64): each element is read, then
  // written, by the same thread, so they are not __restrict__.
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A* dl = reinterpret_cast<A*>(smem_raw) + warp * experts;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (n >= rows) return;  // no block-wide barrier below
  const A* p = probs + n * experts;
  const int64_t g = n / group_rows;
  // dP of this row, by mode (the same expression as the CPU driver's)
  const A* dw = dweights;
  A dp_scale = 1, dp_div = 1;
  if (mode == static_cast<int>(Mode::kBatch)) {
    dp_div = static_cast<A>(rows);
  } else if (mode == static_cast<int>(Mode::kToken) || mode == static_cast<int>(Mode::kCausal)) {
    dw = dweights + n * experts;  // causal: dP itself (launch_causal_backward), mask already applied
  } else {                        // sequence
    dw = dweights + g * experts;
    dp_scale = (mask != nullptr && mask[n] == 0) ? A(0) : (inv_count != nullptr ? inv_count[g] : A(1));
  }
  A inner = 0;
  for (int e = lane; e < experts; e += 32) inner += p[e] * (dw[e] * dp_scale / dp_div);
  inner = warp_sum(inner);
  for (int e = lane; e < experts; e += 32) {
    const A v = p[e] * (dw[e] * dp_scale / dp_div - inner);
    dl[e] = v;
    dlogits[n * experts + e] = v;
  }
  __syncwarp();
  for (int64_t i = lane; i < rank; i += 32) {
    A acc = dh_mix[n * rank + i];
    for (int e = 0; e < experts; ++e) acc += dl[e] * to_acc(router[e * rank + i]);
    dhidden[n * rank + i] = from_acc<T>(acc);
  }
}

// partial[b, e * r + i] = sum over block b's rows (in order) of dlogits[n, e] * hidden[n, i].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    router_grad_partial_kernel(const T* __restrict__ hidden, const acc_t<T>* __restrict__ dlogits, int64_t rows,
                               int64_t rank, int experts, int64_t rows_per_block, acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  const int64_t entries = rank * experts;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (j >= entries) return;
  const int64_t e = j / rank, i = j - e * rank;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t n1 = min(rows, n0 + rows_per_block);
  A acc = 0;
  for (int64_t n = n0; n < n1; ++n) acc += dlogits[n * experts + e] * to_acc(hidden[n * rank + i]);
  partial[static_cast<int64_t>(blockIdx.x) * entries + j] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    router_grad_finalize_kernel(const acc_t<T>* __restrict__ partial, int64_t blocks, int64_t entries,
                                T* __restrict__ drouter) {
  using A = acc_t<T>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= entries) return;
  A acc = 0;
  for (int64_t b = 0; b < blocks; ++b) acc += partial[b * entries + j];
  drouter[j] = from_acc<T>(acc);
}

template <typename T>
__global__ void static_router_grad_kernel(const acc_t<T>* __restrict__ weights, const acc_t<T>* __restrict__ dweights,
                                          int experts, T* __restrict__ dtheta) {
  using A = acc_t<T>;
  const int lane = threadIdx.x;
  A inner = 0;
  for (int e = lane; e < experts; e += 32) inner += weights[e] * dweights[e];
  inner = warp_sum(inner);
  for (int e = lane; e < experts; e += 32) dtheta[e] = from_acc<T>(weights[e] * (dweights[e] - inner));
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_group_rows_kernel(const A* __restrict__ row_values, int64_t groups, int64_t group_rows, int experts,
                          A* __restrict__ out) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (q >= groups * experts) return;
  const int64_t g = q / experts, e = q - g * experts;
  A acc = 0;
  for (int64_t n = g * group_rows; n < (g + 1) * group_rows; ++n) acc += row_values[n * experts + e];
  out[q] = acc;
}

template <typename A>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const A* __restrict__ partial, int64_t count,
                                                                int64_t blocks, int experts, A* __restrict__ dweights) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (q >= count * experts) return;
  const int64_t c = q / experts, e = q - c * experts;
  A acc = 0;
  for (int64_t b = 0; b < blocks; ++b) acc += partial[(c * blocks + b) * experts + e];
  dweights[q] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    convert_kernel(const acc_t<T>* __restrict__ src, int64_t n, T* __restrict__ dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    dst[i] = from_acc<T>(src[i]);
}

int64_t grid_for(int64_t n) { return ceil_div(n, kThreads); }

}  // namespace

template <typename T>
std::string launch_router_rows(const T* hidden, const T* router, const uint8_t* mask, int64_t rank, int experts,
                               int64_t segment_rows, int64_t segments, acc_t<T>* probs, acc_t<T>* row_weights,
                               acc_t<T>* partial, cudaStream_t stream) {
  const int64_t chunks = router_chunks(segment_rows);
  const int64_t blocks = segments * chunks;
  if (blocks == 0) return "";
  const size_t smem = sizeof(acc_t<T>) * (2 * kWarps * experts + kWarps);
  LILY_LAUNCH("router_rows_kernel",
              router_rows_kernel<T><<<blocks, kThreads, smem, stream>>>(
                  hidden, router, mask, rank, experts, segment_rows, chunks, probs, row_weights, partial));
  return "";
}

template <typename A>
std::string launch_router_finalize(const A* partial, int64_t groups, int64_t chunks, int experts, A* weights,
                                   A* inv_count, cudaStream_t stream) {
  if (groups == 0) return "";
  LILY_LAUNCH("router_finalize_kernel", router_finalize_kernel<A>
              <<<groups, kFinalizeThreads, 0, stream>>>(partial, chunks, experts, weights, inv_count));
  return "";
}

template <typename A>
std::string launch_causal_weights(const A* probs, const uint8_t* mask, int64_t groups, int64_t group_rows, int experts,
                                  A* weights, cudaStream_t stream) {
  if (groups == 0 || group_rows == 0) return "";
  LILY_LAUNCH("causal_weights_kernel", causal_weights_kernel<A>
              <<<groups, scan_threads(group_rows), 0, stream>>>(probs, mask, group_rows, experts, weights));
  return "";
}

template <typename A>
std::string launch_causal_backward(const A* dweights, const uint8_t* mask, int64_t groups, int64_t group_rows,
                                   int experts, A* dprobs, cudaStream_t stream) {
  if (groups == 0 || group_rows == 0) return "";
  LILY_LAUNCH("causal_backward_kernel", causal_backward_kernel<A>
              <<<groups, scan_threads(group_rows), 0, stream>>>(dweights, mask, group_rows, experts, dprobs));
  return "";
}

template <typename T>
std::string launch_static_weights(const T* theta, int experts, acc_t<T>* weights, cudaStream_t stream) {
  LILY_LAUNCH("static_weights_kernel", static_weights_kernel<T><<<1, 32, 0, stream>>>(theta, experts, weights));
  return "";
}

template <typename T>
std::string launch_router_backward_rows(const T* router, const acc_t<T>* probs, const acc_t<T>* dweights,
                                        const acc_t<T>* inv_count, const uint8_t* mask, int64_t rows, int64_t rank,
                                        int experts, int64_t group_rows, Mode mode, const acc_t<T>* dh_mix, T* dhidden,
                                        acc_t<T>* dlogits, cudaStream_t stream) {
  if (rows == 0) return "";
  const size_t smem = sizeof(acc_t<T>) * kWarps * experts;
  LILY_LAUNCH("router_backward_rows_kernel", router_backward_rows_kernel<T>
              <<<ceil_div(rows, kWarps), kThreads, smem, stream>>>(router, probs, dweights, inv_count, mask, rows, rank,
                                                                   experts, group_rows, static_cast<int>(mode), dh_mix,
                                                                   dhidden, dlogits));
  return "";
}

template <typename T>
std::string launch_router_grad(const T* hidden, const acc_t<T>* dlogits, int64_t rows, int64_t rank, int experts,
                               acc_t<T>* partial, T* drouter, cudaStream_t stream) {
  const int64_t entries = rank * experts;
  const int64_t blocks = router_grad_blocks(rows);
  if (entries == 0 || blocks == 0) return "";
  const int64_t tiles = grid_for(entries);
  if (tiles > kMaxGridY) return "router_grad: E * r = " + std::to_string(entries) + " is too large";
  LILY_LAUNCH("router_grad_partial_kernel", router_grad_partial_kernel<T>
              <<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles)), kThreads, 0, stream>>>(
                  hidden, dlogits, rows, rank, experts, router_grad_rows(rows), partial));
  LILY_LAUNCH("router_grad_finalize_kernel",
              router_grad_finalize_kernel<T><<<tiles, kThreads, 0, stream>>>(partial, blocks, entries, drouter));
  return "";
}

template <typename T>
std::string launch_static_router_grad(const acc_t<T>* weights, const acc_t<T>* dweights, int experts, T* dtheta,
                                      cudaStream_t stream) {
  LILY_LAUNCH("static_router_grad_kernel",
              static_router_grad_kernel<T><<<1, 32, 0, stream>>>(weights, dweights, experts, dtheta));
  return "";
}

template <typename A>
std::string launch_sum_group_rows(const A* row_values, int64_t groups, int64_t group_rows, int experts, A* out,
                                  cudaStream_t stream) {
  if (groups == 0) return "";
  LILY_LAUNCH("sum_group_rows_kernel", sum_group_rows_kernel<A>
              <<<grid_for(groups * experts), kThreads, 0, stream>>>(row_values, groups, group_rows, experts, out));
  return "";
}

template <typename A>
std::string launch_sum_partials(const A* partial, int64_t count, int64_t blocks, int experts, A* dweights,
                                cudaStream_t stream) {
  if (count == 0) return "";
  LILY_LAUNCH("sum_partials_kernel", sum_partials_kernel<A>
              <<<grid_for(count * experts), kThreads, 0, stream>>>(partial, count, blocks, experts, dweights));
  return "";
}

template <typename T>
std::string launch_convert(const acc_t<T>* src, int64_t n, T* dst, cudaStream_t stream) {
  if (n == 0) return "";
  const int64_t blocks = std::min<int64_t>(grid_for(n), 65536);
  LILY_LAUNCH("convert_kernel", convert_kernel<T><<<blocks, kThreads, 0, stream>>>(src, n, dst));
  return "";
}

#define LILY_INSTANTIATE_T(T)                                                                                      \
  template std::string launch_router_rows<T>(const T*, const T*, const uint8_t*, int64_t, int, int64_t, int64_t,   \
                                             acc_t<T>*, acc_t<T>*, acc_t<T>*, cudaStream_t);                       \
  template std::string launch_static_weights<T>(const T*, int, acc_t<T>*, cudaStream_t);                           \
  template std::string launch_router_backward_rows<T>(const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, \
                                                      const uint8_t*, int64_t, int64_t, int, int64_t, Mode,        \
                                                      const acc_t<T>*, T*, acc_t<T>*, cudaStream_t);               \
  template std::string launch_router_grad<T>(const T*, const acc_t<T>*, int64_t, int64_t, int, acc_t<T>*, T*,      \
                                             cudaStream_t);                                                        \
  template std::string launch_static_router_grad<T>(const acc_t<T>*, const acc_t<T>*, int, T*, cudaStream_t);      \
  template std::string launch_convert<T>(const acc_t<T>*, int64_t, T*, cudaStream_t);

LILY_INSTANTIATE_T(float)
LILY_INSTANTIATE_T(double)
LILY_INSTANTIATE_T(__half)
LILY_INSTANTIATE_T(__nv_bfloat16)

#define LILY_INSTANTIATE_A(A)                                                                                       \
  template std::string launch_router_finalize<A>(const A*, int64_t, int64_t, int, A*, A*, cudaStream_t);            \
  template std::string launch_sum_group_rows<A>(const A*, int64_t, int64_t, int, A*, cudaStream_t);                 \
  template std::string launch_sum_partials<A>(const A*, int64_t, int64_t, int, A*, cudaStream_t);                   \
  template std::string launch_causal_weights<A>(const A*, const uint8_t*, int64_t, int64_t, int, A*, cudaStream_t); \
  template std::string launch_causal_backward<A>(const A*, const uint8_t*, int64_t, int64_t, int, A*, cudaStream_t);

LILY_INSTANTIATE_A(float)
LILY_INSTANTIATE_A(double)

}  // namespace cuda
}  // namespace lily
