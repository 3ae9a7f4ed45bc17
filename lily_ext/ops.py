"""The routed B-bank mixing op, ``torch.ops.lily.routed_mix``, and its Python entry point.

Math (docs/DESIGN.md): with ``h = hidden`` flattened to ``[N, r]``, router ``R [E, r]`` and bank
``Bk [E, r, out]``, each mode picks mixing weights ``w`` and returns
``scaling * h @ sum_e w_e Bk_e``:

- ``batch``: ``w = mean_n softmax(h_n R^T)`` over every row of the call (PEFT's semantics);
- ``sequence``: one ``w`` per sample: the masked mean over its tokens (``hidden [..., L, r]``;
  1-D/2-D inputs hold one token per sample); a fully masked sample gets a zero delta;
- ``token``: ``w_n = softmax(h_n R^T)`` per row;
- ``static``: ``w = softmax(theta)`` with ``router = theta [E]``, independent of the input;
- ``causal``: per sample (as ``sequence``) and token ``t``, the running mean of the router
  probabilities of the sample's unmasked tokens ``u <= t``; zero delta before the first unmasked
  token. No token sees a later one (safe for decoders) and a sample's output does not depend on
  the rest of the batch; with a KV cache the running sum and count are the whole state.
"""

from __future__ import annotations

import math

import torch

MODES = ("batch", "sequence", "token", "static", "causal")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

__all__ = ["routed_mix", "reload_cuda_knobs", "MODES"]


def _check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite float, got {scaling!r}")
    return float(scaling)


