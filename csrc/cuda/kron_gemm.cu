// Tiled (W kron h) Bk_flat forward: delta = s * Z @ Bk_flat with
// Z[n, e * r + i] = W[n, e] * h[n, i] and K = E * r. Z is never written to global
// memory: each block forms its [BM, BK] tile of Z in shared memory from h and
// W while loading the matching [BK, BN] tile of the bank, with the next tiles
// prefetched into registers during the current tile's math.
//
//   float16 / bfloat16: tensor cores (WMMA 16x16x16, float accumulators);
//     block 128 x 128, BK = 32, 8 warps of 64 x 32 (4 x 2 fragments).
//   float32 / float64: SIMT FMA in the accumulation type (no TF32, so float32
//     keeps full precision); block 128 x 128 (float) or 64 x 64 (double),
//     BK = 8, each thread an 8 x 8 (4 x 4) strided micro-tile.
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace lily {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct KronArgs {
  const acc_t<T>* weights;  // [rows, E]
  const T* hidden;          // [rows, rank]
  const T* bank;            // [K, out]
  int64_t rows, out;
  int rank, K, experts;  // K = E * r < 2^31 (checked by the driver)
  acc_t<T> scaling;
  T* delta;
};

// ---- tensor cores ----------------------------------------------------------------------------

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kLdA = kBK + 8;  // row pitch of the Z tile (elements): 16-byte multiple, rows spread over banks
constexpr int kLdB = kBN + 8;
constexpr int kTileBytes = (kBM * kLdA + kBK * kLdB) * 2;
constexpr int kStageBytes = (kThreads / 32) * 16 * 16 * 4;  // per-warp float staging in the epilogue
static_assert(kBM * kLdA * 2 >= kStageBytes, "the epilogue stages in the Z tile's space");
static_assert((kBM * kLdA * 2) % 128 == 0, "bank tile alignment");

// Per-thread share of one tile pair, as packs of 8 elements: the vector path
// loads 2 packs of Z and 2 of the bank, the scalar path 16 + 16 elements.
//
// Thread t's loads q = t + 256 s all share one position along k (Z) or along
// the columns (bank), so the expert / index split of k is done once per tile.
//   vector Z:   row (t >> 2) + 64 s, k = k0 + 8 (t & 3)
//   vector B:   k = k0 + (t >> 4) + 16 s, columns n0 + 8 (t & 15) .. + 7
//   scalar Z:   row (t >> 5) + 8 s,  k = k0 + (t & 31)
//   scalar B:   k = k0 + (t >> 7) + 2 s, column n0 + (t & 127)
template <typename T>
struct TileRegs {
  Pack<T> a[2];
  Pack<T> b[2];
};

template <typename T, bool kVector>
__device__ __forceinline__ void tc_load(const KronArgs<T>& p, int64_t m0, int64_t n0, int k0, TileRegs<T>& r) {
  using A = acc_t<T>;
  const int t = threadIdx.x;
  if constexpr (kVector) {
    const int k = k0 + 8 * (t & 3);  // rank % 8 == 0: the 8 values share one expert
    const int e = k / p.rank, i = k - e * p.rank;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int64_t row = m0 + (t >> 2) + 64 * s;
      Pack<T> z = zero_pack<T>();
      if (row < p.rows && k < p.K) {
        const A w = p.weights[row * p.experts + e];
        const Pack<T> h = load_pack(p.hidden + row * p.rank + i);
#pragma unroll
        for (int v = 0; v < 8; ++v) z.v[v] = from_acc<T>(w * to_acc(h.v[v]));
      }
      r.a[s] = z;
    }
    const int64_t col = n0 + 8 * (t & 15);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int kb = k0 + (t >> 4) + 16 * s;
      r.b[s] = (kb < p.K && col < p.out) ? load_pack(p.bank + static_cast<int64_t>(kb) * p.out + col) : zero_pack<T>();
    }
  } else {
    const int k = k0 + (t & 31);
    const int e = k / p.rank, i = k - e * p.rank;
#pragma unroll
    for (int s = 0; s < 16; ++s) {
      const int64_t row = m0 + (t >> 5) + 8 * s;
      A v = 0;
      if (row < p.rows && k < p.K) v = p.weights[row * p.experts + e] * to_acc(p.hidden[row * p.rank + i]);
      r.a[s >> 3].v[s & 7] = from_acc<T>(v);
    }
    const int64_t col = n0 + (t & 127);
#pragma unroll
    for (int s = 0; s < 16; ++s) {
      const int kb = k0 + (t >> 7) + 2 * s;
      r.b[s >> 3].v[s & 7] =
          (kb < p.K && col < p.out) ? p.bank[static_cast<int64_t>(kb) * p.out + col] : from_acc<T>(acc_t<T>(0));
    }
  }
}

