// PyTorch binding of lily_linear: the whole Lily layer in one op,
//
//   y = x W^T + b + scaling * routed_mix(x A^T, router, bank; mode, mask).
//
// Schemas, argument checks, the CPU kernels (the base GEMM through ATen, the
// adapter through csrc/lily/cpu_lily_linear.h, added into the base output in
// place; at decode, up to kLayerRows rows, the base layer there too), a composed
// kernel for CUDA (at::linear + the lily::routed_mix CUDA kernels + cuBLAS) and
// the autograd, all in C++: a call never enters Python.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../lily/cpu_lily_linear.h"
#include "cpu_backend.h"
#include "routed_mix_checks.h"

namespace lily_torch {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": on device ", t.device(), " but x is on ", x.device());
}

void check_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, ": dtype ", dtype_name(t.scalar_type()),
                    " differs from ", ref_name, "'s dtype ", dtype_name(ref.scalar_type()));
}

struct LinearCall {
  lily::MixShape s;
  int64_t in = 0;
  at::Tensor bank;  // [E, r, out] (a view of a flat [E * r, out] bank)
};

// Validates one call (docs/DESIGN.md, "lily_linear"). x and weight / bias share the base
// layer's dtype; A, router and bank share the adapter's (they may differ: adapters of a
// half-precision model are kept in float32).
LinearCall check_lily_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& A, const at::Tensor& router, const at::Tensor& bank, double scaling,
                                  c10::string_view mode, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(std::isfinite(scaling), "scaling: expected a finite float, got ", scaling);
  TORCH_CHECK_VALUE(is_float_dtype(x.scalar_type()), "x: expected dtype float32, float64, bfloat16 or float16, got ",
                    dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected a tensor [..., in] with at least 1 dim, got a 0-dim tensor");
  check_dtype(weight, "weight", x, "x");
  check_device(weight, "weight", x);
  if (bias.has_value()) {
    check_dtype(*bias, "bias", x, "x");
    check_device(*bias, "bias", x);
  }
  TORCH_CHECK_VALUE(is_float_dtype(A.scalar_type()), "A: expected dtype float32, float64, bfloat16 or float16, got ",
                    dtype_name(A.scalar_type()));
  check_device(A, "A", x);
  check_dtype(router, "router", A, "A");
  check_device(router, "router", x);
  check_dtype(bank, "bank", A, "A");
  check_device(bank, "bank", x);
  const int64_t in = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == in, "weight: expected shape [out, in] with in = ", in,
                    " (x's last dim), got shape ", lily::dims_str(weight.sizes().vec()));
  const int64_t out = weight.size(0);
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "bias: expected shape [", out, "], got shape ",
                      lily::dims_str(bias->sizes().vec()));
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == in && A.size(0) >= 1, "A: expected shape [r, in] with in = ", in,
                    " and r >= 1, got shape ", lily::dims_str(A.sizes().vec()));
  const int64_t r = A.size(0);
  at::Tensor bank3 = bank;
  if (bank.dim() == 2) {  // the flat [E * r, out] layout of lily_B's weight; E from the router
    TORCH_CHECK_VALUE(router.dim() >= 1, "router: expected [E, r] or theta [E], got a 0-dim tensor");
    const int64_t E = router.size(0);
    TORCH_CHECK_VALUE(bank.size(0) == E * r && bank.size(1) == out, "bank: expected shape [E, r, out] = [", E, ", ", r,
                      ", ", out, "] or its flat view [E * r, out] = [", E * r, ", ", out, "], got shape ",
                      lily::dims_str(bank.sizes().vec()));
    bank3 = bank.view({E, r, out});
  } else {
    TORCH_CHECK_VALUE(bank.dim() == 3 && bank.size(1) == r && bank.size(2) == out,
                      "bank: expected shape [E, r, out] with r = ", r, " (A's rows) and out = ", out,
                      " (weight's rows), got shape ", lily::dims_str(bank.sizes().vec()));
  }
  std::vector<int64_t> mask_dims;
  if (mask.has_value()) {
    check_device(*mask, "mask", x);
    TORCH_CHECK_VALUE(!mask->is_complex(), "mask: expected a bool, integer or float tensor, got ",
                      dtype_name(mask->scalar_type()));
    mask_dims = mask->sizes().vec();
  }
  std::vector<int64_t> hidden = x.sizes().vec();
  hidden.back() = r;
  LinearCall call;
  const std::string error = lily::check_shapes(std::string(mode), hidden, router.sizes().vec(), bank3.sizes().vec(),
                                               mask.has_value() ? &mask_dims : nullptr, &call.s);
  TORCH_CHECK_VALUE(error.empty(), error);
  call.in = in;
  call.bank = bank3;
  return call;
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v = sizes.vec();
  v.back() = last;
  return v;
}

