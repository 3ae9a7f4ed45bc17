// routed_mix forward / backward drivers on CUDA (see routed_mix_cuda.h): pick
// the path for the shape, carve the caller's workspace, launch the kernels of
// routing.cu / bank.cu / small_mix.cu / kron_gemm.cu and route the large GEMMs
// to cuBLAS (cublasGemmEx / cublasGemmStridedBatchedEx, CUBLAS_COMPUTE_32F /
// _64F under kBlasMathMode, see routed_mix_cuda.h) on the caller's stream. The
// grouped vs per-row choices are the CPU driver's (csrc/lily/cpu_routed_mix.h).
#include <cublas_v2.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "common.cuh"
#include "routed_mix_cuda.h"

#define LILY_CUBLAS_CHECK(expr)                                                                 \
  do {                                                                                          \
    const cublasStatus_t lily_blas_status_ = (expr);                                            \
    if (lily_blas_status_ != CUBLAS_STATUS_SUCCESS)                                             \
      return std::string(#expr) + " failed: " + cublasGetStatusName(lily_blas_status_) + " (" + \
             cublasGetStatusString(lily_blas_status_) + ")";                                    \
  } while (0)

namespace lily {
namespace cuda {
namespace {

// Up to this many rows per group the backward goes through the per-row
// (W kron h) form, as on the CPU (cpu::kPerRowBackwardRows).
constexpr int64_t kPerRowBackwardRows = 4;
// Default bound of the chunked scratch buffers (combined banks of a batch of
// groups, a chunk of W kron h rows); LILY_CUDA_SCRATCH_BYTES overrides it.
constexpr size_t kDefaultScratchBytes = size_t(256) << 20;

// ---- per-process and per-device state read once (planning runs on every call) ---------------

// The environment knobs, read at the first planning pass of the process and
// again only on reload_knobs(): getenv on every call is decode-size overhead.
// Each is its own atomic, so concurrent calls read a consistent value of each.
struct Knobs {
  std::atomic<size_t> scratch_bytes{kDefaultScratchBytes};
  std::atomic<bool> kron_gemm{false};
};
Knobs g_knobs;
std::once_flag g_knobs_once;

void read_knobs() {
  size_t scratch = kDefaultScratchBytes;
  const char* env = std::getenv("LILY_CUDA_SCRATCH_BYTES");
  if (env != nullptr && *env != '\0') {
    errno = 0;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(env, &end, 10);
    if (errno == 0 && end != env && *end == '\0' && v > 0) scratch = static_cast<size_t>(v);
  }
  const char* kron = std::getenv("LILY_CUDA_KRON");
  g_knobs.scratch_bytes.store(scratch, std::memory_order_relaxed);
  g_knobs.kron_gemm.store(kron != nullptr && std::string(kron) == "gemm", std::memory_order_relaxed);
}

const Knobs& knobs() {
  std::call_once(g_knobs_once, read_knobs);
  return g_knobs;
}

size_t scratch_budget() { return knobs().scratch_bytes.load(std::memory_order_relaxed); }

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Compute capability (major * 10 + minor) per device id, 0 = not known yet:
// queried once per device and process (a device's compute capability cannot
// change), then a relaxed atomic load. Racing first queries store the same value.
constexpr int kCachedDevices = 64;
std::atomic<int> g_device_cc[kCachedDevices] = {};

int current_cc() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable) {
    const int cached = g_device_cc[device].load(std::memory_order_relaxed);
    if (cached != 0) return cached;
  }
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return 0;
  const int cc = major * 10 + minor;
  if (cacheable) g_device_cc[device].store(cc, std::memory_order_relaxed);
  return cc;
}

// Forward of the per-row modes for N above the small path: the tiled kernel
// (Z only in shared memory; default) or (W kron h) chunks in the workspace plus
// a cuBLAS GEMM (LILY_CUDA_KRON=gemm, and float16 / bfloat16 on devices without
// the needed tensor cores).
template <typename T>
bool kron_tiled() {
  if (knobs().kron_gemm.load(std::memory_order_relaxed)) return false;
  return kron_gemm_supported<T>(current_cc());
}

// Carves 256-byte-aligned buffers out of the workspace; with a null base it
// only measures, so planning and running share one layout.
struct Carver {
  char* base = nullptr;
  size_t offset = 0;
  template <typename X>
  X* take(int64_t count) {
    offset = (offset + 255) & ~size_t(255);
    X* p = base != nullptr ? reinterpret_cast<X*>(base + offset) : nullptr;
    offset += static_cast<size_t>(count) * sizeof(X);
    return p;
  }
};

// ---- cuBLAS ----------------------------------------------------------------------------------

template <typename T>
struct BlasType;
template <>
struct BlasType<float> {
  static constexpr cudaDataType_t value = CUDA_R_32F;
};
template <>
struct BlasType<double> {
  static constexpr cudaDataType_t value = CUDA_R_64F;
};
template <>
struct BlasType<__half> {
  static constexpr cudaDataType_t value = CUDA_R_16F;
};
template <>
struct BlasType<__nv_bfloat16> {
  static constexpr cudaDataType_t value = CUDA_R_16BF;
};

// Full-precision compute types, never CUBLAS_COMPUTE_32F_FAST_*: with
// CUBLAS_COMPUTE_32F the handle's math mode decides whether float32 inputs may
// go through TF32, and BlasScope pins it to kBlasMathMode for every call.
template <typename A>
constexpr cublasComputeType_t compute_type() {
  return sizeof(A) == 8 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
}

std::string check_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) return std::string("cuBLAS ") + what + " " + std::to_string(v) + " exceeds INT_MAX";
  return "";
}

