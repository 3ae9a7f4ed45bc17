// CPU stand-ins for the CUDA runtime and cuBLAS calls the drivers make, for the
// emulation (see include/emu.h). The GEMMs follow cuBLAS's column-major
// contract literally (op(A) m x k, op(B) k x n, leading dimensions, strides,
// beta == 0 never reads C), so the drivers' row-major-to-cuBLAS mapping is
// what gets checked; leading dimensions are validated like cuBLAS does.
//
// Also emulated, for the policy checks of the harness: the handle's math mode
// (cublasGet/SetMathMode; CUBLAS_TF32_TENSOR_OP_MATH with CUBLAS_COMPUTE_32F
// rounds float32 inputs to TF32, as the tensor cores would) with a record of
// the math mode and compute type of every GEMM; a null handle is rejected; the
// runtime's pending-error state (cudaGetLastError / cudaPeekAtLastError, sticky
// errors); and two devices (0: compute capability 9.0, 1: 7.5) with a count of
// the attribute queries.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
// emu_switch(void** from, void* to), the fibers' stack switch (include/emu.h): the System V
// callee-saved registers go onto the current stack, whose pointer is stored in *from; the
// stack at `to` gets its registers back and returns to where it switched away (or, new, into
// Fibers::entry).
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif

namespace {

bool g_tf32 = false;  // the GEMM in progress rounds float32 inputs to TF32

float to_tf32(float x) {  // 10 mantissa bits, round to nearest (ties away)
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

double load(const void* p, cudaDataType_t t, size_t i) {
  switch (t) {
    case CUDA_R_32F:
      return g_tf32 ? to_tf32(static_cast<const float*>(p)[i]) : static_cast<const float*>(p)[i];
    case CUDA_R_64F:
      return static_cast<const double*>(p)[i];
    case CUDA_R_16F:
      return __half2float(static_cast<const __half*>(p)[i]);
    case CUDA_R_16BF:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      std::abort();
  }
}

void store(void* p, cudaDataType_t t, size_t i, double v) {
  switch (t) {
    case CUDA_R_32F:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case CUDA_R_64F:
      static_cast<double*>(p)[i] = v;
      break;
    case CUDA_R_16F:
      static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v));
      break;
    case CUDA_R_16BF:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
      break;
    default:
      std::abort();
  }
}

double scalar(const void* p, cublasComputeType_t c) {
  return c == CUBLAS_COMPUTE_64F ? *static_cast<const double*>(p) : *static_cast<const float*>(p);
}

bool valid_types(cudaDataType_t a, cudaDataType_t b, cudaDataType_t c, cublasComputeType_t comp) {
  if (a != b) return false;
  if (comp == CUBLAS_COMPUTE_64F) return a == CUDA_R_64F && c == CUDA_R_64F;
  if (comp != CUBLAS_COMPUTE_32F) return false;
  if (a == CUDA_R_32F) return c == CUDA_R_32F;
  return (a == CUDA_R_16F || a == CUDA_R_16BF) && (c == a || c == CUDA_R_32F);
}

int64_t g_gemms = 0;

cudaStream_t g_blas_stream = nullptr;
cublasPointerMode_t g_pointer_mode = CUBLAS_POINTER_MODE_HOST;
cublasMath_t g_math_mode = CUBLAS_DEFAULT_MATH;

struct GemmRecord {
  int math, compute, a_type, c_type;
};
std::vector<GemmRecord> g_records;

// Records the call and sets up the TF32 rounding as cuBLAS would apply it.
void begin_gemm(cublasComputeType_t comp, cudaDataType_t at, cudaDataType_t ct) {
  g_records.push_back(
      {static_cast<int>(g_math_mode), static_cast<int>(comp), static_cast<int>(at), static_cast<int>(ct)});
  g_tf32 = at == CUDA_R_32F && (comp == CUBLAS_COMPUTE_32F_FAST_TF32 ||
                                (comp == CUBLAS_COMPUTE_32F && (g_math_mode & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH));
}

cublasStatus_t gemm_one(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void* alpha,
                        const void* A, cudaDataType_t at, int lda, const void* B, cudaDataType_t bt, int ldb,
                        const void* beta, void* C, cudaDataType_t ct, int ldc, cublasComputeType_t comp) {
  if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k) || ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) ||
      ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (!valid_types(at, bt, ct, comp)) return CUBLAS_STATUS_NOT_SUPPORTED;
  const double al = scalar(alpha, comp), be = scalar(beta, comp);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double s = 0;
      for (int l = 0; l < k; ++l) {
        const double a = ta == CUBLAS_OP_N ? load(A, at, i + static_cast<size_t>(l) * lda)
                                           : load(A, at, l + static_cast<size_t>(i) * lda);
        const double b = tb == CUBLAS_OP_N ? load(B, bt, l + static_cast<size_t>(j) * ldb)
                                           : load(B, bt, j + static_cast<size_t>(l) * ldb);
        s += a * b;
      }
      const size_t ci = i + static_cast<size_t>(j) * ldc;
      store(C, ct, ci, be == 0 ? al * s : al * s + be * load(C, ct, ci));
    }
  ++g_gemms;
  return CUBLAS_STATUS_SUCCESS;
}