template <typename T, bool kVector>
__device__ __forceinline__ void tc_store(const TileRegs<T>& r, T* As, T* Bs) {
  const int t = threadIdx.x;
  if constexpr (kVector) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      store_pack(As + ((t >> 2) + 64 * s) * kLdA + 8 * (t & 3), r.a[s]);
      store_pack(Bs + ((t >> 4) + 16 * s) * kLdB + 8 * (t & 15), r.b[s]);
    }
  } else {
#pragma unroll
    for (int s = 0; s < 16; ++s) {
      As[((t >> 5) + 8 * s) * kLdA + (t & 31)] = r.a[s >> 3].v[s & 7];
      Bs[((t >> 7) + 2 * s) * kLdB + (t & 127)] = r.b[s >> 3].v[s & 7];
    }
  }
}

// Two blocks per SM on the vector path (<= 128 registers); the scalar fallback
// (r or out not a multiple of 8, or misaligned) keeps 16 row addresses live and
// gets the whole register file instead of spilling.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads, kVector ? 2 : 1) kron_gemm_tc_kernel(const KronArgs<T> p) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  constexpr bool kHasMma = true;
#elif __CUDA_ARCH__ >= 700
  constexpr bool kHasMma = std::is_same<T, __half>::value;
#else
  constexpr bool kHasMma = false;
#endif
  if constexpr (kHasMma) {
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(128) unsigned char smem[kTileBytes];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = As + kBM * kLdA;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps, 64 x 32 each
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    TileRegs<T> regs;
    tc_load<T, kVector>(p, m0, n0, 0, regs);
    tc_store<T, kVector>(regs, As, Bs);
    __syncthreads();
    for (int k0 = 0; k0 < p.K; k0 += kBK) {
      const bool more = k0 + kBK < p.K;
      if (more) tc_load<T, kVector>(p, m0, n0, k0 + kBK, regs);  // in flight during the math below
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + kk * kLdB + wn * 32 + j * 16, kLdB);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::load_matrix_sync(fa, As + (wm * 64 + i * 16) * kLdA + kk, kLdA);
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa, fb[j], acc[i][j]);
        }
      }
      __syncthreads();
      if (more) {
        tc_store<T, kVector>(regs, As, Bs);
        __syncthreads();
      }
    }

    // Epilogue: each warp stages one 16 x 16 fragment at a time, then scales,
    // converts and writes it with bounds checks.
    float* stage = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int q = lane; q < 256; q += 32) {
          const int64_t row = m0 + wm * 64 + i * 16 + (q >> 4);
          const int64_t col = n0 + wn * 32 + j * 16 + (q & 15);
          if (row < p.rows && col < p.out) p.delta[row * p.out + col] = from_acc<T>(p.scaling * stage[q]);
        }
        __syncwarp();
      }
    }
  } else {
    __trap();  // the host never launches it here (kron_gemm_supported)
  }
#endif
}

// ---- SIMT (float32 / float64) -----------------------------------------------------------------

template <typename T>
struct Simt {
  static constexpr int TM = sizeof(acc_t<T>) == 8 ? 4 : 8;  // micro-tile edge
  static constexpr int BM = 16 * TM;
  static constexpr int BN = BM;
  static constexpr int BK = 8;
  static constexpr int kLoads = BK * BM / kThreads;  // per thread per tile, for each operand
  static_assert(BK * BM % kThreads == 0, "tile shape");
};

