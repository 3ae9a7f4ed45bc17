// Autograd for lily::routed_mix, in C++ so that calls (with or without grad)
// never round-trip through Python. Backend-agnostic: the forward and backward
// are redispatched to the CPU / CUDA / fake kernels of the two ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace lily_torch {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank, double scaling,
                        c10::string_view mode, const std::optional<at::Tensor>& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lily::routed_mix", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                               c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(hidden, router, bank, scaling, mode, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& grad, const at::Tensor& hidden,
                                                             const at::Tensor& router, const at::Tensor& bank,
                                                             double scaling, c10::string_view mode,
                                                             const std::optional<at::Tensor>& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lily::routed_mix_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                 c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(grad, hidden, router, bank, scaling, mode, mask);
}

class RoutedMix : public torch::autograd::Function<RoutedMix> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& router,
                            const at::Tensor& bank, double scaling, c10::string_view mode,
                            const std::optional<at::Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor delta = call_forward(hidden, router, bank, scaling, mode, mask);
    ctx->save_for_backward({hidden, router, bank, mask.value_or(at::Tensor())});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["mode"] = std::string(mode);
    return delta;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> mask;
    if (saved[3].defined()) mask = saved[3];
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    auto [d_hidden, d_router, d_bank] =
        call_backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["scaling"].toDouble(), mode, mask);
    return {d_hidden, d_router, d_bank, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor routed_mix_autograd(const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& bank,
                               double scaling, c10::string_view mode, const std::optional<at::Tensor>& mask) {
  return RoutedMix::apply(hidden, router, bank, scaling, mode, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(lily, Autograd, m) { m.impl("routed_mix", &routed_mix_autograd); }

}  // namespace lily_torch
