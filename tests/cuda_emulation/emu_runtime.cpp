// CPU stand-ins for the CUDA runtime and cuBLAS calls the drivers make, for the
// emulation (see include/emu.h). The GEMMs follow cuBLAS's column-major
// contract literally (op(A) m x k, op(B) k x n, leading dimensions, strides,
// beta == 0 never reads C), so the drivers' row-major-to-cuBLAS mapping is
// what gets checked; leading dimensions are validated like cuBLAS does.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

double load(const void* p, cudaDataType_t t, size_t i) {
  switch (t) {
    case CUDA_R_32F:
      return static_cast<const float*>(p)[i];
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

cudaStream_t g_blas_stream = nullptr;
cublasPointerMode_t g_pointer_mode = CUBLAS_POINTER_MODE_HOST;

}  // namespace

int64_t emu_gemm_count() { return g_gemms; }
int64_t emu_launch_count() { return emu::g_launches; }
int64_t emu_thread_count() { return emu::g_threads; }

extern "C" {

cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                            cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t comp, cublasGemmAlgo_t) {
  if (g_pointer_mode != CUBLAS_POINTER_MODE_HOST) return CUBLAS_STATUS_INVALID_VALUE;
  return gemm_one(ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, comp);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void* alpha, const void* A, cudaDataType_t at, int lda,
                                          long long sa, const void* B, cudaDataType_t bt, int ldb, long long sb,
                                          const void* beta, void* C, cudaDataType_t ct, int ldc, long long sc,
                                          int batch, cublasComputeType_t comp, cublasGemmAlgo_t) {
  if (batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  for (int b = 0; b < batch; ++b) {
    const cublasStatus_t st = gemm_one(ta, tb, m, n, k, alpha, static_cast<const char*>(A) + b * sa * type_size(at), at,
                                       lda, static_cast<const char*>(B) + b * sb * type_size(bt), bt, ldb, beta,
                                       static_cast<char*>(C) + b * sc * type_size(ct), ct, ldc, comp);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
  }
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream_v2(cublasHandle_t, cudaStream_t* s) {
  *s = g_blas_stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t, cudaStream_t s) {
  g_blas_stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t, cublasPointerMode_t* m) {
  *m = g_pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t, cublasPointerMode_t m) {
  g_pointer_mode = m;
  return CUBLAS_STATUS_SUCCESS;
}
const char* cublasGetStatusName(cublasStatus_t) { return "CUBLAS_STATUS_EMULATED_ERROR"; }
const char* cublasGetStatusString(cublasStatus_t) { return "emulated cuBLAS error"; }

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
// Compute capability from EMU_CC (default 90), e.g. EMU_CC=75 takes the
// no-bfloat16-tensor-core fallbacks.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const char* env = std::getenv("EMU_CC");
  const int cc = env ? std::atoi(env) : 90;
  if (attr == cudaDevAttrComputeCapabilityMajor)
    *value = cc / 10;
  else if (attr == cudaDevAttrComputeCapabilityMinor)
    *value = cc % 10;
  else
    *value = 0;
  return cudaSuccess;
}

}  // extern "C"
