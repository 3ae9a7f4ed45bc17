// PyTorch binding of routed_mix: op schemas, argument checks, CPU kernels.
// The math lives in csrc/lily; this file only adapts tensors to it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "../lily/cpu_routed_mix.h"
#include "cpu_backend.h"
#include "routed_mix_checks.h"

namespace lily_torch {
namespace {

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
