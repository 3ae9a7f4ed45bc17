// lily.RoutedMix: what every execution provider's kernel shares (see
// routed_mix_ops.h). The OrtCustomOp callbacks, the attributes, the input
// checks (the contract's lily::check_shapes, so the messages are the torch
// op's) and the boundary that turns any failure into an OrtStatus.
//
// router, bank and mask accept any type at graph level, so a mismatch reaches
// the kernel and gets the contract's message naming the argument instead of
// ORT's generic "no kernel found".
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <string>

#include "routed_mix_ops.h"

namespace lily_ort {

const char* const kInputNames[4] = {"hidden", "router", "bank", "mask"};

bool mask_element(ONNXTensorElementDataType type, int* bytes, bool* is_float) {
  *is_float = false;
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
      *bytes = 1;
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16:
      *bytes = 2;
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      *bytes = 4;
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      *bytes = 8;
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      *bytes = 2;
      *is_float = true;
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      *bytes = 4;
      *is_float = true;
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
      *bytes = 8;
      *is_float = true;
      return true;
    default:
      return false;
  }
}

RoutedMixCall prepare_call(const RoutedMixKernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  RoutedMixCall call;
  size_t inputs = 0;
  check(api, api->KernelContext_GetInputCount(context, &inputs));
  for (size_t i = 0; i < 4 && i < inputs; ++i) {
    check(api, api->KernelContext_GetInput(context, i, &call.values[i]));
    if (call.values[i] == nullptr) {
      if (i == 3) continue;  // the optional mask, given as ""
      throw Error{ORT_INVALID_ARGUMENT, std::string(kInputNames[i]) + ": missing required input"};
    }
    call.info[i] = tensor_info(api, call.values[i], kInputNames[i]);
  }
  for (int i = 1; i <= 2; ++i)
    if (call.info[i].type != call.info[0].type)
      throw Error{ORT_INVALID_ARGUMENT, std::string(kInputNames[i]) + ": dtype " + type_name(call.info[i].type) +
                                            " differs from hidden's dtype " + type_name(call.info[0].type)};
  call.has_mask = call.values[3] != nullptr;
  int mask_bytes = 0;
  bool mask_float = false;
  if (call.has_mask && !mask_element(call.info[3].type, &mask_bytes, &mask_float))
    throw Error{ORT_INVALID_ARGUMENT,
                "mask: expected a bool, integer or float tensor, got " + type_name(call.info[3].type)};

  const std::string problem = lily::check_shapes(k.mode, call.info[0].dims, call.info[1].dims, call.info[2].dims,
                                                 call.has_mask ? &call.info[3].dims : nullptr, &call.shape);
  if (!problem.empty()) throw Error{ORT_INVALID_ARGUMENT, problem};

  std::vector<int64_t> out_dims = call.info[0].dims;
  out_dims.back() = call.shape.out;
  check(api, api->KernelContext_GetOutput(context, 0, out_dims.data(), out_dims.size(), &call.output));
  if (call.output == nullptr) throw Error{ORT_FAIL, "delta: ONNX Runtime could not allocate the output"};
  return call;
}

namespace {

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
    k->compute = self(op).compute;
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
  return guarded(k.api, [&] { k.compute(k, context); });
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<RoutedMixKernel*>(kernel); }

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "RoutedMix"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp* op) { return self(op).provider; }

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
// Every input lives where the provider computes (device memory for CUDA).
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

void init_routed_mix_op(RoutedMixOp* op, ONNXTensorElementDataType type, uint32_t api_version, const char* provider,
                        ComputeFn compute, bool use_thread_pool) {
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
  op->provider = provider;
  op->compute = compute;
}

}  // namespace lily_ort
