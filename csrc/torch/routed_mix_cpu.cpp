// PyTorch binding of routed_mix: op schemas, argument checks, CPU kernels.
// The math lives in csrc/lily; this file only adapts tensors to it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "../lily/cpu_gemm.h"
#include "../lily/cpu_routed_mix.h"
#include "routed_mix_checks.h"

namespace lily_torch {
namespace {

// The large GEMMs go to the same blocked GEMM as the ONNX Runtime binding
// (csrc/lily/cpu_gemm.h), not to ATen's BLAS: MKL splits the reduction over
// rows (h^T G) between threads for small outputs, so its results change with
// torch.set_num_threads; cpu_gemm sums every element in one fixed order.
struct TorchCpuBackend {
  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    at::parallel_for(0, n, 1, f);
  }

  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
            int64_t ldb, T beta, T* C, int64_t ldc) const {
    lily::cpu::blocked_gemm(*this, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  template <typename T>
  void gemm_batched(bool trans_a, bool trans_b, int64_t batch, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                    int64_t lda, int64_t stride_a, const T* B, int64_t ldb, int64_t stride_b, T* C, int64_t ldc,
                    int64_t stride_c) const {
    lily::cpu::blocked_gemm_batched(*this, trans_a, trans_b, batch, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b,
                                    C, ldc, stride_c);
  }
};

at::Tensor routed_mix_cpu(const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank, double scaling,
                          c10::string_view mode, const std::optional<at::Tensor>& mask) {
  const lily::MixShape s = check_routed_mix_args(hidden, router, bank, scaling, mode, mask, nullptr);
  const auto compute = compute_dtype(hidden.scalar_type());
  const at::Tensor h = hidden.to(compute).contiguous();
  const at::Tensor R = router.to(compute).contiguous();
  const at::Tensor B = bank.to(compute).contiguous();
  const at::Tensor m = mask_as_bytes(mask);
  std::vector<int64_t> sizes = hidden.sizes().vec();
  sizes.back() = s.out;
  at::Tensor delta = at::empty(sizes, h.options());
  AT_DISPATCH_FLOATING_TYPES(compute, "lily::routed_mix (CPU)", [&] {
    lily::cpu::routed_mix_forward<scalar_t>(
        TorchCpuBackend{}, s, static_cast<scalar_t>(scaling), h.const_data_ptr<scalar_t>(),
        R.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
        m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr, delta.mutable_data_ptr<scalar_t>());
  });
  return delta.to(hidden.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_mix_backward_cpu(const at::Tensor& grad, const at::Tensor& hidden,
                                                                       const at::Tensor& router, const at::Tensor& bank,
                                                                       double scaling, c10::string_view mode,
                                                                       const std::optional<at::Tensor>& mask) {
  const lily::MixShape s = check_routed_mix_args(hidden, router, bank, scaling, mode, mask, &grad);
  const auto compute = compute_dtype(hidden.scalar_type());
  const at::Tensor G = grad.to(compute).contiguous();
  const at::Tensor h = hidden.to(compute).contiguous();
  const at::Tensor R = router.to(compute).contiguous();
  const at::Tensor B = bank.to(compute).contiguous();
  const at::Tensor m = mask_as_bytes(mask);
  at::Tensor dh = at::empty(hidden.sizes(), h.options());
  at::Tensor dR = at::empty(router.sizes(), h.options());
  at::Tensor dB = at::empty(bank.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES(compute, "lily::routed_mix_backward (CPU)", [&] {
    lily::cpu::routed_mix_backward<scalar_t>(
        TorchCpuBackend{}, s, static_cast<scalar_t>(scaling), G.const_data_ptr<scalar_t>(),
        h.const_data_ptr<scalar_t>(), R.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
        m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr, dh.mutable_data_ptr<scalar_t>(),
        dR.mutable_data_ptr<scalar_t>(), dB.mutable_data_ptr<scalar_t>());
  });
  const auto dtype = hidden.scalar_type();
  return {dh.to(dtype), dR.to(dtype), dB.to(dtype)};
}

std::string build_info() {
  std::string info = "compiler=";
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " __VERSION__;
#else
  info += "unknown";
#endif
  info += ";cuda_archs=" + cuda_build_archs();
  info += ";cuda_version=" + cuda_build_version();
  return info;
}

}  // namespace

TORCH_LIBRARY(lily, m) {
  m.def(
      "routed_mix(Tensor hidden, Tensor router, Tensor bank, float scaling, str mode, "
      "Tensor? mask=None) -> Tensor");
  m.def(
      "routed_mix_backward(Tensor grad, Tensor hidden, Tensor router, Tensor bank, float scaling, "
      "str mode, Tensor? mask=None) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(lily, CPU, m) {
  m.impl("routed_mix", &routed_mix_cpu);
  m.impl("routed_mix_backward", &routed_mix_backward_cpu);
}

}  // namespace lily_torch