// t in the compute dtype, contiguous; t itself (no dispatcher call) when it already is.
at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.is_contiguous()) return t;
  return t.to(ct).contiguous();
}

const uint8_t* mask_ptr(const at::Tensor& m) {
  return m.defined() ? static_cast<const uint8_t*>(m.const_data_ptr()) : nullptr;
}

// The CPU forward. Returns y and, when `keep_hidden`, h = x A^T in A's dtype.
std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                               const at::Tensor& router, const at::Tensor& bank, double scaling,
                                               c10::string_view mode, const std::optional<at::Tensor>& mask,
                                               bool keep_hidden) {
  const LinearCall call = check_lily_linear_args(x, weight, bias, A, router, bank, scaling, mode, mask);
  const lily::MixShape& s = call.s;
  const auto ct = compute_dtype(A.scalar_type());
  const at::Tensor xc = as_compute(x, ct);
  const at::Tensor Ac = as_compute(A, ct), Rc = as_compute(router, ct), Bc = as_compute(call.bank, ct);
  const at::Tensor m = mask_as_bytes(mask);
  at::Tensor h = at::empty(with_last(x.sizes(), s.rank), xc.options());
  at::Tensor y;
  if (s.rows <= lily::cpu::kLayerRows && x.scalar_type() == ct && weight.is_contiguous() &&
      (!bias.has_value() || bias->is_contiguous())) {
    // Decode: the base layer in the same passes over the weights as the adapter.
    y = at::empty(with_last(x.sizes(), s.out), xc.options());
    AT_DISPATCH_FLOATING_TYPES(ct, "lily::lily_linear (CPU)", [&] {
      lily::cpu::lily_layer_forward_rows<scalar_t>(
          AtenBackend{}, s, call.in, static_cast<scalar_t>(scaling), xc.const_data_ptr<scalar_t>(),
          weight.const_data_ptr<scalar_t>(), bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
          Ac.const_data_ptr<scalar_t>(), Rc.const_data_ptr<scalar_t>(), Bc.const_data_ptr<scalar_t>(), mask_ptr(m),
          h.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>());
    });
  } else {
    y = at::linear(x, weight, bias);  // the base layer, as nn.Linear computes it
    if (!y.is_contiguous()) y = y.contiguous();
    // The adapter adds into y in place when y is in its compute dtype; otherwise it is formed in the
    // compute dtype and added once (one rounding).
    const bool in_place = y.scalar_type() == ct;
    at::Tensor target = in_place ? y : at::empty(y.sizes(), y.options().dtype(ct));
    AT_DISPATCH_FLOATING_TYPES(ct, "lily::lily_linear (CPU)", [&] {
      lily::cpu::lily_adapter_forward<scalar_t>(
          AtenBackend{}, s, call.in, static_cast<scalar_t>(scaling), xc.const_data_ptr<scalar_t>(),
          Ac.const_data_ptr<scalar_t>(), Rc.const_data_ptr<scalar_t>(), Bc.const_data_ptr<scalar_t>(), mask_ptr(m),
          h.mutable_data_ptr<scalar_t>(), target.mutable_data_ptr<scalar_t>(), in_place);
    });
    if (!in_place) y.add_(target);
  }
  if (!keep_hidden) return {y, at::Tensor()};
  return {y, h.scalar_type() == A.scalar_type() ? h : h.to(A.scalar_type())};
}

at::Tensor lily_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& A, const at::Tensor& router, const at::Tensor& bank, double scaling,
                           c10::string_view mode, const std::optional<at::Tensor>& mask) {
  return std::get<0>(forward_cpu(x, weight, bias, A, router, bank, scaling, mode, mask, false));
}

