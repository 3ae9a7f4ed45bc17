// Entry point of liblily_ort.so: ONNX Runtime calls RegisterCustomOps when a
// session registers the library (SessionOptions.register_custom_ops_library
// in Python, RegisterCustomOpsLibrary in C). It adds the `lily` domain: the
// CPU execution provider's kernels and, when the library is built with CUDA
// (LILY_ORT_WITH_CUDA), the CUDA execution provider's. A session without the
// CUDA EP simply never picks the latter.
//
// The library is compiled against the C API headers of some ORT release and
// may run under a newer or older one: it asks the runtime for the newest API
// version both know, so headers of 1.21 serve a 1.31 runtime.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <string>

#include "routed_mix_ops.h"

namespace lily_ort {
namespace {

// CreateKernelV2 / KernelComputeV2 (error statuses instead of exceptions) need C API 16.
constexpr uint32_t kMinApiVersion = 16;
// KernelContext_ParallelFor (ORT's intra-op thread pool) needs C API 17.
constexpr uint32_t kThreadPoolApiVersion = 17;
// The CUDA kernel takes its device scratch from KernelContext_GetScratchBuffer
// (C API 18); older runtimes get the CPU kernels only.
constexpr uint32_t kCudaApiVersion = 18;

constexpr ONNXTensorElementDataType kTypes[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16};
constexpr size_t kNumTypes = sizeof(kTypes) / sizeof(kTypes[0]);

#ifdef LILY_ORT_WITH_CUDA
constexpr size_t kMaxOps = 2 * kNumTypes;
#else
constexpr size_t kMaxOps = kNumTypes;
#endif

struct Library {
  const OrtApi* api = nullptr;
  uint32_t api_version = 0;
  RoutedMixOp ops[kMaxOps];
  size_t num_ops = 0;
  OrtCustomOpDomain* domain = nullptr;
};

std::mutex g_mutex;
// Built on the first registration and shared by every session of the process.
// Deliberately never freed: sessions keep pointers to the domain's ops, and
// at process exit ORT's own teardown may still run after this library's.
Library* g_library = nullptr;

// C API version of the running ORT: for 1.x releases it equals the minor version.
uint32_t runtime_api_version(const OrtApiBase* base) {
  const char* version = base->GetVersionString ? base->GetVersionString() : nullptr;
  unsigned major = 0, minor = 0;
  if (version == nullptr || std::sscanf(version, "%u.%u", &major, &minor) != 2) return ORT_API_VERSION;
  return major == 1 ? minor : ORT_API_VERSION;
}

OrtStatus* create_library(const OrtApiBase* base, Library** out) {
  const uint32_t wanted = std::min<uint32_t>(ORT_API_VERSION, runtime_api_version(base));
  const OrtApi* api = nullptr;
  uint32_t version = wanted;
  for (; version >= kMinApiVersion && api == nullptr; --version) api = base->GetApi(version);
  ++version;  // the loop stepped one past the version that answered
  if (api == nullptr) {
    const OrtApi* any = base->GetApi(1);
    const std::string message = std::string("lily_ort needs ONNX Runtime >= 1.") + std::to_string(kMinApiVersion) +
                                ", this process runs " + (base->GetVersionString ? base->GetVersionString() : "?");
    return any ? any->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  auto* lib = new Library;
  lib->api = api;
  lib->api_version = version;
  for (size_t i = 0; i < kNumTypes; ++i)
    init_routed_mix_op(&lib->ops[lib->num_ops++], kTypes[i], version, "CPUExecutionProvider", compute_routed_mix_cpu,
                       version >= kThreadPoolApiVersion);
#ifdef LILY_ORT_WITH_CUDA
  if (version >= kCudaApiVersion)
    for (size_t i = 0; i < kNumTypes; ++i)
      init_routed_mix_op(&lib->ops[lib->num_ops++], kTypes[i], version, "CUDAExecutionProvider",
                         compute_routed_mix_cuda, false);
#endif
  OrtStatus* status = api->CreateCustomOpDomain("lily", &lib->domain);
  for (size_t i = 0; i < lib->num_ops && status == nullptr; ++i)
    status = api->CustomOpDomain_Add(lib->domain, &lib->ops[i]);
  if (status != nullptr) {
    if (lib->domain) api->ReleaseCustomOpDomain(lib->domain);
    delete lib;
    return status;
  }
  *out = lib;
  return nullptr;
}

}  // namespace
}  // namespace lily_ort

// ORT_EXPORT is empty on Linux; the library is built with hidden visibility.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace lily_ort;
  if (api_base == nullptr) return nullptr;  // nothing to report through
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_library == nullptr) {
    OrtStatus* status = create_library(api_base, &g_library);
    if (status != nullptr || g_library == nullptr) return status;
  }
  return g_library->api->AddCustomOpDomain(options, g_library->domain);
}
