"""LilyConfig: what to adapt and how, with the same fields and meaning as PEFT's ``LilyConfig``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ROUTINGS = ("batch", "sequence", "token", "static", "causal")


@dataclass
class LilyConfig:
    """Configuration of a Lily adapter.

    Args:
        r: rank of every adapter (the low dimension of A and of each B expert).
        stride_A: how many consecutive matching layers of one target share an A.
        num_B: number of B experts in the bank shared by all layers of one target.
        scaling: plain multiplier of the adapter output (not alpha / r).
        target_modules: module names to adapt: a list (exact name or ``.``-suffix match) or a
            regex string (full match); ``"all-linear"`` adapts every ``nn.Linear`` but the output
            layer. ``None`` picks PEFT's default for the model type of a ``transformers`` model.
        exclude_modules: names (list: exact or suffix match; str: regex) never adapted.
        layers_to_transform / layers_pattern: restrict adaptation to these layer indices, as in PEFT.
        modules_to_save: extra modules (e.g. a classifier head) trained and saved with the adapter.
        init_weights: A and routers Kaiming-uniform, B zeros (adapter starts as a no-op); False
            initialises B Kaiming-uniform too.
        routing: ``"batch"`` (PEFT's math), ``"sequence"`` (per-sample, batch-invariant with the
            attention mask), ``"token"``, ``"static"`` (learned input-independent weights; mergeable) or
            ``"causal"`` (per sample, the running mean over its tokens so far: safe for decoders, exact
            under a KV cache; the decoding state travels with the generation's cache).
        num_A: ``None`` (Lily as published: one A per block of ``stride_A`` layers) or an int >= 2:
            Lily v2, a bank of ``num_A`` A experts (``[r, in]`` each) per target, shared by every layer
            of the target, mixed per layer by its own A router (``[num_A, in]``, or logits
            ``[num_A]`` for static routing): ``h = x (sum_a w_a A_a)^T``, then the B side as usual.
            ``stride_A`` does not apply (it must stay 1).
        routing_A: the A router's mode (any of ``routing``'s); ``None`` means the same as ``routing``.
            Only with ``num_A``.
    """

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    routing: str = field(default="batch")
    num_A: int | None = None
    routing_A: str | None = None

    def __post_init__(self):
        def positive_int(name, value, minimum):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"LilyConfig.{name}: expected an integer >= {minimum}, got {value!r}")

        positive_int("r", self.r, 1)
        positive_int("stride_A", self.stride_A, 1)
        if isinstance(self.num_B, int) and not isinstance(self.num_B, bool) and self.num_B < 2:
            raise ValueError(f"LilyConfig.num_B: the router mixes B experts and needs num_B >= 2, got {self.num_B}")
        positive_int("num_B", self.num_B, 2)
        if (
            isinstance(self.scaling, bool)
            or not isinstance(self.scaling, (int, float))
            or not math.isfinite(self.scaling)
        ):
            raise ValueError(f"LilyConfig.scaling: expected a finite number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if self.routing not in ROUTINGS:
            raise ValueError(
                f"LilyConfig.routing: expected one of {', '.join(map(repr, ROUTINGS))}, got {self.routing!r}"
            )
        if self.num_A is not None:
            if isinstance(self.num_A, int) and not isinstance(self.num_A, bool) and self.num_A < 2:
                raise ValueError(
                    f"LilyConfig.num_A: the A router mixes A experts and needs num_A >= 2 (or None), got {self.num_A}"
                )
            if isinstance(self.num_A, bool) or not isinstance(self.num_A, int):
                raise ValueError(f"LilyConfig.num_A: expected None or an integer >= 2, got {self.num_A!r}")
            if self.stride_A != 1:
                raise ValueError(
                    f"LilyConfig: num_A={self.num_A} and stride_A={self.stride_A} cannot be combined: with num_A "
                    "(Lily v2) the A bank is shared by every layer of a target and routed per layer, so stride_A "
                    "does not apply; leave stride_A at 1"
                )
            if self.routing_A is None:
                self.routing_A = self.routing
        if self.routing_A is not None:
            if self.routing_A not in ROUTINGS:
                raise ValueError(
                    f"LilyConfig.routing_A: expected one of {', '.join(map(repr, ROUTINGS))} or None, "
                    f"got {self.routing_A!r}"
                )
            if self.num_A is None:
                raise ValueError(
                    f"LilyConfig.routing_A: {self.routing_A!r} routes an A bank, which needs num_A (an int >= 2); "
                    "without num_A there is no A router"
                )
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"LilyConfig.{name}: expected a list of str, a regex str or None, got {value!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("LilyConfig.target_modules: the list is empty; name at least one module")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, (set, tuple)):
                self.modules_to_save = list(self.modules_to_save)
            if not isinstance(self.modules_to_save, list) or not all(isinstance(v, str) for v in self.modules_to_save):
                raise ValueError(f"LilyConfig.modules_to_save: expected a list of str, got {self.modules_to_save!r}")
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                pass
            elif not isinstance(layers, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise ValueError(f"LilyConfig.layers_to_transform: expected an int or a list of int, got {layers!r}")
        if self.layers_pattern is not None and layers is None:
            raise ValueError("LilyConfig.layers_pattern: only meaningful together with layers_to_transform")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LilyConfig.init_weights: expected a bool, got {self.init_weights!r}")

    @property
    def is_v2(self) -> bool:
        """Lily v2: a routed A bank (``num_A`` set)."""
        return self.num_A is not None

    def to_dict(self) -> dict:
        """The fields as a dict; a v1 adapter's dict omits ``num_A`` / ``routing_A`` (None), so that it is
        what earlier versions wrote and read."""
        data = dataclasses.asdict(self)
        if self.num_A is None:
            del data["num_A"], data["routing_A"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LilyConfig:
        if not isinstance(data, dict):
            raise ValueError(f"LilyConfig: expected a dict of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LilyConfig: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**data)