std::tuple<at::Tensor, at::Tensor> lily_linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                           const at::Tensor& router, const at::Tensor& bank,
                                                           double scaling, c10::string_view mode,
                                                           const std::optional<at::Tensor>& mask) {
  return forward_cpu(x, weight, bias, A, router, bank, scaling, mode, mask, true);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The base layer's gradients (ATen, as nn.Linear's backward) and checks shared by both backends.
struct BaseGrads {
  LinearCall call;
  at::Tensor G2, x2, dx, dweight, dbias;
};

BaseGrads base_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& weight,
                        const at::Tensor& A, const at::Tensor& router, const at::Tensor& bank, double scaling,
                        c10::string_view mode, const std::optional<at::Tensor>& mask, std::array<bool, 4> needs) {
  BaseGrads g;
  g.call = check_lily_linear_args(x, weight, std::nullopt, A, router, bank, scaling, mode, mask);
  const int64_t out = g.call.s.out, in = g.call.in;
  check_dtype(grad, "grad", x, "x");
  check_device(grad, "grad", x);
  TORCH_CHECK_VALUE(grad.sizes().vec() == with_last(x.sizes(), out), "grad: expected shape ",
                    lily::dims_str(with_last(x.sizes(), out)), ", got ", lily::dims_str(grad.sizes().vec()));
  check_dtype(hidden, "hidden", A, "A");
  check_device(hidden, "hidden", x);
  TORCH_CHECK_VALUE(hidden.sizes().vec() == with_last(x.sizes(), g.call.s.rank), "hidden: expected shape ",
                    lily::dims_str(with_last(x.sizes(), g.call.s.rank)), ", got ",
                    lily::dims_str(hidden.sizes().vec()));
  g.G2 = grad.reshape({-1, out});
  g.x2 = x.reshape({-1, in});
  // gradients not asked for: distinct empty tensors (outputs never alias). Reshaped gradients are
  // _unsafe_view, not view: a tracked view keeps its temporary base alive, and autograd then cannot
  // sum another gradient into it in place (a layer's dx, a bank shared by layers: a new tensor each).
  g.dx = needs[0] ? at::_unsafe_view(at::mm(g.G2, weight), x.sizes()) : x.new_empty({0});
  g.dweight = needs[1] ? at::mm(g.G2.t(), g.x2) : x.new_empty({0});
  g.dbias = needs[2] ? g.G2.sum(0) : x.new_empty({0});
  return g;
}

Grads lily_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& hidden,
                               const at::Tensor& weight, const at::Tensor& A, const at::Tensor& router,
                               const at::Tensor& bank, double scaling, c10::string_view mode,
                               const std::optional<at::Tensor>& mask, std::array<bool, 4> needs) {
  BaseGrads g = base_backward(grad, x, hidden, weight, A, router, bank, scaling, mode, mask, needs);
  const lily::MixShape& s = g.call.s;
  const auto ct = compute_dtype(A.scalar_type());
  const at::Tensor Gc = as_compute(grad, ct), xc = as_compute(x, ct), hc = as_compute(hidden, ct);
  const at::Tensor Ac = as_compute(A, ct), Rc = as_compute(router, ct), Bc = as_compute(g.call.bank, ct);
  const at::Tensor m = mask_as_bytes(mask);
  // dx += dh A: into dx itself when it is in the compute dtype (it is contiguous: a fresh mm).
  const bool dx_in_place = needs[0] && g.dx.scalar_type() == ct;
  at::Tensor dxc = !needs[0] ? at::Tensor() : (dx_in_place ? g.dx : at::zeros(x.sizes(), xc.options()));
  at::Tensor dA = needs[3] ? at::empty(A.sizes(), xc.options()) : at::Tensor();
  at::Tensor dR = at::empty(router.sizes(), xc.options());
  at::Tensor dB = at::empty(g.call.bank.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "lily::lily_linear_backward (CPU)", [&] {
    lily::cpu::lily_adapter_backward<scalar_t>(
        AtenBackend{}, s, g.call.in, static_cast<scalar_t>(scaling), Gc.const_data_ptr<scalar_t>(),
        xc.const_data_ptr<scalar_t>(), hc.const_data_ptr<scalar_t>(), Ac.const_data_ptr<scalar_t>(),
        Rc.const_data_ptr<scalar_t>(), Bc.const_data_ptr<scalar_t>(), mask_ptr(m),
        needs[0] ? dxc.mutable_data_ptr<scalar_t>() : nullptr, needs[3] ? dA.mutable_data_ptr<scalar_t>() : nullptr,
        dR.mutable_data_ptr<scalar_t>(), dB.mutable_data_ptr<scalar_t>());
  });
  if (needs[0] && !dx_in_place) g.dx.add_(dxc);
  const auto adt = A.scalar_type();
  const at::Tensor dbank = at::_unsafe_view(dB.to(adt), bank.sizes());
  return {g.dx, g.dweight, g.dbias, needs[3] ? dA.to(adt) : x.new_empty({0}), dR.to(adt), dbank};
}

