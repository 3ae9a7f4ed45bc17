// The OrtCustomOp definitions of lily.RoutedMix (routed_mix_cpu.cpp), set up by
// RegisterCustomOps (register.cpp).
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>

namespace lily_ort {

// One op per element type of `hidden`; ORT merges ops of the same name into one schema.
struct RoutedMixOp : OrtCustomOp {
  ONNXTensorElementDataType type;
  bool use_thread_pool;  // the runtime has KernelContext_ParallelFor (C API >= 17)
};

// `api_version`: the C API version negotiated with the running ORT (>= 16).
void init_routed_mix_op(RoutedMixOp* op, ONNXTensorElementDataType type, uint32_t api_version, bool use_thread_pool);

}  // namespace lily_ort