// Row-major C[M, N] = alpha * op(A) @ op(B) + beta * C, in cuBLAS's column-major
// terms C^T = op(B)^T op(A)^T; In is the dtype of A and B, Out of C, alpha and
// beta are in the compute type.
template <typename In, typename Out, typename A>
std::string gemm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, A alpha,
                 const In* a, int64_t lda, const In* b, int64_t ldb, A beta, Out* c, int64_t ldc) {
  if (M == 0 || N == 0) return "";
  for (const int64_t v : {M, N, K, lda, ldb, ldc}) LILY_TRY(check_int(v, "dimension"));
  LILY_CUBLAS_CHECK(cublasGemmEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                 static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, b,
                                 BlasType<In>::value, static_cast<int>(ldb), a, BlasType<In>::value,
                                 static_cast<int>(lda), &beta, c, BlasType<Out>::value, static_cast<int>(ldc),
                                 compute_type<A>(), CUBLAS_GEMM_DEFAULT));
  return "";
}

template <typename In, typename Out, typename A>
std::string gemm_batched(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N,
                         int64_t K, A alpha, const In* a, int64_t lda, int64_t stride_a, const In* b, int64_t ldb,
                         int64_t stride_b, A beta, Out* c, int64_t ldc, int64_t stride_c) {
  if (batch == 0 || M == 0 || N == 0) return "";
  for (const int64_t v : {batch, M, N, K, lda, ldb, ldc}) LILY_TRY(check_int(v, "dimension"));
  LILY_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
      static_cast<int>(M), static_cast<int>(K), &alpha, b, BlasType<In>::value, static_cast<int>(ldb), stride_b, a,
      BlasType<In>::value, static_cast<int>(lda), stride_a, &beta, c, BlasType<Out>::value, static_cast<int>(ldc),
      stride_c, static_cast<int>(batch), compute_type<A>(), CUBLAS_GEMM_DEFAULT));
  return "";
}