// ---- composed kernels: any device with routed_mix kernels (CUDA: the lily CUDA kernels + cuBLAS) ----

at::Tensor call_routed_mix(const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank, double scaling,
                           c10::string_view mode, const std::optional<at::Tensor>& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lily::routed_mix", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                               c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(hidden, router, bank, scaling, mode, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_routed_mix_backward(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank, double scaling,
    c10::string_view mode, const std::optional<at::Tensor>& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lily::routed_mix_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                 c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(grad, hidden, router, bank, scaling, mode, mask);
}

std::tuple<at::Tensor, at::Tensor> lily_linear_forward_composed(const at::Tensor& x, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& A, const at::Tensor& router,
                                                                const at::Tensor& bank, double scaling,
                                                                c10::string_view mode,
                                                                const std::optional<at::Tensor>& mask) {
  const LinearCall call = check_lily_linear_args(x, weight, bias, A, router, bank, scaling, mode, mask);
  at::Tensor y = at::linear(x, weight, bias);
  at::Tensor h = at::linear(x.to(A.scalar_type()), A);
  y.add_(call_routed_mix(h, router, call.bank, scaling, mode, mask));
  return {y, h};
}

at::Tensor lily_linear_composed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& A, const at::Tensor& router, const at::Tensor& bank, double scaling,
                                c10::string_view mode, const std::optional<at::Tensor>& mask) {
  return std::get<0>(lily_linear_forward_composed(x, weight, bias, A, router, bank, scaling, mode, mask));
}

Grads lily_linear_backward_composed(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& hidden,
                                    const at::Tensor& weight, const at::Tensor& A, const at::Tensor& router,
                                    const at::Tensor& bank, double scaling, c10::string_view mode,
                                    const std::optional<at::Tensor>& mask, std::array<bool, 4> needs) {
  BaseGrads g = base_backward(grad, x, hidden, weight, A, router, bank, scaling, mode, mask, needs);
  const auto adt = A.scalar_type();
  auto [dh, dR, dB] = call_routed_mix_backward(grad.to(adt), hidden, router, g.call.bank, scaling, mode, mask);
  const at::Tensor dh2 = dh.reshape({-1, g.call.s.rank});
  if (needs[0]) g.dx.add_(at::mm(dh2, A).view(x.sizes()));  // (a temporary: a view is fine)
  at::Tensor dA = needs[3] ? at::mm(dh2.t(), g.x2.to(adt)) : x.new_empty({0});
  return {g.dx, g.dweight, g.dbias, dA, dR, at::_unsafe_view(dB, bank.sizes())};
}

// ---- autograd ----

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                const at::Tensor& router, const at::Tensor& bank, double scaling,
                                                c10::string_view mode, const std::optional<at::Tensor>& mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lily::lily_linear_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, double, c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias, A, router, bank, scaling, mode, mask);
}

at::Tensor call_plain(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& A, const at::Tensor& router, const at::Tensor& bank, double scaling,
                      c10::string_view mode, const std::optional<at::Tensor>& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lily::lily_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                               c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias, A, router, bank, scaling, mode, mask);
}