size_t type_size(cudaDataType_t t) { return t == CUDA_R_64F ? 8 : (t == CUDA_R_32F ? 4 : 2); }

// Devices: 0 is a Hopper (9.0), 1 a Turing (7.5: no bfloat16 tensor cores).
constexpr int kDeviceCc[] = {90, 75};
int g_device = 0;
int64_t g_attribute_queries = 0;

}  // namespace

// Hooks for the harness (which does not include emu.h).
void emu_clear_gemm_records() { g_records.clear(); }
size_t emu_gemm_record_count() { return g_records.size(); }
void emu_gemm_record(size_t i, int* math, int* compute, int* a_type, int* c_type) {
  *math = g_records[i].math;
  *compute = g_records[i].compute;
  *a_type = g_records[i].a_type;
  *c_type = g_records[i].c_type;
}
void emu_set_pending_error(cudaError_t e, bool sticky) {
  emu::g_pending_error = e;
  emu::g_pending_sticky = sticky;
}
void emu_reset_errors() { emu_set_pending_error(cudaSuccess, false); }
void emu_fail_next_launch(cudaError_t e) { emu::g_fail_next_launch = e; }
int64_t emu_attribute_queries() { return g_attribute_queries; }

int64_t emu_gemm_count() { return g_gemms; }
int64_t emu_launch_count() { return emu::g_launches; }
int64_t emu_thread_count() { return emu::g_threads; }

extern "C" {

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                            cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t comp, cublasGemmAlgo_t) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (g_pointer_mode != CUBLAS_POINTER_MODE_HOST) return CUBLAS_STATUS_INVALID_VALUE;
  begin_gemm(comp, at, ct);
  return gemm_one(ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, comp);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m,
                                          int n, int k, const void* alpha, const void* A, cudaDataType_t at, int lda,
                                          long long sa, const void* B, cudaDataType_t bt, int ldb, long long sb,
                                          const void* beta, void* C, cudaDataType_t ct, int ldc, long long sc,
                                          int batch, cublasComputeType_t comp, cublasGemmAlgo_t) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (g_pointer_mode != CUBLAS_POINTER_MODE_HOST || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  begin_gemm(comp, at, ct);
  for (int b = 0; b < batch; ++b) {
    const cublasStatus_t st = gemm_one(ta, tb, m, n, k, alpha, static_cast<const char*>(A) + b * sa * type_size(at), at,
                                       lda, static_cast<const char*>(B) + b * sb * type_size(bt), bt, ldb, beta,
                                       static_cast<char*>(C) + b * sc * type_size(ct), ct, ldc, comp);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* s) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *s = g_blas_stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t s) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  g_blas_stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t* m) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *m = g_pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t m) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  g_pointer_mode = m;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* m) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *m = g_math_mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t m) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  g_math_mode = m;
  return CUBLAS_STATUS_SUCCESS;
}
const char* cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    default:
      return "CUBLAS_STATUS_EMULATED_ERROR";
  }
}
const char* cublasGetStatusString(cublasStatus_t) { return "emulated cuBLAS error"; }

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_pending_error;
  if (!emu::g_pending_sticky) emu::g_pending_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return emu::g_pending_error; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorIllegalAddress:
      return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    default:
      return "cudaErrorEmulated";
  }
}
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  if (emu::g_pending_sticky) return emu::g_pending_error;
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = g_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= static_cast<int>(sizeof(kDeviceCc) / sizeof(kDeviceCc[0]))) {
    emu::set_error(cudaErrorInvalidDevice, false);
    return cudaErrorInvalidDevice;
  }
  g_device = d;
  return cudaSuccess;
}
// Device 1 (EMU_DEVICE=1 in a harness case) takes the no-bfloat16-tensor-core fallbacks.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= static_cast<int>(sizeof(kDeviceCc) / sizeof(kDeviceCc[0]))) {
    emu::set_error(cudaErrorInvalidDevice, false);
    return cudaErrorInvalidDevice;
  }
  ++g_attribute_queries;
  const int cc = kDeviceCc[device];
  if (attr == cudaDevAttrComputeCapabilityMajor)
    *value = cc / 10;
  else if (attr == cudaDevAttrComputeCapabilityMinor)
    *value = cc % 10;
  else
    *value = 0;
  return cudaSuccess;
}

}  // extern "C"
