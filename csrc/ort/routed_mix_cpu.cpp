// lily.RoutedMix for ONNX Runtime's CPU execution provider: a thin binding of
// the framework-free kernels (csrc/lily/cpu_routed_mix.h) to the ORT C API.
//
// One OrtCustomOp per element type of `hidden` (float32, float64, float16,
// bfloat16); ORT merges them into one schema and picks the kernel from
// hidden's type, which also fixes the output type. router, bank and mask
// accept any type at graph level, so a mismatch reaches the kernel and gets
// the contract's message naming the argument instead of ORT's generic "no
// kernel found".
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "../lily/contract.h"
#include "../lily/cpu_gemm.h"
#include "../lily/cpu_routed_mix.h"
#include "half.h"
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
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
            const T* B, int64_t ldb, T beta, T* C, int64_t ldc) const {
    lily::cpu::blocked_gemm<T>(*this, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  template <typename T>
  void gemm_batched(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, T alpha,
                    const T* A, int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b, T* C,
                    int64_t ldc, int64_t stride_c) const {
    lily::cpu::blocked_gemm_batched<T>(*this, trans_a, trans_b, batch, M, N, K, alpha, A, lda, stride_a, B, ldb,
                                       stride_b, C, ldc, stride_c);
  }
};

struct RoutedMixKernel {
  const OrtApi* api;
  ONNXTensorElementDataType type;
  bool use_pool;
  std::string mode;
  float scaling;
};

bool is_mask_type(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return true;
    default:
      return false;
  }
}

template <typename M>
void nonzero_bytes(const M* src, int64_t n, uint8_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] != M(0);
}

// Nonzero entries are the tokens that count (NaN counts, as in torch's mask != 0).
std::vector<uint8_t> mask_bytes(const OrtApi* api, const OrtValue* value, const TensorInfo& info) {
  const int64_t n = info.numel();
  std::vector<uint8_t> out(size_t(std::max<int64_t>(n, 1)));
  if (n == 0) return out;
  switch (info.type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: nonzero_bytes(input_data<uint8_t>(api, value), n, out.data()); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: nonzero_bytes(input_data<uint16_t>(api, value), n, out.data()); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: nonzero_bytes(input_data<uint32_t>(api, value), n, out.data()); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: nonzero_bytes(input_data<uint64_t>(api, value), n, out.data()); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: nonzero_bytes(input_data<float>(api, value), n, out.data()); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: nonzero_bytes(input_data<double>(api, value), n, out.data()); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: {
      // any bit set outside the sign is nonzero (NaN included)
      const uint16_t* src = input_data<uint16_t>(api, value);
      for (int64_t i = 0; i < n; ++i) out[i] = (src[i] & 0x7fffu) != 0;
      break;
    }
    default: break;  // rejected by the caller
  }
  return out;
}

// Half-precision tensors are widened to float32 for the kernels.
template <float (*To)(uint16_t)>
std::vector<float> widen(const uint16_t* src, int64_t n) {
  std::vector<float> out(size_t(std::max<int64_t>(n, 1)));
  for (int64_t i = 0; i < n; ++i) out[i] = To(src[i]);
  return out;
}

template <typename T>
void run(const RoutedMixKernel& k, OrtKernelContext* context, const lily::MixShape& s, const T* hidden,
         const T* router, const T* bank, const uint8_t* mask, T* delta) {
  const OrtCpuBackend be{k.api, context, k.use_pool};
  lily::cpu::routed_mix_forward<T>(be, s, static_cast<T>(k.scaling), hidden, router, bank, mask, delta);
}

