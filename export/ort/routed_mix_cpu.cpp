// lily.RoutedMix for ONNX Runtime's CPU execution provider: a thin binding of
// the framework-free kernels (csrc/lily/cpu_routed_mix.h) to the ORT C API.
//
// Element types of `hidden`: float32, float64, float16, bfloat16 (half
// precision widened to float32). The op definition and input checks are
// shared with the CUDA kernel (routed_mix_op.cpp).
#include <algorithm>
#include <atomic>
#include <exception>
#include <string>
#include <vector>

#include <onnxruntime_float16.h>

#include "lily/contract.h"
#include "lily/cpu_gemm.h"
#include "lily/cpu_routed_mix.h"
#include "ort_common.h"
#include "routed_mix_ops.h"

namespace lily_ort {
namespace {

// The cpu_routed_mix.h Backend: ORT's intra-op thread pool for parallel_for,
// this library's blocked GEMM for the large products.
struct OrtCpuBackend {
  const OrtApi* api;
  const OrtKernelContext* context;
  bool use_pool;  // KernelContext_ParallelFor exists (API >= 17)

  template <class F>
  struct Call {
    const F* f;
    std::atomic<bool> failed{false};
    std::exception_ptr error;
  };

  // Pieces must not throw into ORT's thread pool: the first failure is kept and rethrown by the caller.
  template <class F>
  static void run_piece(void* data, size_t i) {
    auto* call = static_cast<Call<F>*>(data);
    try {
      (*call->f)(int64_t(i), int64_t(i) + 1);
    } catch (...) {
      if (!call->failed.exchange(true)) call->error = std::current_exception();
    }
  }

  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    if (n <= 0) return;
    if (n == 1 || !use_pool) {
      f(0, n);
      return;
    }
    Call<F> call;
    call.f = &f;
    // Coarse pieces already: one pool task per piece (num_batch = 0).
    OrtStatus* status = api->KernelContext_ParallelFor(context, &run_piece<F>, size_t(n), 0, &call);
    check(api, status);
    if (call.failed) std::rethrow_exception(call.error);
  }

  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
            int64_t ldb, T beta, T* C, int64_t ldc) const {
    lily::cpu::blocked_gemm<T>(*this, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  template <typename T>
  void gemm_batched(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b, T* C, int64_t ldc,
                    int64_t stride_c) const {
    lily::cpu::blocked_gemm_batched<T>(*this, trans_a, trans_b, batch, M, N, K, alpha, A, lda, stride_a, B, ldb,
                                       stride_b, C, ldc, stride_c);
  }
};

// Nonzero under `bits` (all ones for integers, all but the sign bit for
// floats): NaN counts and -0.0 does not, as in torch's mask != 0 and as the
// CUDA kernel's lily::cuda::mask_to_bytes.
template <typename U>
void nonzero_bits(const OrtApi* api, const OrtValue* value, int64_t n, bool is_float, uint8_t* dst) {
  const U* src = input_data<U>(api, value);
  const U all = static_cast<U>(~U(0));
  const U bits = is_float ? static_cast<U>(all >> 1) : all;
  for (int64_t i = 0; i < n; ++i) dst[i] = (src[i] & bits) != 0;
}

std::vector<uint8_t> mask_bytes(const OrtApi* api, const OrtValue* value, const TensorInfo& info) {
  const int64_t n = info.numel();
  std::vector<uint8_t> out(size_t(std::max<int64_t>(n, 1)));
  int bytes = 0;
  bool is_float = false;
  if (n == 0 || !mask_element(info.type, &bytes, &is_float)) return out;  // other types: rejected by prepare_call
  switch (bytes) {
    case 1:
      nonzero_bits<uint8_t>(api, value, n, is_float, out.data());
      break;
    case 2:
      nonzero_bits<uint16_t>(api, value, n, is_float, out.data());
      break;
    case 4:
      nonzero_bits<uint32_t>(api, value, n, is_float, out.data());
      break;
    default:
      nonzero_bits<uint64_t>(api, value, n, is_float, out.data());
      break;
  }
  return out;
}

// float16 / bfloat16 <-> float32 with ONNX Runtime's own conversions (onnxruntime_float16.h, round
// to nearest even), reached through its CRTP bases so that no C++ API object is needed.
struct Half : onnxruntime_float16::Float16Impl<Half> {
  static float to_float(uint16_t bits) {
    Half h;
    h.val = bits;
    return h.ToFloatImpl();
  }
  static uint16_t from_float(float v) { return ToUint16Impl(v); }
};

struct BFloat16 : onnxruntime_float16::BFloat16Impl<BFloat16> {
  static float to_float(uint16_t bits) {
    BFloat16 b;
    b.val = bits;
    return b.ToFloatImpl();
  }
  static uint16_t from_float(float v) { return ToUint16Impl(v); }
};

// Half-precision tensors are widened to float32 for the kernels.
template <typename Half16>
std::vector<float> widen(const uint16_t* src, int64_t n) {
  std::vector<float> out(size_t(std::max<int64_t>(n, 1)));
  for (int64_t i = 0; i < n; ++i) out[i] = Half16::to_float(src[i]);
  return out;
}

template <typename T>
void run(const RoutedMixKernel& k, OrtKernelContext* context, const lily::MixShape& s, const T* hidden, const T* router,
         const T* bank, const uint8_t* mask, T* delta) {
  const OrtCpuBackend be{k.api, context, k.use_pool};
  lily::cpu::routed_mix_forward<T>(be, s, static_cast<T>(k.scaling), hidden, router, bank, mask, delta);
}

}  // namespace

void compute_routed_mix_cpu(const RoutedMixKernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  const RoutedMixCall call = prepare_call(k, context);
  const lily::MixShape& s = call.shape;
  if (s.rows == 0) return;
  void* out_data = nullptr;
  check(api, api->GetTensorMutableData(call.output, &out_data));
  const OrtValue* const* values = call.values;

  std::vector<uint8_t> mask;
  if (call.has_mask) mask = mask_bytes(api, values[3], call.info[3]);
  const uint8_t* m = call.has_mask ? mask.data() : nullptr;

  switch (k.type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      run<float>(k, context, s, input_data<float>(api, values[0]), input_data<float>(api, values[1]),
                 input_data<float>(api, values[2]), m, static_cast<float*>(out_data));
      break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
      run<double>(k, context, s, input_data<double>(api, values[0]), input_data<double>(api, values[1]),
                  input_data<double>(api, values[2]), m, static_cast<double*>(out_data));
      break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: {
      const bool f16 = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      auto to_float = [&](int i) {
        const uint16_t* src = input_data<uint16_t>(api, values[i]);
        const int64_t n = call.info[i].numel();
        return f16 ? widen<Half>(src, n) : widen<BFloat16>(src, n);
      };
      const std::vector<float> h = to_float(0), R = to_float(1), B = to_float(2);
      std::vector<float> delta(size_t(s.rows * s.out));
      run<float>(k, context, s, h.data(), R.data(), B.data(), m, delta.data());
      uint16_t* dst = static_cast<uint16_t*>(out_data);
      for (size_t i = 0; i < delta.size(); ++i)
        dst[i] = f16 ? Half::from_float(delta[i]) : BFloat16::from_float(delta[i]);
      break;
    }
    default:
      throw Error{ORT_INVALID_ARGUMENT, "hidden: unsupported dtype " + type_name(k.type)};
  }
}

}  // namespace lily_ort
