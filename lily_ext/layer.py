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
# "auto" (default): fused where no gradient is recorded (decode, evaluation) and in CPU training,
# where the fused step measured faster than the composed ops (BENCHMARKS, "lily_linear"); training
# on CUDA (not measured on a GPU yet), torch.jit.trace and torch.export keep the composed ops.
# "inference": only where no gradient is recorded.
_FUSED: list = ["auto"]
FUSED_SETTINGS = (True, False, "auto", "inference")


def set_fused_layers(enabled) -> bool | str:
    """Where every LilyLinear takes the fused ``lily::lily_linear`` path (process-wide): ``"auto"``
    (the default: where autograd records nothing, and in CPU training outside torch.jit.trace and
    torch.export), ``"inference"`` (only where autograd records nothing), ``True`` (always, training
    on any device too) or ``False`` (never: the base layer, ``x A^T`` and ``routed_mix`` as separate
    ops). Returns the previous setting."""
    if not any(enabled is s or (isinstance(s, str) and enabled == s) for s in FUSED_SETTINGS):
        raise ValueError(f"set_fused_layers: expected True, False, 'auto' or 'inference', got {enabled!r}")
    previous = _FUSED[0]
    _FUSED[0] = enabled
    return previous


@contextlib.contextmanager
def fused_layers(enabled=True):
    """``with fused_layers(False): ...`` runs the block with the fused path off (``True``: on, training
    too; ``"auto"``: the default; ``"inference"``: only where autograd records nothing)."""
    previous = set_fused_layers(enabled)
    try:
        yield
    finally:
        set_fused_layers(previous)


# torch.compiler.is_exporting came with torch 2.7; on 2.6 any compile capture counts (training under
# torch.compile then keeps the composed ops there: slower, never wrong)
_is_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)


def _fuses_now(setting, x: torch.Tensor) -> bool:
    """Whether this call takes the fused op under `setting` (see _FUSED)."""
    if setting is True:
        return True
    # torch.jit.trace checks its graph again under no_grad: one path for both (the composed ops)
    if not setting or torch.jit.is_tracing():
        return False
    if not torch.is_grad_enabled():
        return True
    # "auto" in training: CPU, and no torch.export capture (its graph keeps standard ops)
    return setting == "auto" and x.device.type == "cpu" and not _is_exporting()


def _fused_device(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and hasattr(torch.ops.lily, "reload_cuda_knobs"))


# Lily v2's A side in the per-row modes (token, causal) contracts over num_A * in into only r columns:
# the op's (W kron x) Bk_flat product was measured 2-4x slower there on the CPU than one GEMM
# x @ [in, num_A * r] and the weighted sum over the experts (BENCHMARKS.md, "Lily v2's A side"), from
# a few hundred rows on. Training on the CPU takes that form (same math, autograd); inference, export
# (under no_grad), tracing and compiling keep the op.
PER_ROW_A_GEMM_MIN_ROWS = 256


