// lily.RoutedMix for ONNX Runtime's CUDA execution provider, forward only: a
// thin binding of the framework-free CUDA kernels (csrc/cuda/routed_mix_cuda.h,
// the same the torch op runs) to the ORT C API. The op definition and input
// checks are shared with the CPU kernel (routed_mix_op.cpp). Inputs and output
// are in device memory (ORT copies graph inputs there); everything is enqueued
// on ORT's compute stream and nothing synchronizes.
//
// - stream: KernelContext_GetGPUComputeStream (the C API route; Debian's
//   headers have no cuda_context.h).
// - device: the one holding the tensors, made current for the call (ORT's
//   thread may have another one current) and put back afterwards.
// - scratch: one KernelContext_GetScratchBuffer allocation on that stream
//   (byte mask, kernel workspace, cuBLAS workspace), returned to the same
//   allocator right after the launches, as ORT's own CUDA kernels do: ORT's
//   allocator hands a block freed this way to another stream only once that is
//   safe.
// - cuBLAS: handles from a per-device pool, each lent to one Compute call at a
//   time (ORT may run several at once: concurrent Run calls, several
//   sessions), bound for the call to ORT's stream and to a workspace carved
//   from the scratch, since a handle's default workspace would be shared by
//   every stream the handle ever served. Calls whose shape needs no cuBLAS
//   (small N, the tiled per-row kernel) borrow no handle.
// - precision: pooled handles are created with the math mode of the precision
//   policy (lily::cuda::kBlasMathMode: no TF32, no reduced-precision split-K
//   reductions for float16 / bfloat16), and the CUDA layer pins that mode for
//   each call as well: ORT runs the same math as the torch op
//   (routed_mix_cuda.h).
// - cuBLAS workspace: each call binds NVIDIA's recommended size (32 MiB on
//   Hopper and later, 4 MiB before) from its own scratch, whatever the shape.
//   That bound is per call, not per stream: N concurrent Compute calls hold N
//   such workspaces for their duration (ORT's arena reuses them afterwards).
//   It keeps concurrent calls bitwise equal to a lone one (cuBLAS picks its
//   algorithm, and so its reduction order, partly by the workspace it is
//   given, so every call gets the same size), at the price of that memory.
//
// Every CUDA / cuBLAS status is checked and becomes an ORT error status.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/routed_mix_cuda.h"
#include "ort/routed_mix_ops.h"

namespace lily_ort {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error{ORT_FAIL,
                std::string(what) + " failed: " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")"};
}

void check_blas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw Error{ORT_FAIL, std::string(what) + " failed: " + cublasGetStatusName(status) + " (" +
                              cublasGetStatusString(status) + ")"};
}

// The csrc/cuda functions report failures as messages ("" = success).
void check_kernel(const std::string& error) {
  if (!error.empty()) throw Error{ORT_FAIL, "CUDA: " + error};
}

// Makes `device` current for the call and puts the caller's device back.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Idle cuBLAS handles per device. Created on first need; never destroyed: ORT
// may run sessions until process exit, when the CUDA runtime can already be
// gone before this library's static destructors run.
class HandlePool {
 public:
  cublasHandle_t take(int device) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::vector<cublasHandle_t>& idle = idle_[device];
      if (!idle.empty()) {
        cublasHandle_t handle = idle.back();
        idle.pop_back();
        return handle;
      }
    }
    cublasHandle_t handle = nullptr;  // created outside the lock: cublasCreate is slow
    check_blas(cublasCreate(&handle), "cublasCreate");
    // the precision policy, explicitly (the CUDA layer also pins it per call)
    const cublasStatus_t status = cublasSetMathMode(handle, lily::cuda::kBlasMathMode);
    if (status != CUBLAS_STATUS_SUCCESS) {
      cublasDestroy(handle);
      check_blas(status, "cublasSetMathMode");
    }
    return handle;
  }

  void give_back(int device, cublasHandle_t handle) noexcept {
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_[device].push_back(handle);
    } catch (...) {
      // out of memory for the list: the handle is dropped, not lost to a crash
    }
  }

 private:
  std::mutex mutex_;
  std::map<int, std::vector<cublasHandle_t>> idle_;
};

HandlePool& handle_pool() {
  static HandlePool* pool = new HandlePool;  // deliberately leaked, see HandlePool
  return *pool;
}

// A pooled handle bound, for one call, to ORT's stream and to a workspace in
// the call's scratch. The current device must be `device` (DeviceScope).
class BoundHandle {
 public:
  BoundHandle(int device, cudaStream_t stream, void* workspace, size_t workspace_bytes)
      : device_(device), handle_(handle_pool().take(device)) {
    try {
      check_blas(cublasGetStream(handle_, &previous_), "cublasGetStream");
      check_blas(cublasSetStream(handle_, stream), "cublasSetStream");
      // after cublasSetStream, which resets the workspace to the handle's default
      check_blas(cublasSetWorkspace(handle_, workspace, workspace_bytes), "cublasSetWorkspace");
    } catch (...) {
      release();
      throw;
    }
  }
  ~BoundHandle() { release(); }
  BoundHandle(const BoundHandle&) = delete;
  BoundHandle& operator=(const BoundHandle&) = delete;
  cublasHandle_t get() const { return handle_; }

 private:
  // Back to the previous stream, which also unbinds our workspace (the scratch
  // goes back to ORT after the call). A handle that cannot be reset is dropped
  // rather than lent out still pointing at freed memory.
  void release() noexcept {
    if (cublasSetStream(handle_, previous_) == CUBLAS_STATUS_SUCCESS) handle_pool().give_back(device_, handle_);
  }

