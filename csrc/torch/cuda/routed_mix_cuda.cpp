// PyTorch CUDA kernels of lily::routed_mix: a thin wrapper over the
// framework-free CUDA layer (csrc/cuda). Runs on the current stream with
// torch's cuBLAS handle, fetched only for calls that make cuBLAS calls (the
// small-N and tiled per-row forwards do not: decode-size calls skip the
// handle lookup); the layer pins the handle's math mode for its GEMMs and puts
// torch's back (precision policy: csrc/cuda/routed_mix_cuda.h). Scratch comes
// from the caching allocator, and only when the call needs some.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../../cuda/routed_mix_cuda.h"
#include "../routed_mix_checks.h"

namespace lily_torch {
namespace {

lily::cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return lily::cuda::DType::kFloat32;
    case at::kDouble:
      return lily::cuda::DType::kFloat64;
    case at::kHalf:
      return lily::cuda::DType::kFloat16;
    case at::kBFloat16:
      return lily::cuda::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "hidden: unsupported dtype ", dtype_name(t));
}

// Scratch of `bytes` (none, not even a 0-byte tensor, when 0).
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* workspace_ptr(const at::Tensor& ws) { return ws.defined() ? ws.mutable_data_ptr() : nullptr; }
size_t workspace_size(const at::Tensor& ws) { return ws.defined() ? static_cast<size_t>(ws.numel()) : 0; }

cublasHandle_t blas_handle(const lily::cuda::CallPlan& plan) {
  return plan.uses_blas ? at::cuda::getCurrentCUDABlasHandle() : nullptr;
}

const uint8_t* mask_ptr(const at::Tensor& m) {
  return m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr;
}

at::Tensor routed_mix_cuda(const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank, double scaling,
                           c10::string_view mode, const std::optional<at::Tensor>& mask) {
  const lily::MixShape s = check_routed_mix_args(hidden, router, bank, scaling, mode, mask, nullptr);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto dtype = cuda_dtype(hidden.scalar_type());
  const at::Tensor h = hidden.contiguous(), R = router.contiguous(), B = bank.contiguous();
  const at::Tensor m = mask_as_bytes(mask);
  std::vector<int64_t> sizes = hidden.sizes().vec();
  sizes.back() = s.out;
  at::Tensor delta = at::empty(sizes, hidden.options());
  const lily::cuda::CallPlan plan = lily::cuda::plan_forward_call(s, dtype);
  const at::Tensor ws = workspace(plan.workspace_bytes, hidden);
  const std::string error =
      lily::cuda::routed_mix_forward(s, dtype, scaling, h.const_data_ptr(), R.const_data_ptr(), B.const_data_ptr(),
                                     mask_ptr(m), delta.mutable_data_ptr(), workspace_ptr(ws), workspace_size(ws),
                                     c10::cuda::getCurrentCUDAStream(), blas_handle(plan));
  TORCH_CHECK(error.empty(), "lily::routed_mix (CUDA): ", error);
  return delta;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_mix_backward_cuda(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank, double scaling,
    c10::string_view mode, const std::optional<at::Tensor>& mask) {
  const lily::MixShape s = check_routed_mix_args(hidden, router, bank, scaling, mode, mask, &grad);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto dtype = cuda_dtype(hidden.scalar_type());
  const at::Tensor G = grad.contiguous(), h = hidden.contiguous(), R = router.contiguous(), B = bank.contiguous();
  const at::Tensor m = mask_as_bytes(mask);
  at::Tensor dh = at::empty(hidden.sizes(), hidden.options());
  at::Tensor dR = at::empty(router.sizes(), router.options());
  at::Tensor dB = at::empty(bank.sizes(), bank.options());
  const lily::cuda::CallPlan plan = lily::cuda::plan_backward_call(s, dtype);
  const at::Tensor ws = workspace(plan.workspace_bytes, hidden);
  const std::string error = lily::cuda::routed_mix_backward(
      s, dtype, scaling, G.const_data_ptr(), h.const_data_ptr(), R.const_data_ptr(), B.const_data_ptr(), mask_ptr(m),
      dh.mutable_data_ptr(), dR.mutable_data_ptr(), dB.mutable_data_ptr(), workspace_ptr(ws), workspace_size(ws),
      c10::cuda::getCurrentCUDAStream(), blas_handle(plan));
  TORCH_CHECK(error.empty(), "lily::routed_mix_backward (CUDA): ", error);
  return {dh, dR, dB};
}

// torch.ops.lily.reload_cuda_knobs(): reads LILY_CUDA_KRON / LILY_CUDA_SCRATCH_BYTES again (they are
// read once per process otherwise), for tests and benchmarks that change them in-process.
void reload_cuda_knobs() { lily::cuda::reload_knobs(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lily, m) { m.def("reload_cuda_knobs() -> ()", &reload_cuda_knobs); }

TORCH_LIBRARY_IMPL(lily, CUDA, m) {
  m.impl("routed_mix", &routed_mix_cuda);
  m.impl("routed_mix_backward", &routed_mix_backward_cuda);
}

}  // namespace lily_torch
