"""Adapter layers: LilyLinear (a frozen nn.Linear plus Lily adapters) and ModulesToSave."""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .causal import CausalStateError, RoutingContext
from .ops import lily_linear, routed_mix

_LILY_LINEAR = torch.ops.lily.lily_linear.default

# Whether LilyLinear.forward runs the fused op lily::lily_linear where it can (see _fused_call).
_FUSED = [True]


def set_fused_layers(enabled: bool) -> bool:
    """Turns the fused ``lily::lily_linear`` path of every LilyLinear on or off (process-wide);
    returns the previous setting. Off: the base layer, ``x A^T`` and ``routed_mix`` as separate ops."""
    previous = _FUSED[0]
    _FUSED[0] = bool(enabled)
    return previous


@contextlib.contextmanager
def fused_layers(enabled: bool = True):
    """``with fused_layers(False): ...`` runs the block with the fused path off (or on)."""
    previous = set_fused_layers(enabled)
    try:
        yield
    finally:
        set_fused_layers(previous)


def _fused_device(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and hasattr(torch.ops.lily, "reload_cuda_knobs"))


class LilyLinear(nn.Module):
    """``base_layer(x) + scaling * routed_mix(A x, router, B bank)`` for the active adapter.

    A (``lily_A``, ``nn.Linear(in, r)``) and the bank (``lily_B``, ``nn.Linear(out, num_B * r)``,
    viewed ``[num_B, r, out]``) are shared with other layers (the same module objects); the router
    (``lily_router``, ``nn.Linear(r, num_B)``) or, for static routing, the logits ``lily_theta``
    ``[num_B]`` belong to this layer. Names and layouts follow PEFT's Lily.

    A static adapter frozen to a per-layer combined bank (``freeze_router(method="optimal_bc")``)
    holds ``lily_Bc [r, out]`` instead of ``lily_theta``: its delta is ``scaling * (A x) Bc``.
    """

    def __init__(self, base_layer: nn.Linear, context: RoutingContext):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lily_A = nn.ModuleDict()
        self.lily_B = nn.ModuleDict()
        self.lily_router = nn.ModuleDict()
        self.lily_theta = nn.ParameterDict()
        self.lily_Bc = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.num_B: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.routing: dict[str, str] = {}
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self._context = context
        self.lily_path = ""  # the layer's path in the wrapped model (set by LilyModel): its causal state key
        # The fused call's arguments for the active adapter, built on first use (_fused_args) and
        # dropped by every method that changes the adapters or moves the parameters.
        self._fused = None

    def __setattr__(self, name, value):
        if name in ("active_adapter", "disable_adapters"):
            self.__dict__["_fused"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        self._fused = None
        return super()._apply(fn, *args, **kwargs)

    def adapter_dtype(self) -> torch.dtype:
        # Like PEFT: adapters of a half-precision base model are kept in float32.
        dtype = self.base_layer.weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def add_adapter(
        self,
        name: str,
        r: int,
        num_B: int,
        scaling: float,
        routing: str,
        init_weights: bool,
        lily_A: nn.Linear | None = None,
        lily_B: nn.Linear | None = None,
        dtype=None,
    ) -> None:
        """Adds adapter ``name``; ``lily_A`` / ``lily_B`` are the shared modules (created when None)."""
        self._fused = None
        factory = {"device": self.base_layer.weight.device, "dtype": dtype or self.adapter_dtype()}
        self.r[name], self.num_B[name], self.scaling[name], self.routing[name] = r, num_B, scaling, routing
        self.lily_A[name] = lily_A if lily_A is not None else nn.Linear(self.in_features, r, bias=False, **factory)
        self.lily_B[name] = (
            lily_B if lily_B is not None else nn.Linear(self.out_features, num_B * r, bias=False, **factory)
        )
        if routing == "static":
            self.lily_theta[name] = nn.Parameter(torch.empty(num_B, **factory))
        else:
            self.lily_router[name] = nn.Linear(r, num_B, bias=False, **factory)
        self.reset_parameters(name, init_weights, own_A=lily_A is None, own_B=lily_B is None)

    @torch.no_grad()
    def reset_parameters(self, name: str, init_weights: bool, own_A: bool = True, own_B: bool = True) -> None:
        if own_A:
            nn.init.kaiming_uniform_(self.lily_A[name].weight, a=math.sqrt(5))
        if own_B:
            if init_weights:
                nn.init.zeros_(self.lily_B[name].weight)
            else:
                nn.init.kaiming_uniform_(self.lily_B[name].weight, a=math.sqrt(5))
        if name in self.lily_router:
            nn.init.kaiming_uniform_(self.lily_router[name].weight, a=math.sqrt(5))
        else:
            # Distinct per-layer logits break the symmetry between experts that start equal (B = 0).
            nn.init.uniform_(self.lily_theta[name], -1.0, 1.0)

    def delete_adapter(self, name: str) -> None:
        self._fused = None
        for table in (self.lily_A, self.lily_B, self.lily_router, self.lily_theta, self.lily_Bc):
            if name in table:
                del table[name]
        for table in (self.r, self.num_B, self.scaling, self.routing):
            table.pop(name, None)
        if name in self.merged_adapters:
            self.merged_adapters.remove(name)
        if self.active_adapter == name:
            self.active_adapter = None

    def bank(self, name: str) -> torch.Tensor:
        return self.lily_B[name].weight.view(self.num_B[name], self.r[name], self.out_features)

    def router(self, name: str) -> torch.Tensor:
        if name in self.lily_Bc:  # one expert, its own combined bank: softmax([0]) = [1]
            return self.lily_Bc[name].new_zeros(1)
        return self.lily_theta[name] if self.routing[name] == "static" else self.lily_router[name].weight

    def routed_bank(self, name: str) -> torch.Tensor:
        """The bank ``routed_mix`` mixes: the shared ``[num_B, r, out]`` one, or ``[1, r, out]`` for a
        layer frozen to its own combined bank ``lily_Bc``."""
        return self.lily_Bc[name].unsqueeze(0) if name in self.lily_Bc else self.bank(name)

    def combined_bank(self, name: str) -> torch.Tensor:
        """``Bc [r, out]`` of a static adapter in float64: ``lily_Bc``, or ``sum_e softmax(theta)_e Bk_e``."""
        if name in self.lily_Bc:
            return self.lily_Bc[name].double()
        weights = torch.softmax(self.lily_theta[name].double(), dim=0)
        return torch.einsum("e,eio->io", weights, self.bank(name).double())

    # ---- static routing: merging into the base weight ----------------------------------------

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * Bc^T A`` ([out, in]) for a static adapter, ``Bc = sum_e softmax(theta)_e Bk_e``
        (or the layer's own ``lily_Bc``)."""
        if self.routing[name] != "static":
            raise ValueError(
                f"adapter {name!r} uses {self.routing[name]!r} routing, which depends on the input and cannot be "
                "merged; freeze it to static weights first with lily_ext.freeze_router(model, calibration_batches)"
            )
        A = self.lily_A[name].weight.double()
        return self.scaling[name] * self.combined_bank(name).T @ A

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is already merged into {self.base_layer!r}; unmerge it first")
        self._fused = None
        weight = self.base_layer.weight
        weight.copy_((weight.double() + self.delta_weight(name)).to(weight.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        self._fused = None
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.copy_((weight.double() - self.delta_weight(name)).to(weight.dtype))

    @torch.no_grad()
    def set_static_weights(self, name: str, weights: torch.Tensor) -> None:
        """Replaces the router of adapter ``name`` by fixed mixing weights (static routing)."""
        self._fused = None
        router = self.lily_router[name].weight
        theta = torch.log(weights.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
        self.lily_theta[name] = nn.Parameter(theta.to(router.dtype), requires_grad=router.requires_grad)
        del self.lily_router[name]
        self.routing[name] = "static"

    @torch.no_grad()
    def set_static_bank(self, name: str, combined: torch.Tensor) -> None:
        """Replaces the router of adapter ``name`` by this layer's own static combined bank
        ``Bc [r, out]`` (static routing; any ``[r, out]`` matrix, not only a mix of the shared bank)."""
        self._fused = None
        router = self.lily_router[name].weight
        shape = (self.r[name], self.out_features)
        if tuple(combined.shape) != shape:
            raise ValueError(f"combined: expected shape {list(shape)}, got {list(combined.shape)}")
        bank = combined.to(device=router.device, dtype=router.dtype).clone()
        self.lily_Bc[name] = nn.Parameter(bank, requires_grad=router.requires_grad)
        del self.lily_router[name]
        self.routing[name] = "static"

    def sequence_mask(self, hidden: torch.Tensor, routing: str = "sequence"):
        """The current call's attention mask for ``hidden``'s tokens (``hidden.shape[:-1]``), or None."""
        mask = self._context.mask
        if mask is None or tuple(mask.shape) == tuple(hidden.shape[:-1]):
            return mask
        if (
            hidden.dim() == 3
            and mask.dim() == 2
            and mask.shape[0] == hidden.shape[0]
            and mask.shape[1] > hidden.shape[1]
        ):
            # decoding with a KV cache: the mask covers past tokens too; the current ones are last
            return mask[:, -hidden.shape[1] :]
        raise ValueError(
            f"{routing} routing: the attention_mask has shape {list(mask.shape)} but this layer's input "
            f"is {list(hidden.shape[:-1])} tokens; pass a [batch, seq] mask that matches the input"
        )

    def _fused_args(self):
        """``(name, weight, bias, A, router, flat bank, scaling, mode)`` for the fused op, or ``False``
        where the layer takes the composed path (adapter off or merged, a layer frozen to its own
        ``lily_Bc``, a base layer that is not a plain hook-free ``nn.Linear``, a device without kernels)."""
        name, base = self.active_adapter, self.base_layer
        if (
            self.disable_adapters
            or name is None
            or name not in self.lily_A
            or name in self.merged_adapters
            or name in self.lily_Bc
            or type(base) is not nn.Linear
            or base._forward_hooks
            or base._forward_pre_hooks
            or not _fused_device(base.weight.device)
        ):
            return False
        return (
            name,
            base.weight,
            base.bias,
            self.lily_A[name].weight,
            self.router(name),
            self.lily_B[name].weight,  # flat [num_B * r, out]; the op reads it as [num_B, r, out]
            self.scaling[name],
            self.routing[name],
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused = self._fused
        if fused is None:
            fused = self._fused = self._fused_args()
        if fused and _FUSED[0] and not args and not kwargs:
            _, weight, bias, A, router, bank, scaling, mode = fused
            if mode == "sequence":
                return lily_linear(
                    x, weight, bias, A, router, bank, scaling=scaling, mode=mode, mask=self.sequence_mask(x)
                )
            if mode == "causal":
                call = self._context.current()
                if call is None or call.causal_state() is None:  # no KV cache in play
                    mask = self.sequence_mask(x, "causal")
                    return lily_linear(x, weight, bias, A, router, bank, scaling=scaling, mode=mode, mask=mask)
                # decoding with a KV cache: the running state, below
            else:
                return _LILY_LINEAR(x, weight, bias, A, router, bank, scaling, mode, None)
        return self._composed_forward(x, *args, **kwargs)

    def _composed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer, ``x A^T`` and ``routed_mix`` as separate ops (also: causal decoding with a KV cache)."""
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disable_adapters or name is None or name not in self.lily_A or name in self.merged_adapters:
            return result
        A = self.lily_A[name].weight
        hidden = F.linear(x.to(A.dtype), A)
        routing = self.routing[name]
        if routing == "causal":
            delta = self._causal_mix(name, hidden)
        else:
            mask = self.sequence_mask(hidden) if routing == "sequence" else None
            delta = routed_mix(
                hidden, self.router(name), self.routed_bank(name), scaling=self.scaling[name], mode=routing, mask=mask
            )
        return result + delta.to(result.dtype)

    # ---- causal routing: the op, or decoding from the state the KV cache carries ----------------

    def _causal_mix(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.sequence_mask(hidden, "causal")
        router, scaling = self.lily_router[name].weight, self.scaling[name]
        call = self._context.current()
        state = call.causal_state() if call is not None else None
        if state is None:  # no KV cache in play (training, a forward without use_cache)
            return routed_mix(hidden, router, self.bank(name), scaling=scaling, mode="causal", mask=mask)
        if hidden.dim() != 3:
            raise CausalStateError(
                f"routing='causal' with a KV cache: expected [batch, seq, features] layer inputs, got "
                f"{hidden.dim()} dims ({list(hidden.shape[:-1])} tokens) at {self.lily_path or 'a Lily layer'}"
            )
        key = f"{self.lily_path}:{name}"
        batch = hidden.shape[0]
        acc = torch.float32 if hidden.device.type == "mps" else torch.float64  # running sums (MPS has no float64)
        valid = (
            torch.ones(hidden.shape[:-1], dtype=acc, device=hidden.device)
            if mask is None
            else (mask != 0).to(device=hidden.device, dtype=acc)
        )
        past = state.sums.get(key)
        if past is None and call.past > 0:
            raise CausalStateError(
                f"routing='causal': the KV cache's causal routing state has no entry for layer {key!r} (adapter "
                f"{name!r}); the cache was filled with another adapter active. Start from an empty cache"
            )
        if past is not None and past[0].shape[0] != batch:
            raise CausalStateError(
                f"routing='causal': the KV cache's causal routing state holds {past[0].shape[0]} samples but this "
                f"call has {batch}; continue a cache with the batch that filled it"
            )
        if past is None:  # first tokens: the op (fast path), then the state from the same probabilities
            delta = routed_mix(hidden, router, self.bank(name), scaling=scaling, mode="causal", mask=mask)
            with torch.no_grad():
                probs = torch.softmax(hidden.detach().to(acc) @ router.detach().to(acc).T, dim=-1)
                state.sums[key] = ((probs * valid.unsqueeze(-1)).sum(1), valid.sum(1))
            return delta
        # continue the running means from the cached sums: C_t = C0 + sum_{u<=t} m_u P_u, n_t = n0 + sum m_u
        C0, n0 = past
        probs = torch.softmax(hidden.to(acc) @ router.to(acc).T, dim=-1)
        C = C0.unsqueeze(1) + torch.cumsum(probs * valid.unsqueeze(-1), dim=1)
        n = n0.unsqueeze(1) + torch.cumsum(valid, dim=1)
        weights = (C / n.clamp_min(1.0).unsqueeze(-1)).to(hidden.dtype)  # 0 while n == 0 (C is 0 too)
        E, r = weights.shape[-1], hidden.shape[-1]
        z = (weights.unsqueeze(-1) * hidden.unsqueeze(-2)).reshape(*hidden.shape[:-1], E * r)
        state.sums[key] = (C[:, -1].detach(), n[:, -1].detach())
        return scaling * (z @ self.lily_B[name].weight)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{n}: r={self.r[n]}, num_B={self.num_B[n]}, routing={self.routing[n]}"
            + (" (own combined bank)" if n in self.lily_Bc else "")
            for n in self.r
        )


class ModulesToSave(nn.Module):
    """Keeps the original module and one trainable copy per adapter (PEFT's ModulesToSaveWrapper)."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        self._fused = None
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        name = self.active_adapter
        if self.disable_adapters or name is None or name not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[name](*args, **kwargs)
