// Argument checks shared by the CPU and CUDA torch bindings of routed_mix.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "../lily/contract.h"

namespace lily_torch {

#define LILY_STR2(x) #x
#define LILY_STR(x) LILY_STR2(x)

// Set by setup.py when CUDA sources are compiled into this build.
inline std::string cuda_build_archs() {
#ifdef LILY_CUDA_ARCHS
  return LILY_STR(LILY_CUDA_ARCHS);
#else
  return "";
#endif
}

inline std::string cuda_build_version() {
#ifdef LILY_NVCC_VERSION
  return LILY_STR(LILY_NVCC_VERSION);
#else
  return "";
#endif
}

// Half-precision inputs are computed in float32.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

// "torch.float32", as Python users write it.
inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(t.scalar_type() == hidden.scalar_type(), name, ": dtype ", dtype_name(t.scalar_type()),
                    " differs from hidden's dtype ", dtype_name(hidden.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == hidden.device(), name, ": on device ", t.device(), " but hidden is on ",
                    hidden.device());
}

// Validates one call and returns its sizes; `grad` is checked when given.
inline lily::MixShape check_routed_mix_args(const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank,
                                            double scaling, c10::string_view mode,
                                            const std::optional<at::Tensor>& mask, const at::Tensor* grad) {
  TORCH_CHECK_VALUE(std::isfinite(scaling), "scaling: expected a finite float, got ", scaling);
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                    "hidden: expected dtype float32, float64, bfloat16 or float16, got ", dtype_name(dt));
  check_same(router, "router", hidden);
  check_same(bank, "bank", hidden);
  std::vector<int64_t> mask_dims;
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->device() == hidden.device(), "mask: on device ", mask->device(), " but hidden is on ",
                      hidden.device());
    TORCH_CHECK_VALUE(!mask->is_complex(), "mask: expected a bool, integer or float tensor, got ",
                      dtype_name(mask->scalar_type()));
    mask_dims = mask->sizes().vec();
  }
  lily::MixShape s;
  const std::string error = lily::check_shapes(std::string(mode), hidden.sizes().vec(), router.sizes().vec(),
                                               bank.sizes().vec(), mask.has_value() ? &mask_dims : nullptr, &s);
  TORCH_CHECK_VALUE(error.empty(), error);
  if (grad != nullptr) {
    check_same(*grad, "grad", hidden);
    std::vector<int64_t> expected = hidden.sizes().vec();
    expected.back() = s.out;
    TORCH_CHECK_VALUE(grad->sizes().vec() == expected, "grad: expected shape ", lily::dims_str(expected), ", got ",
                      lily::dims_str(grad->sizes().vec()));
  }
  return s;
}

// Nonzero entries are the tokens that count; kernels read the bool bytes as uint8.
inline at::Tensor mask_as_bytes(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return at::Tensor();
  return mask->ne(0).contiguous();
}

}  // namespace lily_torch