  int device_;
  cublasHandle_t handle_;
  cudaStream_t previous_ = nullptr;
};

// Device scratch for one call from ORT's allocator, tied to the kernel's stream.
class Scratch {
 public:
  Scratch(const OrtApi* api, OrtKernelContext* context, const OrtMemoryInfo* memory, size_t bytes) : api_(api) {
    if (bytes == 0) return;
    check(api, api->KernelContext_GetAllocator(context, memory, &allocator_));
    try {
      void* data = nullptr;
      check(api, api->KernelContext_GetScratchBuffer(context, memory, bytes, &data));
      data_ = static_cast<char*>(data);
      if (data_ == nullptr)
        throw Error{ORT_FAIL, "ONNX Runtime gave no CUDA scratch buffer of " + std::to_string(bytes) + " bytes"};
    } catch (...) {
      api_->ReleaseAllocator(allocator_);
      throw;
    }
  }
  ~Scratch() {
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    if (allocator_ != nullptr) api_->ReleaseAllocator(allocator_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* data() const { return data_; }

 private:
  const OrtApi* api_;
  OrtAllocator* allocator_ = nullptr;
  char* data_ = nullptr;
};

lily::cuda::DType cuda_dtype(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return lily::cuda::DType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
      return lily::cuda::DType::kFloat64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return lily::cuda::DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return lily::cuda::DType::kBFloat16;
    default:
      throw Error{ORT_INVALID_ARGUMENT, "hidden: unsupported dtype " + type_name(t)};
  }
}

// The CUDA device of an input; Error naming it when it is not in CUDA device memory.
int device_of(const OrtApi* api, const OrtValue* value, const char* name) {
  const OrtMemoryInfo* memory = nullptr;
  check(api, api->GetTensorMemoryInfo(value, &memory));
  OrtMemoryInfoDeviceType type = OrtMemoryInfoDeviceType_CPU;
  api->MemoryInfoGetDeviceType(memory, &type);
  if (type != OrtMemoryInfoDeviceType_GPU)
    throw Error{ORT_INVALID_ARGUMENT, std::string(name) + ": expected a tensor in CUDA device memory"};
  int id = 0;
  check(api, api->MemoryInfoGetId(memory, &id));
  return id;
}

size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

}  // namespace

void compute_routed_mix_cuda(const RoutedMixKernel& k, OrtKernelContext* context) {
  const OrtApi* api = k.api;
  const RoutedMixCall call = prepare_call(k, context);
  const lily::MixShape& s = call.shape;
  if (s.rows == 0) return;  // an empty output: nothing to launch
  const lily::cuda::DType dtype = cuda_dtype(k.type);

  const int device = device_of(api, call.values[0], "hidden");
  for (int i = 1; i < 4; ++i) {
    if (call.values[i] == nullptr) continue;
    const int other = device_of(api, call.values[i], kInputNames[i]);
    if (other != device)
      throw Error{ORT_INVALID_ARGUMENT, std::string(kInputNames[i]) + ": on CUDA device " + std::to_string(other) +
                                            ", hidden on device " + std::to_string(device)};
  }
  void* stream_handle = nullptr;
  check(api, api->KernelContext_GetGPUComputeStream(context, &stream_handle));
  if (stream_handle == nullptr) throw Error{ORT_FAIL, "ONNX Runtime gave the CUDA kernel no compute stream"};
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const OrtMemoryInfo* out_memory = nullptr;  // where ORT put the output: the scratch goes there too
  check(api, api->GetTensorMemoryInfo(call.output, &out_memory));
  void* delta = nullptr;
  check(api, api->GetTensorMutableData(call.output, &delta));

  const DeviceScope device_scope(device);  // the sizes below depend on the current device
  // One scratch block, 256-byte aligned pieces: [byte mask | kernel workspace | cuBLAS workspace].
  const size_t mask_bytes = call.has_mask ? align256(static_cast<size_t>(s.rows)) : 0;
  const lily::cuda::CallPlan plan = lily::cuda::plan_forward_call(s, dtype);
  const size_t kernel_bytes = align256(plan.workspace_bytes);
  const size_t blas_bytes = plan.uses_blas ? plan.blas_workspace_bytes : 0;
  const Scratch scratch(api, context, out_memory, mask_bytes + kernel_bytes + blas_bytes);

  uint8_t* mask = nullptr;
  if (call.has_mask) {
    int elem_bytes = 0;
    bool is_float = false;
    mask_element(call.info[3].type, &elem_bytes, &is_float);  // a mask type: checked by prepare_call
    mask = reinterpret_cast<uint8_t*>(scratch.data());
    check_kernel(
        lily::cuda::mask_to_bytes(input_data<void>(api, call.values[3]), s.rows, elem_bytes, is_float, mask, stream));
  }
  std::unique_ptr<BoundHandle> blas;
  if (blas_bytes > 0)
    blas = std::make_unique<BoundHandle>(device, stream, scratch.data() + mask_bytes + kernel_bytes, blas_bytes);
  check_kernel(lily::cuda::routed_mix_forward(
      s, dtype, static_cast<double>(k.scaling), input_data<void>(api, call.values[0]),
      input_data<void>(api, call.values[1]), input_data<void>(api, call.values[2]), mask, delta,
      kernel_bytes > 0 ? scratch.data() + mask_bytes : nullptr, kernel_bytes, stream, blas ? blas->get() : nullptr));
}

}  // namespace lily_ort