// Thread t's loads q = t + 256 s share k (Z: rows t / BK + (256 / BK) s,
// k = k0 + t % BK) or the column (bank: k = k0 + t / BN + (256 / BN) s,
// column n0 + t % BN), so the expert split of k is done once per tile.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) kron_gemm_simt_kernel(const KronArgs<T> p) {
  using A = acc_t<T>;
  using S = Simt<T>;
  constexpr int TM = S::TM, BM = S::BM, BN = S::BN, BK = S::BK, kLoads = S::kLoads;
  __shared__ A As[BK][BM + 4];  // k-major Z tile; the +4 spreads the transposing stores over banks
  __shared__ A Bs[BK][BN];
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t col = n0 + t % BN;
  A ra[kLoads], rb[kLoads];

  auto load = [&](int k0) {
    const int k = k0 + t % BK;
    const int e = k / p.rank, i = k - e * p.rank;
#pragma unroll
    for (int s = 0; s < kLoads; ++s) {
      const int64_t row = m0 + t / BK + (kThreads / BK) * s;
      ra[s] = (row < p.rows && k < p.K) ? p.weights[row * p.experts + e] * to_acc(p.hidden[row * p.rank + i]) : A(0);
      const int kb = k0 + t / BN + (kThreads / BN) * s;
      rb[s] = (kb < p.K && col < p.out) ? to_acc(p.bank[static_cast<int64_t>(kb) * p.out + col]) : A(0);
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int s = 0; s < kLoads; ++s) {
      As[t % BK][t / BK + (kThreads / BK) * s] = ra[s];
      Bs[t / BN + (kThreads / BN) * s][t % BN] = rb[s];
    }
  };

  A acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = 0;

  load(0);
  store();
  __syncthreads();
  for (int k0 = 0; k0 < p.K; k0 += BK) {
    const bool more = k0 + BK < p.K;
    if (more) load(k0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      A a[TM], b[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TM; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TM; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
    if (more) {
      store();
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col < p.out) p.delta[row * p.out + col] = from_acc<T>(p.scaling * acc[i][j]);
    }
  }
}

}  // namespace

template <typename T>
bool kron_gemm_supported(int cc) {
  if (std::is_same<T, __nv_bfloat16>::value) return cc >= 80;
  if (std::is_same<T, __half>::value) return cc >= 70;
  return true;
}

template <typename T>
std::string launch_kron_gemm(const acc_t<T>* weights, const T* hidden, const T* bank, int64_t rows, int64_t rank,
                             int experts, int64_t out, acc_t<T> scaling, T* delta, cudaStream_t stream) {
  if (rows == 0) return "";
  if (rank * experts > INT32_MAX - 1024) return "kron_gemm: E * r is too large";  // k0 + tile stays in int
  KronArgs<T> p;
  p.weights = weights;
  p.hidden = hidden;
  p.bank = bank;
  p.rows = rows;
  p.out = out;
  p.rank = static_cast<int>(rank);
  p.K = static_cast<int>(rank * experts);
  p.experts = experts;
  p.scaling = scaling;
  p.delta = delta;
  constexpr bool kTensorCores = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
  if constexpr (kTensorCores) {
    const int64_t col_tiles = ceil_div(out, kBN);
    if (col_tiles > kMaxGridY) return "kron_gemm: out is too large";
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, kBM)), static_cast<unsigned>(col_tiles));
    if (rank % 8 == 0 && out % 8 == 0 && aligned16(hidden) && aligned16(bank))
      LILY_LAUNCH("kron_gemm_tc_kernel", kron_gemm_tc_kernel<T, true><<<grid, kThreads, 0, stream>>>(p));
    else
      LILY_LAUNCH("kron_gemm_tc_kernel", kron_gemm_tc_kernel<T, false><<<grid, kThreads, 0, stream>>>(p));
  } else {
    const int64_t col_tiles = ceil_div(out, Simt<T>::BN);
    if (col_tiles > kMaxGridY) return "kron_gemm: out is too large";
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, Simt<T>::BM)), static_cast<unsigned>(col_tiles));
    LILY_LAUNCH("kron_gemm_simt_kernel", kron_gemm_simt_kernel<T><<<grid, kThreads, 0, stream>>>(p));
  }
  return "";
}

#define LILY_INSTANTIATE(T)                                                                                     \
  template bool kron_gemm_supported<T>(int);                                                                    \
  template std::string launch_kron_gemm<T>(const acc_t<T>*, const T*, const T*, int64_t, int64_t, int, int64_t, \
                                           acc_t<T>, T*, cudaStream_t);

LILY_INSTANTIATE(float)
LILY_INSTANTIATE(double)
LILY_INSTANTIATE(__half)
LILY_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace lily
