// lily.RoutedMix for ONNX Runtime: the op definition shared by every
// execution provider (routed_mix_op.cpp: name, inputs, types, attributes,
// input validation through the contract, the error boundary) and the one
// function each provider supplies (routed_mix_cpu.cpp, cuda/routed_mix_cuda.cpp).
// RegisterCustomOps (register.cpp) sets them up.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lily/contract.h"
#include "ort_common.h"

namespace lily_ort {

struct RoutedMixKernel;
// Runs one call; throws Error (see ort_common.h), never lets anything else escape
// unhandled into ORT (the caller turns every exception into an OrtStatus).
using ComputeFn = void (*)(const RoutedMixKernel& kernel, OrtKernelContext* context);

// One op per (execution provider, element type of `hidden`); ORT merges ops of
// the same name into one schema and picks the kernel by provider and type.
struct RoutedMixOp : OrtCustomOp {
  ONNXTensorElementDataType type;
  bool use_thread_pool;  // CPU: the runtime has KernelContext_ParallelFor (C API >= 17)
  const char* provider;  // "CPUExecutionProvider", "CUDAExecutionProvider"
  ComputeFn compute;
};

// A kernel instance (one per node): the attributes, read and checked once.
struct RoutedMixKernel {
  const OrtApi* api;
  ONNXTensorElementDataType type;
  bool use_pool;
  std::string mode;
  float scaling;
  ComputeFn compute;
};

// The inputs of one call, checked against the contract, and its output.
struct RoutedMixCall {
  const OrtValue* values[4] = {nullptr, nullptr, nullptr, nullptr};  // hidden, router, bank, mask (or null)
  TensorInfo info[4];
  bool has_mask = false;
  lily::MixShape shape;
  OrtValue* output = nullptr;
};

extern const char* const kInputNames[4];  // "hidden", "router", "bank", "mask"

// Reads the inputs, checks dtypes and shapes (lily::check_shapes) and allocates
// the output; throws Error naming the bad argument. Shared by every provider.
RoutedMixCall prepare_call(const RoutedMixKernel& kernel, OrtKernelContext* context);

// Element size and kind of a mask type (bool, any integer, any float); false for
// other types. Nonzero elements are the tokens that count (NaN counts; -0.0 does not).
bool mask_element(ONNXTensorElementDataType type, int* bytes, bool* is_float);

// `api_version`: the C API version negotiated with the running ORT (>= 16).
void init_routed_mix_op(RoutedMixOp* op, ONNXTensorElementDataType type, uint32_t api_version, const char* provider,
                        ComputeFn compute, bool use_thread_pool);

// The providers' compute functions.
void compute_routed_mix_cpu(const RoutedMixKernel& kernel, OrtKernelContext* context);
#ifdef LILY_ORT_WITH_CUDA
void compute_routed_mix_cuda(const RoutedMixKernel& kernel, OrtKernelContext* context);
#endif

}  // namespace lily_ort
