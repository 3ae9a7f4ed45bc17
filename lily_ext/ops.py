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

__all__ = ["routed_mix", "lily_linear", "reload_cuda_knobs", "MODES"]


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


def lily_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    router: torch.Tensor,
    bank: torch.Tensor,
    *,
    scaling: float = 1.0,
    mode: str = "batch",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole Lily layer in one op: ``x W^T + b + scaling * routed_mix(x A^T, router, bank)``.

    Differentiable in every tensor argument. ``x``, ``weight`` ``[out, in]`` and ``bias`` ``[out]`` share
    the base layer's dtype; ``A`` ``[r, in]``, ``router`` and ``bank`` (``[E, r, out]``, or lily_B's flat
    ``[E * r, out]``) share the adapter's. ``mode`` and ``mask`` (``x.shape[:-1]``) as in
    :func:`routed_mix`. The result has ``x``'s dtype; the adapter is computed in float32 for half
    precision and added once. Contract: docs/DESIGN.md, "lily_linear".
    """
    return torch.ops.lily.lily_linear.default(x, weight, bias, A, router, bank, _check_scaling(scaling), mode, mask)


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_linear_args(x, weight, bias, A, router, bank, scaling, mode, mask):
    """Mirror of the C++ checks of lily_linear (csrc/torch/lily_linear.cpp); returns bank as [E, r, out]."""
    for name, t in (("x", x), ("weight", weight), ("A", A), ("router", router), ("bank", bank)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    _check_scaling(scaling)
    if x.dtype not in DTYPES:
        raise ValueError(f"x: expected dtype float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x: expected a tensor [..., in] with at least 1 dim, got a 0-dim tensor")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if t.dtype != x.dtype:
                raise ValueError(f"{name}: dtype {t.dtype} differs from x's dtype {x.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name}: on device {t.device} but x is on {x.device}")
    if A.dtype not in DTYPES:
        raise ValueError(f"A: expected dtype float32, float64, bfloat16 or float16, got {A.dtype}")
    if A.device != x.device:
        raise ValueError(f"A: on device {A.device} but x is on {x.device}")
    for name, t in (("router", router), ("bank", bank)):
        if t.dtype != A.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from A's dtype {A.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device} but x is on {x.device}")
    n_in = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n_in:
        raise ValueError(
            f"weight: expected shape [out, in] with in = {n_in} (x's last dim), got shape {list(weight.shape)}"
        )
    out = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out):
        raise ValueError(f"bias: expected shape [{out}], got shape {list(bias.shape)}")
    if A.dim() != 2 or A.shape[1] != n_in or A.shape[0] < 1:
        raise ValueError(f"A: expected shape [r, in] with in = {n_in} and r >= 1, got shape {list(A.shape)}")
    r = A.shape[0]
    if bank.dim() == 2:
        if router.dim() == 0:
            raise ValueError("router: expected [E, r] or theta [E], got a 0-dim tensor")
        E = router.shape[0]
        if bank.shape[0] != E * r or bank.shape[1] != out:
            raise ValueError(
                f"bank: expected shape [E, r, out] = [{E}, {r}, {out}] or its flat view [E * r, out] = "
                f"[{E * r}, {out}], got shape {list(bank.shape)}"
            )
        bank = bank.view(E, r, out)
    elif bank.dim() != 3 or bank.shape[1] != r or bank.shape[2] != out:
        raise ValueError(
            f"bank: expected shape [E, r, out] with r = {r} (A's rows) and out = {out} (weight's rows), "
            f"got shape {list(bank.shape)}"
        )
    if mask is not None and mask.device != x.device:
        raise ValueError(f"mask: on device {mask.device} but x is on {x.device}")
    hidden = x.new_empty((*x.shape[:-1], r), dtype=A.dtype)
    _check_args(hidden, router, bank, scaling, mode, mask)
    return bank


@torch.library.register_fake("lily::lily_linear")
def _lily_linear_fake(x, weight, bias, A, router, bank, scaling, mode, mask=None):
    _check_linear_args(x, weight, bias, A, router, bank, scaling, mode, mask)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("lily::lily_linear_forward")
def _lily_linear_forward_fake(x, weight, bias, A, router, bank, scaling, mode, mask=None):
    _check_linear_args(x, weight, bias, A, router, bank, scaling, mode, mask)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((*x.shape[:-1], A.shape[0]), dtype=A.dtype)


@torch.library.register_fake("lily::lily_linear_backward")
def _lily_linear_backward_fake(grad, x, hidden, weight, A, router, bank, scaling, mode, mask, needs):
    _check_linear_args(x, weight, None, A, router, bank, scaling, mode, mask)
    return (  # gradients not asked for: distinct empty tensors (outputs never alias)
        x.new_empty(x.shape if needs[0] else (0,)),
        weight.new_empty(weight.shape if needs[1] else (0,)),
        weight.new_empty(weight.shape[:1] if needs[2] else (0,)),
        A.new_empty(A.shape) if needs[3] else x.new_empty((0,)),
        router.new_empty(router.shape),
        bank.new_empty(bank.shape),
    )


# Autograd of both ops is registered in C++ (csrc/torch/routed_mix_autograd.cpp,
# csrc/torch/lily_linear.cpp): no Python on the call path.

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

    def linear_kernel(x, weight, bias, A, router, bank, scaling, mode, mask=None):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [t if t is None else t.to(dtype) for t in (x, weight, bias, A, router, bank)]
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return torch.ops.lily.lily_linear.default(*cast, scaling, mode, mask)

    _autocast_lib.impl("lily_linear", linear_kernel, key)


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
