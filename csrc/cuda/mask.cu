// Mask of any element type -> the byte mask routed_mix_* take (see
// routed_mix_cuda.h, mask_to_bytes). The ORT binding gets masks as int64 /
// int32 / bool / float tensors already on the device; converting them there
// avoids a round trip through the host.
#include <algorithm>

#include "common.cuh"
#include "routed_mix_cuda.h"

namespace lily {
namespace cuda {
namespace {

constexpr int kMaskThreads = 256;

// Bitwise test under `bits`: all ones for integers, all but the sign bit for
// IEEE floats, so -0.0 is zero and NaN is nonzero, as in torch's mask != 0.
template <typename U>
__global__ void __launch_bounds__(kMaskThreads)
    mask_to_bytes_kernel(const U* __restrict__ src, int64_t n, U bits, uint8_t* __restrict__ dst) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = (src[i] & bits) != 0 ? 1 : 0;
}

template <typename U>
std::string launch_mask(const void* src, int64_t n, bool float_bits, uint8_t* dst, cudaStream_t stream) {
  const U all = static_cast<U>(~U(0));
  const U bits = float_bits ? static_cast<U>(all >> 1) : all;  // unsigned: >> 1 clears the top (sign) bit
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kMaskThreads), 4096);
  LILY_LAUNCH("mask_to_bytes_kernel",
              mask_to_bytes_kernel<U><<<blocks, kMaskThreads, 0, stream>>>(static_cast<const U*>(src), n, bits, dst));
  return "";
}

}  // namespace

std::string mask_to_bytes(const void* src, int64_t n, int elem_bytes, bool float_bits, uint8_t* dst,
                          cudaStream_t stream) {
  if (n < 0) return "mask_to_bytes: negative element count";
  if (n == 0) return "";
  if (src == nullptr || dst == nullptr) return "mask_to_bytes: null pointer";
  switch (elem_bytes) {
    case 1:
      if (float_bits) break;  // no 1-byte float type
      return launch_mask<uint8_t>(src, n, false, dst, stream);
    case 2:
      return launch_mask<uint16_t>(src, n, float_bits, dst, stream);
    case 4:
      return launch_mask<uint32_t>(src, n, float_bits, dst, stream);
    case 8:
      return launch_mask<unsigned long long>(src, n, float_bits, dst, stream);
    default:
      break;
  }
  return "mask_to_bytes: unsupported element size " + std::to_string(elem_bytes) + (float_bits ? " (float)" : "");
}

}  // namespace cuda
}  // namespace lily
