"""Per-call routing context and causal routing's decoding state, carried by the generation's KV cache.

``routing="causal"`` mixes token t with the running mean of the router probabilities of its
sample's unmasked tokens up to t. Decoding with a KV cache continues those means from a state per
adapted layer: ``C [batch, E]`` (running sum of the probabilities, float64) and ``n [batch]``
(unmasked tokens so far). The state is stored on the cache object the base model receives and
returns (``CAUSAL_STATE_ATTR``), never on the model, so two generations (two caches) on one model,
or two models, never share it. The cache's batch operations (``reorder_cache`` for beam search,
``batch_select_indices``, ``batch_repeat_interleave``, ``reset``) carry the state along: the cache
object's class is swapped for a subclass of its own class that does so (``track_cache``). What
cannot be followed (``crop`` of past tokens: assisted / speculative decoding) raises.

The per-call context (the attention mask, the cache, its length before the call) lives in a
``contextvars.ContextVar`` stack, so concurrent calls from several threads do not mix.
"""

from __future__ import annotations

import contextvars
import uuid

import torch

CAUSAL_STATE_ATTR = "lily_causal_state"

# The calls in progress in this thread / task, innermost last: tuples of CallContext.
CALLS: contextvars.ContextVar[tuple] = contextvars.ContextVar("lily_ext_calls", default=())


def is_cache(obj) -> bool:
    """A transformers ``Cache`` (duck-typed, so that transformers stays optional)."""
    return obj is not None and hasattr(obj, "get_seq_length") and hasattr(obj, "reorder_cache")


class CausalStateError(ValueError):
    """A KV cache whose causal routing state is missing or does not fit the call."""


