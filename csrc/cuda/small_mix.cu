// The small-N (decode) forward: one kernel does routing, bank combination and
// product, reading each bank element once.
//
// Grid: (column tiles of kSmallMixCols outputs) x (split-K slices). Every block
// first recomputes the routing of all N <= 64 rows in shared memory (N * E dot
// products of length r: small next to its share of the bank, and it saves the
// launches and round trips of a separate routing pass). It then walks its K
// slice kSmallMixK rows at a time: the bank tile [kSmallMixK, kSmallMixCols] is
// combined on the fly (grouped: sum_e w_e Bk_e[k, :]; per-row: Bk_flat[k, :])
// into shared memory next to the matching slice of the A operand (h, or
// W kron h), and each thread accumulates up to 16 rows of one column.
#include "common.cuh"

namespace lily {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = static_cast<int>(kSmallMixCols);
constexpr int kK = static_cast<int>(kSmallMixK);
constexpr int kRowsPerPass = kThreads / kCols;                             // 4 rows of the tile per pass
constexpr int kRowSlots = static_cast<int>(kSmallMixRows) / kRowsPerPass;  // accumulators per thread
static_assert(kThreads % kCols == 0 && kK % kRowsPerPass == 0, "tile shape");

template <typename T>
struct SmallMixArgs {
  const T* hidden;
  const T* router;
  const T* bank;
  const uint8_t* mask;
  int rows, experts, groups, group_rows, mode;
  int64_t rank, out, k_total, k_per_split;
  bool per_row, split;
  acc_t<T> scaling;
  T* delta;
  acc_t<T>* partial;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) small_mix_kernel(const SmallMixArgs<T> a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int E = a.experts, N = a.rows;
  A* tile = reinterpret_cast<A*>(smem_raw);  // [kK, kCols]
  A* lhs = tile + kK * kCols;                // [N, kK]
  A* probs = lhs + N * kK;                   // [N, E]
  A* W = probs + N * E;                      // [groups, E]; causal: [N, E]
  const bool causal = a.mode == static_cast<int>(Mode::kCausal);
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;

  // 1. routing of every row, in shared memory
  if (a.mode == static_cast<int>(Mode::kStatic)) {
    if (warp == 0) {
      A top = -INFINITY;
      for (int e = lane; e < E; e += 32) top = fmax(top, to_acc(a.router[e]));
      top = warp_max(top);
      A total = 0;
      for (int e = lane; e < E; e += 32) total += acc_exp(to_acc(a.router[e]) - top);
      total = warp_sum(total);
      for (int e = lane; e < E; e += 32) W[e] = acc_exp(to_acc(a.router[e]) - top) / total;
    }
  } else {
    for (int q = warp; q < N * E; q += kWarps) {
      const int n = q / E, e = q - n * E;
      const T* h = a.hidden + n * a.rank;
      const T* re = a.router + e * a.rank;
      A dot = 0;
      for (int64_t i = lane; i < a.rank; i += 32) dot += to_acc(h[i]) * to_acc(re[i]);
      dot = warp_sum(dot);
      if (lane == 0) probs[q] = dot;
    }
    __syncthreads();
    for (int n = t; n < N; n += kThreads) {  // softmax of row n, experts in order
      A* p = probs + n * E;
      A top = -INFINITY;
      for (int e = 0; e < E; ++e) top = fmax(top, p[e]);
      A total = 0;
      for (int e = 0; e < E; ++e) {
        p[e] = acc_exp(p[e] - top);
        total += p[e];
      }
      const A inv = A(1) / total;
      for (int e = 0; e < E; ++e) p[e] *= inv;
    }
    __syncthreads();
    for (int q = t; q < a.groups * E; q += kThreads) {  // (masked) mean over each group's rows, in order
      const int g = q / E, e = q - g * E;
      A total = 0;
      int count = 0;
      for (int n = g * a.group_rows; n < (g + 1) * a.group_rows; ++n) {
        if (a.mask == nullptr || a.mask[n] != 0) {
          total += probs[n * E + e];
          ++count;
        }
        // causal: the running mean up to row n (0 before the sample's first unmasked row)
        if (causal) W[n * E + e] = count > 0 ? total / static_cast<A>(count) : A(0);
      }
      if (!causal) W[q] = count > 0 ? total / static_cast<A>(count) : A(0);
    }
  }
  __syncthreads();

  // 2. this block's columns and K slice
  const int c = t % kCols;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + c;
  const bool col_ok = col < a.out;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * a.k_per_split;
  const int64_t k_end = min(a.k_total, k_begin + a.k_per_split);
  const int64_t plane = a.rank * a.out;
  A acc[kRowSlots];
#pragma unroll
  for (int j = 0; j < kRowSlots; ++j) acc[j] = 0;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kK) {
    // bank tile: every load of a pass is independent, so many are in flight
#pragma unroll
    for (int pass = 0; pass < kK / kRowsPerPass; ++pass) {
      const int kk = t / kCols + kRowsPerPass * pass;
      const int64_t k = k0 + kk;
      A v = 0;
      if (k < k_end && col_ok) {
        if (a.per_row) {
          v = to_acc(a.bank[k * a.out + col]);
        } else {
          for (int e = 0; e < E; ++e) v += W[e] * to_acc(a.bank[e * plane + k * a.out + col]);
        }
      }
      tile[kk * kCols + c] = v;
    }
    // A operand slice [N, kK]
    for (int q = t; q < N * kK; q += kThreads) {
      const int n = q / kK, kk = q - n * kK;
      const int64_t k = k0 + kk;
      A v = 0;
      if (k < k_end) {
        if (a.per_row) {
          const int64_t e = k / a.rank, i = k - e * a.rank;
          v = W[(causal ? n : n / a.group_rows) * E + e] * to_acc(a.hidden[n * a.rank + i]);
        } else {
          v = to_acc(a.hidden[n * a.rank + k]);
        }
      }
      lhs[q] = v;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kRowSlots; ++j) {
      const int n = t / kCols + kRowsPerPass * j;  // uniform across a warp
      if (n < N) {
        const A* l = lhs + n * kK;
        A s = acc[j];
#pragma unroll 8
        for (int kk = 0; kk < kK; ++kk) s += l[kk] * tile[kk * kCols + c];
        acc[j] = s;
      }
    }
    __syncthreads();
  }

