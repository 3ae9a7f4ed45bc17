// Helpers shared by the ONNX Runtime kernels of lily_ort: statuses, tensor
// access, element types. Only the ORT C API (onnxruntime_c_api.h) is used; the
// library gets the API table from RegisterCustomOps and links no ORT library.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lily_ort {

// An error to hand back to ORT as an OrtStatus; thrown inside kernels and
// turned into a status at the C boundary (see guarded()).
struct Error {
  OrtErrorCode code;
  std::string message;
};

inline std::string type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
      return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
      return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
      return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
      return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16:
      return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16:
      return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32:
      return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64:
      return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING:
      return "string";
    default:
      return "element type " + std::to_string(int(t));
  }
}

// Throws Error when an ORT call failed, keeping ORT's message.
inline void check(const OrtApi* api, OrtStatus* status) {
  if (status == nullptr) return;
  Error e{api->GetErrorCode(status), api->GetErrorMessage(status)};
  api->ReleaseStatus(status);
  throw e;
}

// Element type and dims of one tensor input.
struct TensorInfo {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

inline TensorInfo tensor_info(const OrtApi* api, const OrtValue* value, const char* name) {
  int is_tensor = 0;
  check(api, api->IsTensor(value, &is_tensor));
  if (!is_tensor) throw Error{ORT_INVALID_ARGUMENT, std::string(name) + ": expected a tensor"};
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(api, api->GetTensorTypeAndShape(value, &info));
  TensorInfo out;
  size_t rank = 0;
  OrtStatus* status = api->GetTensorElementType(info, &out.type);
  if (status == nullptr) status = api->GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    out.dims.resize(rank);
    status = api->GetDimensions(info, out.dims.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  check(api, status);
  return out;
}

// Read-only data of an input (the 1.16-era C API has only the mutable getter).
template <typename T>
const T* input_data(const OrtApi* api, const OrtValue* value) {
  void* data = nullptr;
  check(api, api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  return static_cast<const T*>(data);
}

}  // namespace lily_ort