Grads call_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& hidden, const at::Tensor& weight,
                    const at::Tensor& A, const at::Tensor& router, const at::Tensor& bank, double scaling,
                    c10::string_view mode, const std::optional<at::Tensor>& mask, std::array<bool, 4> needs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lily::lily_linear_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                          c10::string_view, const std::optional<at::Tensor>&, std::array<bool, 4>)>();
  return op.call(grad, x, hidden, weight, A, router, bank, scaling, mode, mask, needs);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LilyLinearFunction : public torch::autograd::Function<LilyLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& router,
                            const at::Tensor& bank, double scaling, c10::string_view mode,
                            const std::optional<at::Tensor>& mask) {
    // which gradients the graph wants, by argument (needs_input_grad counts only tensors given)
    ctx->saved_data["needs"] = c10::List<bool>(
        {x.requires_grad(), weight.requires_grad(), bias.has_value() && bias->requires_grad(), A.requires_grad()});
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, hidden] = call_forward(x, weight, bias, A, router, bank, scaling, mode, mask);
    ctx->save_for_backward({x, hidden, weight, A, router, bank, mask.value_or(at::Tensor())});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["mode"] = std::string(mode);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> mask;
    if (saved[6].defined()) mask = saved[6];
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    const c10::List<bool> list = ctx->saved_data["needs"].toBoolList();
    const std::array<bool, 4> needs = {list[0], list[1], list[2], list[3]};
    auto [dx, dW, db, dA, dR, dB] = call_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                                  ctx->saved_data["scaling"].toDouble(), mode, mask, needs);
    const at::Tensor none;
    return {needs[0] ? dx : none,
            needs[1] ? dW : none,
            needs[2] ? db : none,
            needs[3] ? dA : none,
            dR,
            dB,
            none,
            none,
            none};
  }
};

bool wants_grad(const at::Tensor& t) { return t.requires_grad(); }

at::Tensor lily_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& A, const at::Tensor& router, const at::Tensor& bank, double scaling,
                                c10::string_view mode, const std::optional<at::Tensor>& mask) {
  const bool graph =
      at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || (bias.has_value() && wants_grad(*bias)) ||
                                     wants_grad(A) || wants_grad(router) || wants_grad(bank));
  if (!graph) {  // inference: one kernel call, h never leaves it
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_plain(x, weight, bias, A, router, bank, scaling, mode, mask);
  }
  return LilyLinearFunction::apply(x, weight, bias, A, router, bank, scaling, mode, mask);
}

}  // namespace

// Signatures shared by the ops and their composed twins (below).
#define LILY_LINEAR_ARGS                                                                                    \
  "(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor router, Tensor bank, float scaling, str mode, " \
  "Tensor? mask=None)"
#define LILY_LINEAR_FORWARD_SIGNATURE LILY_LINEAR_ARGS " -> (Tensor, Tensor)"
#define LILY_LINEAR_BACKWARD_SIGNATURE                                                                          \
  "(Tensor grad, Tensor x, Tensor hidden, Tensor weight, Tensor A, Tensor router, Tensor bank, float scaling, " \
  "str mode, Tensor? mask, bool[4] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY_FRAGMENT(lily, m) {
  m.def("lily_linear" LILY_LINEAR_ARGS " -> Tensor");
  m.def("lily_linear_forward" LILY_LINEAR_FORWARD_SIGNATURE);
  m.def("lily_linear_backward" LILY_LINEAR_BACKWARD_SIGNATURE);
}

TORCH_LIBRARY_IMPL(lily, CPU, m) {
  m.impl("lily_linear", &lily_linear_cpu);
  m.impl("lily_linear_forward", &lily_linear_forward_cpu);
  m.impl("lily_linear_backward", &lily_linear_backward_cpu);
}

// CUDA: composed from at::linear / cuBLAS and the lily::routed_mix CUDA kernels.
TORCH_LIBRARY_IMPL(lily, CUDA, m) {
  m.impl("lily_linear", &lily_linear_composed);
  m.impl("lily_linear_forward", &lily_linear_forward_composed);
  m.impl("lily_linear_backward", &lily_linear_backward_composed);
}

TORCH_LIBRARY_IMPL(lily, Autograd, m) { m.impl("lily_linear", &lily_linear_autograd); }

// The CUDA path's composition (above) on any device, under its own names: so the CPU tests run
// the code the CUDA kernels of lily_linear_forward / _backward are, where no GPU is lent.
TORCH_LIBRARY_FRAGMENT(lily, m) {
  m.def("_lily_linear_forward_composed" LILY_LINEAR_FORWARD_SIGNATURE);
  m.def("_lily_linear_backward_composed" LILY_LINEAR_BACKWARD_SIGNATURE);
}

TORCH_LIBRARY_IMPL(lily, CompositeExplicitAutograd, m) {
  m.impl("_lily_linear_forward_composed", &lily_linear_forward_composed);
  m.impl("_lily_linear_backward_composed", &lily_linear_backward_composed);
}

}  // namespace lily_torch