  if (!col_ok) return;
#pragma unroll
  for (int j = 0; j < kRowSlots; ++j) {
    const int n = t / kCols + kRowsPerPass * j;
    if (n >= N) continue;
    if (a.split)
      a.partial[(static_cast<int64_t>(blockIdx.y) * N + n) * a.out + col] = acc[j];
    else
      a.delta[n * a.out + col] = from_acc<T>(a.scaling * acc[j]);
  }
}

// delta[n, col] = T(scaling * sum over splits, in order, of partial[split, n, col]).
template <typename T>
__global__ void __launch_bounds__(kThreads) split_reduce_kernel(const acc_t<T>* __restrict__ partial, int64_t splits,
                                                                int64_t size, acc_t<T> scaling, T* __restrict__ delta) {
  using A = acc_t<T>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (q >= size) return;
  A total = 0;
  for (int64_t s = 0; s < splits; ++s) total += partial[s * size + q];
  delta[q] = from_acc<T>(scaling * total);
}

}  // namespace

template <typename T>
std::string launch_small_mix(const MixShape& s, const SmallMixPlan& plan, acc_t<T> scaling, const T* hidden,
                             const T* router, const T* bank, const uint8_t* mask, T* delta, acc_t<T>* partial,
                             cudaStream_t stream) {
  if (!plan.fits) return "small_mix: shape not eligible";
  if (plan.splits > kMaxGridY) return "small_mix: too many K splits";
  SmallMixArgs<T> a;
  a.hidden = hidden;
  a.router = router;
  a.bank = bank;
  a.mask = mask;
  a.rows = static_cast<int>(s.rows);
  a.experts = static_cast<int>(s.experts);
  a.groups = static_cast<int>(s.groups);
  a.group_rows = static_cast<int>(s.group_rows);
  a.mode = static_cast<int>(s.mode);
  a.rank = s.rank;
  a.out = s.out;
  a.k_total = plan.k_total;
  a.k_per_split = plan.k_per_split;
  a.per_row = plan.per_row;
  a.split = plan.splits > 1;
  a.scaling = scaling;
  a.delta = delta;
  a.partial = partial;
  const dim3 grid(static_cast<unsigned>(plan.col_tiles), static_cast<unsigned>(plan.splits));
  LILY_LAUNCH("small_mix_kernel", small_mix_kernel<T><<<grid, kThreads, plan.smem_bytes, stream>>>(a));
  if (a.split) {
    const int64_t size = s.rows * s.out;
    LILY_LAUNCH("split_reduce_kernel",
                split_reduce_kernel<T><<<static_cast<unsigned>(ceil_div(size, kThreads)), kThreads, 0, stream>>>(
                    partial, plan.splits, size, scaling, delta));
  }
  return "";
}

#define LILY_INSTANTIATE(T)                                                                                    \
  template std::string launch_small_mix<T>(const MixShape&, const SmallMixPlan&, acc_t<T>, const T*, const T*, \
                                           const T*, const uint8_t*, T*, acc_t<T>*, cudaStream_t);

LILY_INSTANTIATE(float)
LILY_INSTANTIATE(double)
LILY_INSTANTIATE(__half)
LILY_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace lily