def _per_row_a_as_gemm(x: torch.Tensor, bank: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (x.requires_grad or bank.requires_grad)
        and x.numel() >= PER_ROW_A_GEMM_MIN_ROWS * x.shape[-1]
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _per_row_a_side(x, router, bank, causal_mask):
    """``sum_a W_na (x_n A_a^T)``: W = softmax(x R_A^T) per token, or (``causal_mask`` given, x
    ``[..., L, in]``) its running mean over each sample's unmasked tokens so far (0 before the first)."""
    num_A, width, r = bank.shape
    probs = torch.softmax(x @ router.T, dim=-1)
    if causal_mask is not None:
        valid = (causal_mask != 0).to(probs.dtype).unsqueeze(-1)
        probs = torch.cumsum(probs * valid, dim=-2) / torch.cumsum(valid, dim=-2).clamp_min(1.0)
    experts = (x @ bank.permute(1, 0, 2).reshape(width, num_A * r)).unflatten(-1, (num_A, r))
    return (probs.unsqueeze(-1) * experts).sum(-2)


class LilyLinear(nn.Module):
    """``base_layer(x) + scaling * routed_mix(A x, router, B bank)`` for the active adapter.

    A (``lily_A``, ``nn.Linear(in, r)``) and the bank (``lily_B``, ``nn.Linear(out, num_B * r)``,
    viewed ``[num_B, r, out]``) are shared with other layers (the same module objects); the router
    (``lily_router``, ``nn.Linear(r, num_B)``) or, for static routing, the logits ``lily_theta``
    ``[num_B]`` belong to this layer. Names and layouts follow PEFT's Lily.

    A static adapter frozen to a per-layer combined bank (``freeze_router(method="optimal_bc")``)
    holds ``lily_Bc [r, out]`` instead of ``lily_theta``: its delta is ``scaling * (A x) Bc``.

    Lily v2 (``num_A``): instead of ``lily_A`` the layer holds the target's shared A bank
    ``lily_A_bank`` (a Parameter ``[num_A, in, r]``, the same object in every layer of the target)
    and its own A router ``lily_router_A`` (``nn.Linear(in, num_A)``) or, for static A routing,
    ``lily_theta_A [num_A]``: ``h = routed_mix(x, R_A, A_bank, mode=routing_A)``, then the B side.
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
        self.lily_A_bank = nn.ParameterDict()  # Lily v2: [num_A, in, r], shared by the target's layers
        self.lily_router_A = nn.ModuleDict()
        self.lily_theta_A = nn.ParameterDict()
        self.num_A: dict[str, int] = {}
        self.routing_A: dict[str, str] = {}
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
        num_A: int | None = None,
        routing_A: str | None = None,
        lily_A_bank: nn.Parameter | None = None,
    ) -> None:
        """Adds adapter ``name``; ``lily_A`` / ``lily_B`` are the shared modules (created when None).

        With ``num_A`` (Lily v2) the layer gets the shared A bank ``lily_A_bank`` (created when None)
        and its own A router (mode ``routing_A``, default ``routing``) instead of ``lily_A``."""
        self._fused = None
        factory = {"device": self.base_layer.weight.device, "dtype": dtype or self.adapter_dtype()}
        self.r[name], self.num_B[name], self.scaling[name], self.routing[name] = r, num_B, scaling, routing
        if num_A is None:
            self.lily_A[name] = lily_A if lily_A is not None else nn.Linear(self.in_features, r, bias=False, **factory)
        else:
            self.num_A[name], self.routing_A[name] = num_A, routing_A or routing
            self.lily_A_bank[name] = (
                lily_A_bank
                if lily_A_bank is not None
                else nn.Parameter(torch.empty(num_A, self.in_features, r, **factory))
            )
            if self.routing_A[name] == "static":
                self.lily_theta_A[name] = nn.Parameter(torch.empty(num_A, **factory))
            else:
                self.lily_router_A[name] = nn.Linear(self.in_features, num_A, bias=False, **factory)
        self.lily_B[name] = (
            lily_B if lily_B is not None else nn.Linear(self.out_features, num_B * r, bias=False, **factory)
        )
        if routing == "static":
            self.lily_theta[name] = nn.Parameter(torch.empty(num_B, **factory))
        else:
            self.lily_router[name] = nn.Linear(r, num_B, bias=False, **factory)
        own_A = lily_A_bank is None if num_A is not None else lily_A is None
        self.reset_parameters(name, init_weights, own_A=own_A, own_B=lily_B is None)

    @torch.no_grad()
    def reset_parameters(self, name: str, init_weights: bool, own_A: bool = True, own_B: bool = True) -> None:
        if own_A and name in self.lily_A_bank:
            # each expert A_a [r, in] Kaiming-uniform as nn.Linear(in, r) would be: bound 1 / sqrt(in)
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.lily_A_bank[name], -bound, bound)
        elif own_A:
            nn.init.kaiming_uniform_(self.lily_A[name].weight, a=math.sqrt(5))
        if name in self.lily_router_A:
            nn.init.kaiming_uniform_(self.lily_router_A[name].weight, a=math.sqrt(5))
        elif name in self.lily_theta_A:
            nn.init.uniform_(self.lily_theta_A[name], -1.0, 1.0)
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
        for table in (
            self.lily_A,
            self.lily_B,
            self.lily_router,
            self.lily_theta,
            self.lily_Bc,
            self.lily_A_bank,
            self.lily_router_A,
            self.lily_theta_A,
        ):
            if name in table:
                del table[name]
        for table in (self.r, self.num_B, self.scaling, self.routing, self.num_A, self.routing_A):
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

    # ---- Lily v2: the routed A bank ----------------------------------------------------------------

    def is_v2(self, name: str) -> bool:
        return name in self.lily_A_bank

    def a_bank(self, name: str) -> torch.Tensor:
        """Lily v2: the target's shared A bank ``[num_A, in, r]`` (expert a is ``a_bank[a].T``, ``[r, in]``)."""
        if name not in self.lily_A_bank:
            raise ValueError(f"adapter {name!r} has no A bank (LilyConfig.num_A is None: one A per stride_A layers)")
        return self.lily_A_bank[name]

    def a_router(self, name: str) -> torch.Tensor:
        """Lily v2: this layer's A router weight ``[num_A, in]``, or ``theta_A [num_A]`` for static A routing."""
        if name not in self.lily_A_bank:
            raise ValueError(f"adapter {name!r} has no A router (LilyConfig.num_A is None)")
        return self.lily_theta_A[name] if name in self.lily_theta_A else self.lily_router_A[name].weight

    def combined_a(self, name: str) -> torch.Tensor:
        """``A [r, in]`` of a static A side in float64: ``lily_A``, or ``sum_a softmax(theta_A)_a A_a``."""
        if name in self.lily_A:
            return self.lily_A[name].weight.double()
        if name not in self.lily_theta_A:
            raise ValueError(
                f"adapter {name!r} uses {self.routing_A[name]!r} routing for its A bank, which depends on the input "
                "and cannot be merged; freeze it to static weights first with lily_ext.freeze_router(model, "
                "calibration_batches)"
            )
        weights = torch.softmax(self.lily_theta_A[name].double(), dim=0)
        return torch.einsum("a,aik->ki", weights, self.lily_A_bank[name].double())

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``h [..., r]``: ``A x`` (v1) or the routed A bank's ``routed_mix(x, R_A, A_bank)`` (v2)."""
        if name in self.lily_A:
            A = self.lily_A[name].weight
            return F.linear(x.to(A.dtype), A)
        bank = self.lily_A_bank[name]
        x = x.to(bank.dtype)
        routing = self.routing_A[name]
        if routing == "causal":
            return self._causal_mix(name, x, self.lily_router_A[name].weight, bank, 1.0, side="A")
        mask = self.sequence_mask(x, "sequence") if routing == "sequence" else None
        if routing == "token" and _per_row_a_as_gemm(x, bank):
            return _per_row_a_side(x, self.lily_router_A[name].weight, bank, None)
        return routed_mix(x, self.a_router(name), bank, scaling=1.0, mode=routing, mask=mask)

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
        (or the layer's own ``lily_Bc``); for Lily v2 with both routers static ``A`` is
        ``Ac = sum_a softmax(theta_A)_a A_a``."""
        if self.routing[name] != "static":
            raise ValueError(
                f"adapter {name!r} uses {self.routing[name]!r} routing, which depends on the input and cannot be "
                "merged; freeze it to static weights first with lily_ext.freeze_router(model, calibration_batches)"
            )
        return self.scaling[name] * self.combined_bank(name).T @ self.combined_a(name)

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
    def set_static_weights_A(self, name: str, weights: torch.Tensor) -> None:
        """Lily v2: replaces the A router of adapter ``name`` by fixed mixing weights of the A bank."""
        router = self.lily_router_A[name].weight
        theta = torch.log(weights.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny))
        self.lily_theta_A[name] = nn.Parameter(theta.to(router.dtype), requires_grad=router.requires_grad)
        del self.lily_router_A[name]
        self.routing_A[name] = "static"

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
        if fused and _fuses_now(_FUSED[0], x) and not args and not kwargs:
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
        if self.disable_adapters or name is None or name not in self.r or name in self.merged_adapters:
            return result
        hidden = self.project(name, x)
        routing = self.routing[name]
        if routing == "causal":
            delta = self._causal_mix(name, hidden, self.lily_router[name].weight, self.bank(name), self.scaling[name])
        else:
            mask = self.sequence_mask(hidden) if routing == "sequence" else None
            delta = routed_mix(
                hidden, self.router(name), self.routed_bank(name), scaling=self.scaling[name], mode=routing, mask=mask
            )
        return result + delta.to(result.dtype)

    # ---- causal routing: the op, or decoding from the state the KV cache carries ----------------

    def _causal_mix(self, name: str, hidden, router, bank, scaling: float, side: str = "B") -> torch.Tensor:
        """``routed_mix(hidden, router, bank, mode="causal")``, continued from the KV cache's state when
        decoding. Each side (the B bank, and Lily v2's A bank) keeps its own state entry."""
        mask = self.sequence_mask(hidden, "causal")
        call = self._context.current()
        state = call.causal_state() if call is not None else None
        if state is None:  # no KV cache in play (training, a forward without use_cache)
            if side == "A" and hidden.dim() >= 3 and _per_row_a_as_gemm(hidden, bank):
                causal = (
                    torch.ones(hidden.shape[:-1], dtype=hidden.dtype, device=hidden.device) if mask is None else mask
                )
                return scaling * _per_row_a_side(hidden, router, bank, causal)
            return routed_mix(hidden, router, bank, scaling=scaling, mode="causal", mask=mask)
        if hidden.dim() != 3:
            raise CausalStateError(
                f"routing='causal' with a KV cache: expected [batch, seq, features] layer inputs, got "
                f"{hidden.dim()} dims ({list(hidden.shape[:-1])} tokens) at {self.lily_path or 'a Lily layer'}"
            )
        key = f"{self.lily_path}:{name}" if side == "B" else f"{self.lily_path}:{name}:{side}"
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
            delta = routed_mix(hidden, router, bank, scaling=scaling, mode="causal", mask=mask)
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
        return scaling * (z @ bank.reshape(E * r, bank.shape[-1]))

    def extra_repr(self) -> str:
        return ", ".join(
            f"{n}: r={self.r[n]}, num_B={self.num_B[n]}, routing={self.routing[n]}"
            + (f", num_A={self.num_A[n]}, routing_A={self.routing_A[n]}" if n in self.num_A else "")
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