class CausalState:
    """The running sums of one generation: ``sums[key] = (C [batch, E], n [batch])`` per adapted layer.

    ``owner`` identifies the LilyModel (its RoutingContext) that wrote the state; ``length`` is the
    number of tokens (the cache length) the sums cover.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.length = 0
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(self, index: torch.Tensor) -> None:
        """Keeps / reorders the batch rows ``index`` (beam search reordering, batch selection)."""
        for key, (C, n) in self.sums.items():
            i = index.to(C.device)
            self.sums[key] = (C.index_select(0, i), n.index_select(0, i))

    def repeat_interleave(self, repeats: int) -> None:
        for key, (C, n) in self.sums.items():
            self.sums[key] = (C.repeat_interleave(repeats, dim=0), n.repeat_interleave(repeats, dim=0))

    def clear(self) -> None:
        self.length = 0
        self.sums.clear()

    def __repr__(self) -> str:
        return f"CausalState(length={self.length}, layers={len(self.sums)})"


def _state_of(cache) -> CausalState | None:
    return cache.__dict__.get(CAUSAL_STATE_ATTR)


def _tracking_methods(base: type) -> dict:
    """Overrides of ``base``'s batch operations that also apply them to the causal state."""

    def rows(op):
        def method(self, *args, **kwargs):
            result = getattr(base, op)(self, *args, **kwargs)
            state = _state_of(self)
            if state is not None:
                value = args[0] if args else next(iter(kwargs.values()))
                if op == "batch_repeat_interleave":
                    state.repeat_interleave(value)
                else:
                    state.select(value)
            return result

        method.__name__ = op
        return method

    def reset(self, *args, **kwargs):
        result = base.reset(self, *args, **kwargs)
        state = _state_of(self)
        if state is not None:
            state.clear()
        return result

    def crop(self, *args, **kwargs):
        amount = args[0] if args else next(iter(kwargs.values()), 0)
        state = _state_of(self)
        if state is not None and state.sums and amount != 0:
            raise CausalStateError(
                f"routing='causal': cannot crop this KV cache ({base.__name__}.crop({amount})): the causal routing "
                "state is a running sum over every token so far and cannot drop tokens. Assisted / speculative "
                "decoding and other generation modes that roll the cache back are not supported with causal "
                "routing; generate without them, or use routing='token'"
            )
        return base.crop(self, *args, **kwargs)

    methods = {op: rows(op) for op in ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")}
    methods.update(reset=reset, crop=crop)
    return methods


_TRACKING: dict[type, type] = {}


def _tracking_class(cls: type) -> type:
    if cls.__dict__.get("_lily_tracks_causal_state", False):
        return cls
    if cls not in _TRACKING:
        namespace = _tracking_methods(cls)
        namespace.update(
            _lily_tracks_causal_state=True,
            __module__=cls.__module__,
            __qualname__=cls.__qualname__,
            __doc__=cls.__doc__,
        )
        _TRACKING[cls] = type(cls.__name__, (cls,), namespace)
    return _TRACKING[cls]


def track_cache(cache, state: CausalState) -> None:
    """Stores ``state`` on ``cache`` and makes the cache's batch operations apply to it too."""
    cls = type(cache)
    tracking = _tracking_class(cls)
    if tracking is not cls:
        cache.__class__ = tracking
    setattr(cache, CAUSAL_STATE_ATTR, state)


class CallContext:
    """What one call of the wrapped model hands to its Lily layers."""

    def __init__(self, context):
        self.context = context  # the RoutingContext of the model called
        self.mask = None  # the attention mask, for sequence / causal routing
        self.cache = None  # the KV cache passed in, if any
        self.past = 0  # its length before the call
        self.wants_state = False  # a cache is passed in or will be returned
        self.state: CausalState | None = None  # created by the first causal layer that needs it
        self.used = False  # some layer read or wrote the causal state during this call
        self.tracing = False  # torch.compile / export / jit tracing: no state (decoding runs eagerly)

    def causal_state(self) -> CausalState | None:
        """The state causal layers continue from and update; None when no cache is in play.

        The first call validates the cache: a cache holding past tokens must carry this model's
        state covering exactly those tokens.
        """
        if self.tracing:
            if self.past > 0:
                raise CausalStateError(
                    "routing='causal': decoding from a KV cache that holds past tokens runs eagerly only, not under "
                    "torch.compile, torch.export or tracing (the routing state lives on the cache object)"
                )
            return None
        if self.state is None and self.wants_state:
            if self.cache is not None and not is_cache(self.cache):
                raise CausalStateError(
                    f"routing='causal': the KV cache must be a transformers Cache (e.g. DynamicCache), got "
                    f"{type(self.cache).__name__}"
                )
            state = None if self.cache is None else _state_of(self.cache)
            if self.past == 0 or self.cache is None:
                state = CausalState(self.context.uid)
            elif state is None:
                raise CausalStateError(
                    f"routing='causal': the KV cache holds {self.past} past tokens but no causal routing state; it was "
                    "filled by another model, by a call with the adapter disabled or not causal, or built by hand. "
                    "Start from an empty cache (or none) with this model"
                )
            elif state.owner != self.context.uid:
                raise CausalStateError(
                    "routing='causal': this KV cache's causal routing state was written by another LilyModel; a cache "
                    "can only continue with the model that filled it"
                )
            elif state.length != self.past:
                raise CausalStateError(
                    f"routing='causal': the KV cache holds {self.past} tokens but its causal routing state covers "
                    f"{state.length}; the cache was changed without this model's causal adapter (adapter disabled, "
                    "another adapter active, or cropped). Start from an empty cache"
                )
            self.state = state
        if self.state is not None:
            self.used = True
        return self.state


class RoutingContext:
    """The per-call state a LilyModel hands to its Lily layers (the attention mask, the KV cache).

    Every call of the wrapped model pushes a ``CallContext`` (``enter``) and pops it when it
    returns (``leave``); ``current()`` is the innermost call of this model in this thread. Under
    torch.compile (which cannot trace ``ContextVar.set``) the calls are kept on the object instead.
    """

    def __init__(self):
        self.uid = uuid.uuid4().hex
        self._mask = None  # a mask set by hand, used outside of model calls
        self._compiled_calls: list[CallContext] = []

    def __deepcopy__(self, memo):
        return RoutingContext()  # a copied model is another model: its own identity, no call in progress

    def current(self) -> CallContext | None:
        if torch.compiler.is_compiling():
            return self._compiled_calls[-1] if self._compiled_calls else None
        for call in reversed(CALLS.get()):
            if call.context is self:
                return call
        return None

    @property
    def mask(self):
        call = self.current()
        return self._mask if call is None else call.mask

    @mask.setter
    def mask(self, value):
        call = self.current()
        if call is None:
            self._mask = value
        else:
            call.mask = value

    def enter(self) -> CallContext:
        call = CallContext(self)
        if torch.compiler.is_compiling():
            self._compiled_calls.append(call)
        else:
            CALLS.set((*CALLS.get(), call))
        return call

    def leave(self) -> CallContext | None:
        if torch.compiler.is_compiling():
            return self._compiled_calls.pop() if self._compiled_calls else None
        calls = CALLS.get()
        for i in range(len(calls) - 1, -1, -1):
            if calls[i].context is self:
                CALLS.set(calls[:i] + calls[i + 1 :])
                return calls[i]
        return None