void compute(const RoutedMixKernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  size_t inputs = 0;
  check(api, api->KernelContext_GetInputCount(context, &inputs));
  const char* names[] = {"hidden", "router", "bank", "mask"};
  const OrtValue* values[4] = {nullptr, nullptr, nullptr, nullptr};
  TensorInfo info[4];
  for (size_t i = 0; i < 4 && i < inputs; ++i) {
    check(api, api->KernelContext_GetInput(context, i, &values[i]));
    if (values[i] == nullptr) {
      if (i == 3) continue;  // the optional mask, given as ""
      throw Error{ORT_INVALID_ARGUMENT, std::string(names[i]) + ": missing required input"};
    }
    info[i] = tensor_info(api, values[i], names[i]);
  }
  for (int i = 1; i <= 2; ++i)
    if (info[i].type != info[0].type)
      throw Error{ORT_INVALID_ARGUMENT, std::string(names[i]) + ": dtype " + type_name(info[i].type) +
                                            " differs from hidden's dtype " + type_name(info[0].type)};
  const bool has_mask = values[3] != nullptr;
  if (has_mask && !is_mask_type(info[3].type))
    throw Error{ORT_INVALID_ARGUMENT,
                "mask: expected a bool, integer or float tensor, got " + type_name(info[3].type)};

  lily::MixShape s;
  const std::string problem =
      lily::check_shapes(k.mode, info[0].dims, info[1].dims, info[2].dims, has_mask ? &info[3].dims : nullptr, &s);
  if (!problem.empty()) throw Error{ORT_INVALID_ARGUMENT, problem};

  std::vector<int64_t> out_dims = info[0].dims;
  out_dims.back() = s.out;
  OrtValue* output = nullptr;
  check(api, api->KernelContext_GetOutput(context, 0, out_dims.data(), out_dims.size(), &output));
  if (s.rows == 0) return;
  void* out_data = nullptr;
  check(api, api->GetTensorMutableData(output, &out_data));

  std::vector<uint8_t> mask;
  if (has_mask) mask = mask_bytes(api, values[3], info[3]);
  const uint8_t* m = has_mask ? mask.data() : nullptr;

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
        return f16 ? widen<half_to_float>(src, info[i].numel()) : widen<bfloat16_to_float>(src, info[i].numel());
      };
      const std::vector<float> h = to_float(0), R = to_float(1), B = to_float(2);
      std::vector<float> delta(size_t(s.rows * s.out));
      run<float>(k, context, s, h.data(), R.data(), B.data(), m, delta.data());
      uint16_t* dst = static_cast<uint16_t*>(out_data);
      for (size_t i = 0; i < delta.size(); ++i) dst[i] = f16 ? float_to_half(delta[i]) : float_to_bfloat16(delta[i]);
      break;
    }
    default:
      throw Error{ORT_INVALID_ARGUMENT, "hidden: unsupported dtype " + type_name(k.type)};
  }
}

// Runs `body` and turns any failure into an OrtStatus: nothing may unwind into ORT.
template <class F>
OrtStatus* guarded(const OrtApi* api, const F& body) {
  try {
    body();
    return nullptr;
  } catch (const Error& e) {
    return api->CreateStatus(e.code, ("lily.RoutedMix: " + e.message).c_str());
  } catch (const std::bad_alloc&) {
    return api->CreateStatus(ORT_FAIL, "lily.RoutedMix: out of memory");
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string("lily.RoutedMix: ") + e.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION, "lily.RoutedMix: unknown error");
  }
}

// Reads an optional attribute: false when absent, Error when present with another type.
bool string_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  OrtStatus* status = api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status == nullptr) {
    std::string value(size, '\0');
    check(api, api->KernelInfoGetAttribute_string(info, name, &value[0], &size));
    value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
    *out = value;
    return true;
  }
  api->ReleaseStatus(status);
  int64_t i = 0;
  float f = 0;
  OrtStatus* as_int = api->KernelInfoGetAttribute_int64(info, name, &i);
  OrtStatus* as_float = api->KernelInfoGetAttribute_float(info, name, &f);
  const bool other_type = as_int == nullptr || as_float == nullptr;
  if (as_int) api->ReleaseStatus(as_int);
  if (as_float) api->ReleaseStatus(as_float);
  if (other_type) throw Error{ORT_INVALID_ARGUMENT, std::string(name) + ": expected a string attribute"};
  return false;
}