// Puts the handle on our stream with host scalars and the math mode of the
// precision policy (kBlasMathMode) for the call, touching each setting only
// when it differs (cublasSetStream also resets a workspace the framework set),
// and puts back what it changed: torch sets its handle's math mode from
// allow_tf32 each time it hands the handle out, and other users of the handle
// must find it as they left it.
class BlasScope {
 public:
  BlasScope(const BlasScope&) = delete;
  BlasScope& operator=(const BlasScope&) = delete;
  BlasScope() = default;
  std::string enter(cublasHandle_t handle, cudaStream_t stream) {
    if (handle == nullptr) return "no cuBLAS handle given";
    handle_ = handle;
    LILY_CUBLAS_CHECK(cublasGetStream(handle, &old_stream_));
    if (old_stream_ != stream) {
      LILY_CUBLAS_CHECK(cublasSetStream(handle, stream));
      restore_stream_ = true;
    }
    LILY_CUBLAS_CHECK(cublasGetPointerMode(handle, &old_mode_));
    if (old_mode_ != CUBLAS_POINTER_MODE_HOST) {
      LILY_CUBLAS_CHECK(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
      restore_mode_ = true;
    }
    LILY_CUBLAS_CHECK(cublasGetMathMode(handle, &old_math_));
    if (old_math_ != kBlasMathMode) {
      LILY_CUBLAS_CHECK(cublasSetMathMode(handle, kBlasMathMode));
      restore_math_ = true;
    }
    return "";
  }
  ~BlasScope() {
    if (restore_math_) cublasSetMathMode(handle_, old_math_);
    if (restore_mode_) cublasSetPointerMode(handle_, old_mode_);
    if (restore_stream_) cublasSetStream(handle_, old_stream_);
  }

 private:
  cublasHandle_t handle_ = nullptr;
  cudaStream_t old_stream_ = nullptr;
  cublasPointerMode_t old_mode_ = CUBLAS_POINTER_MODE_HOST;
  cublasMath_t old_math_ = CUBLAS_DEFAULT_MATH;
  bool restore_stream_ = false, restore_mode_ = false, restore_math_ = false;
};

// ---- forward ---------------------------------------------------------------------------------

enum class ForwardPath { kEmpty, kSmall, kPerRowTiled, kPerRowGemm, kGrouped };

template <typename T>
struct ForwardPlan {
  using A = acc_t<T>;
  ForwardPath path = ForwardPath::kEmpty;
  SmallMixPlan small;
  int64_t chunk_rows = 0;   // kPerRowGemm: rows of W kron h per GEMM
  int64_t group_batch = 0;  // kGrouped: combined banks per batched GEMM
  A* small_partial = nullptr;
  A* weights = nullptr;  // [groups, E] (per-row paths: [N, E])
  A* router_partial = nullptr;
  T* kron = nullptr;
  T* planes = nullptr;
  size_t bytes = 0;
};

template <typename T>
ForwardPlan<T> plan_forward(const MixShape& s, void* workspace) {
  using A = acc_t<T>;
  ForwardPlan<T> p;
  Carver cv{static_cast<char*>(workspace)};
  if (s.rows == 0) return p;
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out;
  p.small = plan_small_mix(s, sizeof(A));
  if (p.small.fits) {
    p.path = ForwardPath::kSmall;
    if (p.small.splits > 1) p.small_partial = cv.take<A>(p.small.splits * N * out);
    p.bytes = cv.offset;
    return p;
  }
  const size_t budget = scratch_budget();
  if (mixes_per_row(s)) {
    p.weights = cv.take<A>(N * E);
    if (kron_tiled<T>()) {
      p.path = ForwardPath::kPerRowTiled;
    } else {
      p.path = ForwardPath::kPerRowGemm;
      p.chunk_rows = clamp64(static_cast<int64_t>(budget / (E * r * sizeof(T))), 1, N);
      p.kron = cv.take<T>(p.chunk_rows * E * r);
    }
  } else {
    p.path = ForwardPath::kGrouped;
    p.weights = cv.take<A>(s.groups * E);
    if (s.mode != Mode::kStatic) p.router_partial = cv.take<A>(s.groups * router_chunks(s.group_rows) * (E + 1));
    const int64_t plane = r * out;
    p.group_batch = clamp64(static_cast<int64_t>(budget / (plane * sizeof(T))), 1, std::min(s.groups, kMaxGridY));
    p.planes = cv.take<T>(p.group_batch * plane);
  }
  p.bytes = cv.offset;
  return p;
}

template <typename T>
std::string forward_impl(const MixShape& s, double scaling, const T* hidden, const T* router, const T* bank,
                         const uint8_t* mask, T* delta, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                         cublasHandle_t blas) {
  using A = acc_t<T>;
  const ForwardPlan<T> p = plan_forward<T>(s, workspace);
  if (p.bytes > workspace_bytes)
    return "workspace of " + std::to_string(workspace_bytes) + " bytes, " + std::to_string(p.bytes) + " needed";
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out, L = s.group_rows;
  const int e32 = static_cast<int>(E);
  const A sc = static_cast<A>(scaling);
  switch (p.path) {
    case ForwardPath::kEmpty:
      return "";
    case ForwardPath::kSmall:
      return launch_small_mix<T>(s, p.small, sc, hidden, router, bank, mask, delta, p.small_partial, stream);
    case ForwardPath::kPerRowTiled:
    case ForwardPath::kPerRowGemm: {
      // per-row weights: softmax rows, zero where the mask (sequence, L == 1) drops the token;
      // causal: the running masked mean of the sample's softmax rows, in place
      const bool causal = s.mode == Mode::kCausal;
      LILY_TRY(launch_router_rows<T>(hidden, router, causal ? nullptr : mask, r, e32, N, 1, nullptr, p.weights, nullptr,
                                     stream));
      if (causal) LILY_TRY(launch_causal_weights<A>(p.weights, mask, s.groups, L, e32, p.weights, stream));
      if (p.path == ForwardPath::kPerRowTiled)
        return launch_kron_gemm<T>(p.weights, hidden, bank, N, r, e32, out, sc, delta, stream);
      BlasScope scope;
      LILY_TRY(scope.enter(blas, stream));
      const int64_t K = E * r;
      for (int64_t n0 = 0; n0 < N; n0 += p.chunk_rows) {
        const int64_t rows = std::min(p.chunk_rows, N - n0);
        LILY_TRY(launch_kron_rows<T>(p.weights, 1, hidden, n0, rows, r, e32, p.kron, stream));
        LILY_TRY(
            (gemm<T, T, A>(blas, false, false, rows, out, K, sc, p.kron, K, bank, out, A(0), delta + n0 * out, out)));
      }
      return "";
    }
    case ForwardPath::kGrouped: {
      if (s.mode == Mode::kStatic) {
        LILY_TRY(launch_static_weights<T>(router, e32, p.weights, stream));
      } else {
        LILY_TRY(launch_router_rows<T>(hidden, router, mask, r, e32, L, s.groups, nullptr, nullptr, p.router_partial,
                                       stream));
        LILY_TRY(
            launch_router_finalize<A>(p.router_partial, s.groups, router_chunks(L), e32, p.weights, nullptr, stream));
      }
      BlasScope scope;
      LILY_TRY(scope.enter(blas, stream));
      const int64_t plane = r * out;
      for (int64_t g0 = 0; g0 < s.groups; g0 += p.group_batch) {
        const int64_t count = std::min(p.group_batch, s.groups - g0);
        LILY_TRY(launch_combine<T>(p.weights + g0 * E, bank, e32, plane, count, p.planes, stream));
        if (s.groups == 1) {
          LILY_TRY((gemm<T, T, A>(blas, false, false, N, out, r, sc, hidden, r, p.planes, out, A(0), delta, out)));
        } else {
          LILY_TRY((gemm_batched<T, T, A>(blas, false, false, count, L, out, r, sc, hidden + g0 * L * r, r, L * r,
                                          p.planes, out, plane, A(0), delta + g0 * L * out, out, L * out)));
        }
      }
      return "";
    }
  }
  return "unknown forward path";
}

// ---- backward --------------------------------------------------------------------------------

template <typename T>
struct BackwardPlan {
  using A = acc_t<T>;
  bool per_row = false;
  int64_t chunk_rows = 0, group_batch = 0;
  A* probs = nullptr;           // [N, E] (not static)
  A* weights = nullptr;         // [groups, E]; causal: [N, E]; token: null (the probs are the weights)
  A* inv_count = nullptr;       // sequence with L > 1
  A* router_partial = nullptr;  // batch, sequence with L > 1
  A* dweights = nullptr;        // [groups, E]; token: [N, E]; causal: null (dP goes to dweights_row)
  A* dh_mix = nullptr;          // [N, r]; null: dhidden itself (T is the accumulation type)
  A* dlogits = nullptr;         // [N, E] (not static)
  A* drouter_partial = nullptr;
  // per-row path
  A* dweights_row = nullptr;  // [N, E] (not token; causal: dW, then dP in place)
  T* kron = nullptr;          // [chunk_rows, E * r]
  A* dkron = nullptr;         // [chunk_rows, E * r]
  // both paths: float accumulator of dbank when T is not the accumulation type
  // (per-row), or across group batches (grouped)
  A* dbank_acc = nullptr;
  // grouped path
  A* dcomb = nullptr;       // [group_batch, r * out]
  T* comb = nullptr;        // [group_batch, r * out]
  A* dw_partial = nullptr;  // [group_batch, bank_grad_blocks, E]
  size_t bytes = 0;
};

template <typename T>
BackwardPlan<T> plan_backward(const MixShape& s, void* workspace) {
  using A = acc_t<T>;
  constexpr bool kAccIsT = std::is_same<T, A>::value;
  BackwardPlan<T> p;
  Carver cv{static_cast<char*>(workspace)};
  if (s.rows == 0) return p;
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out, L = s.group_rows, G = s.groups;
  const bool is_static = s.mode == Mode::kStatic, token = s.mode == Mode::kToken;
  const bool causal = s.mode == Mode::kCausal;
  if (!is_static) p.probs = cv.take<A>(N * E);
  if (!token) p.weights = cv.take<A>(causal ? N * E : G * E);
  if (s.mode == Mode::kSequence && L > 1) p.inv_count = cv.take<A>(G);
  if (s.mode == Mode::kBatch || (s.mode == Mode::kSequence && L > 1))
    p.router_partial = cv.take<A>(G * router_chunks(L) * (E + 1));
  if (!causal) p.dweights = cv.take<A>(G * E);
  if (!kAccIsT) p.dh_mix = cv.take<A>(N * r);
  if (!is_static) {
    p.dlogits = cv.take<A>(N * E);
    p.drouter_partial = cv.take<A>(router_grad_blocks(N) * E * r);
  }
  const size_t budget = scratch_budget();
  p.per_row = token || causal || L <= kPerRowBackwardRows;
  if (p.per_row) {
    const int64_t K = E * r;
    if (!token) p.dweights_row = cv.take<A>(N * E);
    p.chunk_rows = clamp64(static_cast<int64_t>(budget / (K * (sizeof(T) + sizeof(A)))), 1, N);
    p.kron = cv.take<T>(p.chunk_rows * K);
    p.dkron = cv.take<A>(p.chunk_rows * K);
    if (!kAccIsT) p.dbank_acc = cv.take<A>(K * out);
  } else {
    const int64_t plane = r * out;
    p.group_batch =
        G == 1 ? 1
               : clamp64(static_cast<int64_t>(budget / (plane * (sizeof(T) + sizeof(A)))), 1, std::min(G, kMaxGridY));
    p.dcomb = cv.take<A>(p.group_batch * plane);
    p.comb = cv.take<T>(p.group_batch * plane);
    p.dw_partial = cv.take<A>(p.group_batch * bank_grad_blocks(plane) * E);
    if (G > p.group_batch) p.dbank_acc = cv.take<A>(E * plane);
  }
  p.bytes = cv.offset;
  return p;
}

template <typename T>
std::string backward_impl(const MixShape& s, double scaling, const T* grad, const T* hidden, const T* router,
                          const T* bank, const uint8_t* mask, T* dhidden, T* drouter, T* dbank, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream, cublasHandle_t blas) {
  using A = acc_t<T>;
  const int64_t N = s.rows, E = s.experts, r = s.rank, out = s.out, L = s.group_rows, G = s.groups;
  const int e32 = static_cast<int>(E);
  const bool is_static = s.mode == Mode::kStatic, token = s.mode == Mode::kToken;
  const bool causal = s.mode == Mode::kCausal;
  if (N == 0) {  // no rows: the router and bank get zero gradients
    LILY_CUDA_CHECK(cudaMemsetAsync(drouter, 0, sizeof(T) * (is_static ? E : E * r), stream));
    LILY_CUDA_CHECK(cudaMemsetAsync(dbank, 0, sizeof(T) * E * r * out, stream));
    return "";
  }
  const BackwardPlan<T> p = plan_backward<T>(s, workspace);
  if (p.bytes > workspace_bytes)
    return "workspace of " + std::to_string(workspace_bytes) + " bytes, " + std::to_string(p.bytes) + " needed";
  const A sc = static_cast<A>(scaling);
  A* dh_mix = p.dh_mix != nullptr ? p.dh_mix : reinterpret_cast<A*>(dhidden);

  // Routing again (cheap next to the GEMMs; nothing but the op's inputs is saved
  // for backward). W holds the weights row n reads at W[n / weight_rows].
  const A* W = p.weights;
  int64_t weight_rows = L;
  if (is_static) {
    LILY_TRY(launch_static_weights<T>(router, e32, p.weights, stream));
  } else if (token) {
    LILY_TRY(launch_router_rows<T>(hidden, router, nullptr, r, e32, N, 1, p.probs, nullptr, nullptr, stream));
    W = p.probs;
    weight_rows = 1;
  } else if (causal) {  // softmax rows, then their running masked means per sample
    LILY_TRY(launch_router_rows<T>(hidden, router, nullptr, r, e32, N, 1, p.probs, nullptr, nullptr, stream));
    LILY_TRY(launch_causal_weights<A>(p.probs, mask, G, L, e32, p.weights, stream));
    weight_rows = 1;
  } else if (L == 1) {  // sequence, one token per sample: masked softmax rows
    LILY_TRY(launch_router_rows<T>(hidden, router, mask, r, e32, N, 1, p.probs, p.weights, nullptr, stream));
  } else {
    LILY_TRY(launch_router_rows<T>(hidden, router, mask, r, e32, L, G, p.probs, nullptr, p.router_partial, stream));
    LILY_TRY(launch_router_finalize<A>(p.router_partial, G, router_chunks(L), e32, p.weights, p.inv_count, stream));
  }

  BlasScope scope;
  LILY_TRY(scope.enter(blas, stream));
  if (p.per_row) {
    // Z = W kron h by row chunks: dBk_flat (+)= s Z^T G, dZ = s G Bk_flat^T, then
    // dW and dh per row from dZ.
    const int64_t K = E * r;
    A* dW_row = token ? p.dweights : p.dweights_row;
    A* dbank_acc = p.dbank_acc != nullptr ? p.dbank_acc : reinterpret_cast<A*>(dbank);
    for (int64_t n0 = 0; n0 < N; n0 += p.chunk_rows) {
      const int64_t rows = std::min(p.chunk_rows, N - n0);
      const T* G_rows = grad + n0 * out;
      LILY_TRY(launch_kron_rows<T>(W, weight_rows, hidden, n0, rows, r, e32, p.kron, stream));
      LILY_TRY((gemm<T, A, A>(blas, true, false, K, out, rows, sc, p.kron, K, G_rows, out, A(n0 > 0 ? 1 : 0), dbank_acc,
                              out)));
      LILY_TRY((gemm<T, A, A>(blas, false, true, rows, K, out, sc, G_rows, out, bank, out, A(0), p.dkron, K)));
      LILY_TRY(launch_kron_rows_backward<T>(W, weight_rows, hidden, p.dkron, n0, rows, r, e32, dW_row, dh_mix, stream));
    }
    if (p.dbank_acc != nullptr) LILY_TRY(launch_convert<T>(p.dbank_acc, K * out, dbank, stream));
    if (causal)  // dW per row -> dP per row, in place
      LILY_TRY(launch_causal_backward<A>(dW_row, mask, G, L, e32, dW_row, stream));
    else if (!token)
      LILY_TRY(launch_sum_group_rows<A>(dW_row, G, L, e32, p.dweights, stream));
  } else {
    // Per batch of groups: dBc_g = s h_g^T G_g (cuBLAS), one pass over the bank
    // (Bc_g, dw partials, dBk), dh_g = s G_g Bc_g^T (cuBLAS).
    const int64_t plane = r * out;
    for (int64_t g0 = 0; g0 < G; g0 += p.group_batch) {
      const int64_t count = std::min(p.group_batch, G - g0);
      const bool last = g0 + count == G;
      LILY_TRY((gemm_batched<T, A, A>(blas, true, false, count, r, out, L, sc, hidden + g0 * L * r, r, L * r,
                                      grad + g0 * L * out, out, L * out, A(0), p.dcomb, out, plane)));
      LILY_TRY(launch_bank_grad_groups<T>(p.weights + g0 * E, p.dcomb, bank, e32, plane, count, p.comb, p.dw_partial,
                                          G == 1 ? dbank : nullptr, stream));
      LILY_TRY(launch_sum_partials<A>(p.dw_partial, count, bank_grad_blocks(plane), e32, p.dweights + g0 * E, stream));
      if (G > 1)
        LILY_TRY(launch_bank_grad_accumulate<T>(p.weights + g0 * E, p.dcomb, e32, plane, count,
                                                g0 > 0 ? p.dbank_acc : nullptr, last ? nullptr : p.dbank_acc,
                                                last ? dbank : nullptr, stream));
      LILY_TRY((gemm_batched<T, A, A>(blas, false, true, count, L, r, out, sc, grad + g0 * L * out, out, L * out,
                                      p.comb, out, plane, A(0), dh_mix + g0 * L * r, r, L * r)));
    }
  }

  if (is_static) {
    LILY_TRY(launch_static_router_grad<T>(p.weights, p.dweights, e32, drouter, stream));
    if (p.dh_mix != nullptr) LILY_TRY(launch_convert<T>(p.dh_mix, N * r, dhidden, stream));
    return "";
  }
  LILY_TRY(launch_router_backward_rows<T>(router, p.probs, causal ? p.dweights_row : p.dweights, p.inv_count, mask, N,
                                          r, e32, L, s.mode, dh_mix, dhidden, p.dlogits, stream));
  return launch_router_grad<T>(hidden, p.dlogits, N, r, e32, p.drouter_partial, drouter, stream);
}

// ---- dtype dispatch --------------------------------------------------------------------------

std::string check_limits(const MixShape& s) {
  if (s.experts > kMaxExperts)
    return "bank: the CUDA kernels support E <= " + std::to_string(kMaxExperts) +
           " experts, got E = " + std::to_string(s.experts);
  const int64_t limit = INT_MAX;
  if (s.rows > limit || s.out > limit || s.rank * s.experts > limit)
    return "shape too large for the CUDA kernels (N, out and E * r must each be < 2^31)";
  return "";
}

}  // namespace