def _check_args(hidden, router, bank, scaling, mode, mask) -> None:
    """Mirror of the C++ checks (csrc/lily/contract.h) for fake tensors, so traced calls fail like eager ones."""
    for name, t in (("hidden", hidden), ("router", router), ("bank", bank)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    _check_scaling(scaling)
    if hidden.dtype not in DTYPES:
        raise ValueError(f"hidden: expected dtype float32, float64, bfloat16 or float16, got {hidden.dtype}")
    for name, t in (("router", router), ("bank", bank)):
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from hidden's dtype {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name}: on device {t.device} but hidden is on {hidden.device}")
    if bank.dim() != 3:
        raise ValueError(f"bank: expected a 3-D tensor [E, r, out], got shape {list(bank.shape)}")
    E, r, out = bank.shape
    if E < 1 or r < 1 or out < 1:
        raise ValueError(f"bank: every dim of [E, r, out] must be >= 1, got shape {list(bank.shape)}")
    if hidden.dim() == 0:
        raise ValueError("hidden: expected a tensor [..., r] with at least 1 dim, got a 0-dim tensor")
    if hidden.shape[-1] != r:
        raise ValueError(f"hidden: last dim must equal bank's r = {r}, got shape {list(hidden.shape)}")
    if mode == "static":
        if router.dim() != 1 or router.shape[0] != E:
            raise ValueError(f"router: static mode expects theta of shape [E] = [{E}], got shape {list(router.shape)}")
    else:
        if E < 2:
            raise ValueError(f"bank: mode {mode!r} routes between experts and needs num_B = E >= 2, got E = 1")
        if router.dim() != 2 or tuple(router.shape) != (E, r):
            raise ValueError(f"router: expected shape [E, r] = [{E}, {r}], got shape {list(router.shape)}")
    if mask is not None:
        if mode not in ("sequence", "causal"):
            raise ValueError(f"mask: only modes 'sequence' and 'causal' take a mask, got mode {mode!r}")
        if mask.device != hidden.device:
            raise ValueError(f"mask: on device {mask.device} but hidden is on {hidden.device}")
        if mask.is_complex():
            raise ValueError(f"mask: expected a bool, integer or float tensor, got {mask.dtype}")
        if tuple(mask.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"mask: expected shape {list(hidden.shape[:-1])} (hidden's shape without r), got {list(mask.shape)}"
            )


def routed_mix(
    hidden: torch.Tensor,
    router: torch.Tensor,
    bank: torch.Tensor,
    *,
    scaling: float = 1.0,
    mode: str = "batch",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed B-bank mixing: ``[..., r] -> [..., out]``, differentiable in hidden, router and bank.

    Args:
        hidden: ``[..., r]`` low-rank activations (``A x``); ``[S, L, r]`` for ``sequence`` and ``causal``.
        router: ``[E, r]`` router weight, or ``theta [E]`` logits for ``static``.
        bank: ``[E, r, out]`` B experts.
        scaling: plain multiplier of the delta.
        mode: ``"batch"``, ``"sequence"``, ``"token"``, ``"static"`` or ``"causal"``.
        mask: ``sequence`` and ``causal`` only; ``hidden.shape[:-1]``, nonzero marks tokens that count
            for routing.
    """
    # Shapes, dtypes and devices are checked by the op itself (in C++, or by the fake kernel when traced).
    return torch.ops.lily.routed_mix.default(hidden, router, bank, _check_scaling(scaling), mode, mask)


def reload_cuda_knobs() -> None:
    """Reads ``LILY_CUDA_KRON`` and ``LILY_CUDA_SCRATCH_BYTES`` again: the CUDA kernels read them once
    per process, at the first CUDA call. A no-op where the CUDA kernels are not built."""
    if hasattr(torch.ops.lily, "reload_cuda_knobs"):
        torch.ops.lily.reload_cuda_knobs()


@torch.library.register_fake("lily::routed_mix")
def _routed_mix_fake(hidden, router, bank, scaling, mode, mask=None):
    _check_args(hidden, router, bank, scaling, mode, mask)
    return hidden.new_empty((*hidden.shape[:-1], bank.shape[-1]))


@torch.library.register_fake("lily::routed_mix_backward")
def _routed_mix_backward_fake(grad, hidden, router, bank, scaling, mode, mask=None):
    _check_args(hidden, router, bank, scaling, mode, mask)
    return hidden.new_empty(hidden.shape), router.new_empty(router.shape), bank.new_empty(bank.shape)


# Autograd is registered in C++ (csrc/torch/routed_mix_autograd.cpp): no Python on the call path.

_autocast_lib = torch.library.Library("lily", "IMPL")


def _register_autocast(device_type: str) -> None:
    """Under torch.autocast the op runs in the autocast dtype (accumulating in float32, as always)."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(hidden, router, bank, scaling, mode, mask=None):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return torch.ops.lily.routed_mix.default(
                hidden.to(dtype), router.to(dtype), bank.to(dtype), scaling, mode, mask
            )

    _autocast_lib.impl("routed_mix", kernel, key)


for _device in ("cpu", "cuda"):
    _register_autocast(_device)


def routed_mix_decomposed(hidden, router, bank, *, scaling=1.0, mode="batch", mask=None):
    """The same math in plain PyTorch ops: what ``export_onnx(form="decomposed")`` traces, so the
    exported graph holds standard ONNX ops only. Not a kernel: slower, and it forms ``[N, E * r]``
    in token mode."""
    E, r, out = bank.shape
    flat = bank.reshape(E, r * out)
    if mode == "static":
        return (hidden @ (torch.softmax(router, dim=-1) @ flat).reshape(r, out)) * scaling
    probs = torch.softmax(hidden @ router.transpose(0, 1), dim=-1)
    if mode == "batch":
        return (hidden @ (probs.reshape(-1, E).mean(dim=0) @ flat).reshape(r, out)) * scaling
    if mode == "sequence" and hidden.dim() >= 3:
        if mask is None:
            weights = probs.mean(dim=-2)
        else:
            valid = (mask != 0).to(probs.dtype).unsqueeze(-1)
            weights = (probs * valid).sum(dim=-2) / valid.sum(dim=-2).clamp_min(1.0)
        combined = (weights @ flat).reshape(*weights.shape[:-1], r, out)
        return (hidden @ combined) * scaling
    if mode == "causal" and hidden.dim() >= 3:
        # running sums along the tokens: a cumulative sum, then the mean so far (0 before any token counts)
        valid = torch.ones_like(probs[..., :1]) if mask is None else (mask != 0).to(probs.dtype).unsqueeze(-1)
        weights = torch.cumsum(probs * valid, dim=-2) / torch.cumsum(valid, dim=-2).clamp_min(1.0)
        z = (weights.unsqueeze(-1) * hidden.unsqueeze(-2)).reshape(*hidden.shape[:-1], E * r)
        return (z @ bank.reshape(E * r, out)) * scaling
    if mask is not None:  # sequence / causal samples of one token each
        probs = probs * (mask != 0).to(probs.dtype).unsqueeze(-1)
    z = (probs.unsqueeze(-1) * hidden.unsqueeze(-2)).reshape(*hidden.shape[:-1], E * r)
    return (z @ bank.reshape(E * r, out)) * scaling