bool float_attribute(const OrtApi* api, const OrtKernelInfo* info, const char* name, float* out) {
  OrtStatus* status = api->KernelInfoGetAttribute_float(info, name, out);
  if (status == nullptr) return true;
  api->ReleaseStatus(status);
  int64_t i = 0;
  OrtStatus* as_int = api->KernelInfoGetAttribute_int64(info, name, &i);
  size_t size = 0;
  OrtStatus* as_string = api->KernelInfoGetAttribute_string(info, name, nullptr, &size);
  const bool other_type = as_int == nullptr || as_string == nullptr;
  if (as_int) api->ReleaseStatus(as_int);
  if (as_string) api->ReleaseStatus(as_string);
  if (other_type) throw Error{ORT_INVALID_ARGUMENT, std::string(name) + ": expected a float attribute"};
  return false;
}

// ---- OrtCustomOp callbacks ----

const RoutedMixOp& self(const OrtCustomOp* op) { return *static_cast<const RoutedMixOp*>(op); }

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                      void** kernel) {
  *kernel = nullptr;
  return guarded(api, [&] {
    auto k = std::make_unique<RoutedMixKernel>();
    k->api = api;
    k->type = self(op).type;
    k->use_pool = self(op).use_thread_pool;
    k->mode = "batch";
    k->scaling = 1.0f;
    string_attribute(api, info, "mode", &k->mode);
    lily::Mode mode;
    if (!lily::parse_mode(k->mode, &mode)) throw Error{ORT_INVALID_ARGUMENT, lily::bad_mode_message(k->mode)};
    float_attribute(api, info, "scaling", &k->scaling);
    if (!std::isfinite(k->scaling))
      throw Error{ORT_INVALID_ARGUMENT, "scaling: expected a finite float, got " + std::to_string(k->scaling)};
    *kernel = k.release();
  });
}

OrtStatus* ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* context) {
  const auto& k = *static_cast<const RoutedMixKernel*>(kernel);
  return guarded(k.api, [&] { compute(k, context); });
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<RoutedMixKernel*>(kernel); }

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "RoutedMix"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }

ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp* op, size_t index) {
  return index == 0 ? self(op).type : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 4; }
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t) { return self(op).type; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }

OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t index) {
  return index == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL variadic_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL variadic_homogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return std::numeric_limits<int>::max(); }
size_t ORT_API_CALL no_index_map(int** input_index, int** output_index) {
  *input_index = nullptr;
  *output_index = nullptr;
  return 0;
}
void ORT_API_CALL release_index_map(int*, int*) {}

}  // namespace

void init_routed_mix_op(RoutedMixOp* op, ONNXTensorElementDataType type, uint32_t api_version, bool use_thread_pool) {
  OrtCustomOp& o = *op;
  o = OrtCustomOp{};  // every callback this API version does not need stays null
  o.version = api_version;
  o.GetName = op_name;
  o.GetExecutionProviderType = op_provider;
  o.GetInputType = input_type;
  o.GetInputTypeCount = input_count;
  o.GetOutputType = output_type;
  o.GetOutputTypeCount = output_count;
  o.KernelDestroy = destroy_kernel;
  o.GetInputCharacteristic = input_characteristic;
  o.GetOutputCharacteristic = output_characteristic;
  o.GetInputMemoryType = input_memory_type;
  o.GetVariadicInputMinArity = variadic_min_arity;
  o.GetVariadicInputHomogeneity = variadic_homogeneity;
  o.GetVariadicOutputMinArity = variadic_min_arity;
  o.GetVariadicOutputHomogeneity = variadic_homogeneity;
  o.CreateKernelV2 = create_kernel;
  o.KernelComputeV2 = compute_kernel;
  // No InferOutputShapeFn: ORT's wrapper around it dereferences the type of
  // every node input, which is null for an omitted optional mask (""), and
  // the output type already follows from the kernel picked by hidden's type.
  o.GetStartVersion = start_version;
  o.GetEndVersion = end_version;
  o.GetMayInplace = no_index_map;
  o.ReleaseMayInplace = release_index_map;
  o.GetAliasMap = no_index_map;
  o.ReleaseAliasMap = release_index_map;
  op->type = type;
  op->use_thread_pool = use_thread_pool;
}

}  // namespace lily_ort