void reload_knobs() {
  std::call_once(g_knobs_once, [] {});  // a later first planning pass must not read them again
  read_knobs();
}

CallPlan plan_forward_call(const MixShape& s, DType dtype) {
  size_t bytes = 0;
  ForwardPath path = ForwardPath::kEmpty;
#define LILY_PLAN(T)                                      \
  {                                                       \
    const ForwardPlan<T> p = plan_forward<T>(s, nullptr); \
    bytes = p.bytes;                                      \
    path = p.path;                                        \
  }
  switch (dtype) {
    case DType::kFloat32:
      LILY_PLAN(float);
      break;
    case DType::kFloat64:
      LILY_PLAN(double);
      break;
    case DType::kFloat16:
      LILY_PLAN(__half);
      break;
    case DType::kBFloat16:
      LILY_PLAN(__nv_bfloat16);
      break;
  }
#undef LILY_PLAN
  CallPlan plan;
  plan.workspace_bytes = bytes;
  plan.uses_blas = path == ForwardPath::kGrouped || path == ForwardPath::kPerRowGemm;
  // cuBLAS's recommended workspace: 32 MiB on Hopper and later, 4 MiB before.
  if (plan.uses_blas) plan.blas_workspace_bytes = current_cc() >= 90 ? size_t(32) << 20 : size_t(4) << 20;
  return plan;
}

CallPlan plan_backward_call(const MixShape& s, DType dtype) {
  CallPlan plan;
  switch (dtype) {
    case DType::kFloat32:
      plan.workspace_bytes = plan_backward<float>(s, nullptr).bytes;
      break;
    case DType::kFloat64:
      plan.workspace_bytes = plan_backward<double>(s, nullptr).bytes;
      break;
    case DType::kFloat16:
      plan.workspace_bytes = plan_backward<__half>(s, nullptr).bytes;
      break;
    case DType::kBFloat16:
      plan.workspace_bytes = plan_backward<__nv_bfloat16>(s, nullptr).bytes;
      break;
  }
  plan.uses_blas = s.rows > 0;  // both backward paths run their large GEMMs on cuBLAS
  if (plan.uses_blas) plan.blas_workspace_bytes = current_cc() >= 90 ? size_t(32) << 20 : size_t(4) << 20;
  return plan;
}

size_t forward_workspace_bytes(const MixShape& s, DType dtype) { return plan_forward_call(s, dtype).workspace_bytes; }

size_t forward_blas_workspace_bytes(const MixShape& s, DType dtype) {
  return plan_forward_call(s, dtype).blas_workspace_bytes;
}

size_t backward_workspace_bytes(const MixShape& s, DType dtype) { return plan_backward_call(s, dtype).workspace_bytes; }

std::string routed_mix_forward(const MixShape& s, DType dtype, double scaling, const void* hidden, const void* router,
                               const void* bank, const uint8_t* mask, void* delta, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream, cublasHandle_t blas) {
  LILY_TRY(check_limits(s));
#define LILY_FORWARD(T)                                                                     \
  forward_impl<T>(s, scaling, static_cast<const T*>(hidden), static_cast<const T*>(router), \
                  static_cast<const T*>(bank), mask, static_cast<T*>(delta), workspace, workspace_bytes, stream, blas)
  switch (dtype) {
    case DType::kFloat32:
      return LILY_FORWARD(float);
    case DType::kFloat64:
      return LILY_FORWARD(double);
    case DType::kFloat16:
      return LILY_FORWARD(__half);
    case DType::kBFloat16:
      return LILY_FORWARD(__nv_bfloat16);
  }
#undef LILY_FORWARD
  return "unsupported dtype";
}

std::string routed_mix_backward(const MixShape& s, DType dtype, double scaling, const void* grad, const void* hidden,
                                const void* router, const void* bank, const uint8_t* mask, void* dhidden, void* drouter,
                                void* dbank, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                cublasHandle_t blas) {
  LILY_TRY(check_limits(s));
#define LILY_BACKWARD(T)                                                                                       \
  backward_impl<T>(s, scaling, static_cast<const T*>(grad), static_cast<const T*>(hidden),                     \
                   static_cast<const T*>(router), static_cast<const T*>(bank), mask, static_cast<T*>(dhidden), \
                   static_cast<T*>(drouter), static_cast<T*>(dbank), workspace, workspace_bytes, stream, blas)
  switch (dtype) {
    case DType::kFloat32:
      return LILY_BACKWARD(float);
    case DType::kFloat64:
      return LILY_BACKWARD(double);
    case DType::kFloat16:
      return LILY_BACKWARD(__half);
    case DType::kBFloat16:
      return LILY_BACKWARD(__nv_bfloat16);
  }
#undef LILY_BACKWARD
  return "unsupported dtype";
}

}  // namespace cuda
}  // namespace lily
