"""LilyModel: Lily adapters injected into any PyTorch / Hugging Face model, PEFT's semantics."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings

import torch
from torch import nn

from .causal import is_cache, track_cache
from .checkpoint import adapter_dtype, assign_tensors, load_into, read_adapter, save_adapter
from .config import LilyConfig
from .layer import LilyLinear, ModulesToSave, RoutingContext
from .peft_format import save_peft_adapter
from .targets import ShareGroup, modules_to_save_paths, plan_adapter, set_module

CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.? renamed past_key_values to cache


def _find_argument(forward, args, kwargs, names, default=None):
    """The first of ``names`` passed to ``forward`` (as a keyword, or bound from the positional args)."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
    if args:
        try:
            bound = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):
            return default
        for name in names:
            if name in bound:
                return bound[name]
    return default


_TAKES_CACHE: dict = {}


def _takes_cache(forward) -> bool:
    """Whether ``forward`` has a KV-cache parameter (so that a call may return a cache)."""
    func = getattr(forward, "__func__", forward)
    takes = _TAKES_CACHE.get(func)
    if takes is None:
        try:
            parameters = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            parameters = {}
        takes = _TAKES_CACHE[func] = any(name in parameters for name in CACHE_ARGUMENTS)
    return takes


def _find_attention_mask(forward, args, kwargs):
    return _find_argument(forward, args, kwargs, ("attention_mask",))


def _output_cache(output):
    """The KV cache a model call returned (``output.cache`` / ``output.past_key_values``), or None."""
    if isinstance(output, dict):  # transformers' ModelOutput
        for name in CACHE_ARGUMENTS:
            if is_cache(output.get(name)):
                return output[name]
        return None
    if isinstance(output, (tuple, list)):
        return next((item for item in output if is_cache(item)), None)
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None)
        if is_cache(value):
            return value
    return None


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside lily_ext, for a warning issued by the caller of this."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    return level


class NonCausalRoutingWarning(UserWarning):
    """Batch / sequence routing on a decoder: future tokens leak into earlier positions."""


def is_decoder(model: nn.Module) -> bool:
    """Whether ``model`` looks like an autoregressive decoder (a causal LM, or a model that generates)."""
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    config = getattr(model, "config", None)
    if config is not None and (getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False)):
        return True
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        try:
            return bool(can_generate())
        except Exception:  # a foreign can_generate: no opinion
            return False
    return False


class LilyModel(nn.Module):
    """A base model with Lily adapters. Calls are forwarded to the base model.

    Attributes it does not have itself are looked up on the base model (``model.config``,
    ``model.generate``...), as with PEFT's models.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LilyConfig,
        adapter_name: str = "default",
        *,
        dtype: torch.dtype | None = None,
        trainable: bool = True,
    ):
        super().__init__()
        self.model = model
        self.configs: dict[str, LilyConfig] = {}
        self.groups: dict[str, list[ShareGroup]] = {}
        self.trainable: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self._context = RoutingContext()
        # Every call into the base model (direct, generate(), a Trainer) hands its attention mask
        # (sequence / causal routing) and its KV cache (causal routing) to the layers.
        self._hooks = [
            model.register_forward_pre_hook(self._enter_call, with_kwargs=True),
            model.register_forward_hook(self._leave_call, always_call=True),
        ]
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, dtype=dtype, trainable=trainable)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- calling -------------------------------------------------------------------------

    def _enter_call(self, module, args, kwargs):
        call = self._context.enter()  # first: the post-hook runs (and pops it) even if what follows raises
        call.mask = _find_attention_mask(module.forward, args, kwargs)
        call.tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        cache = _find_argument(module.forward, args, kwargs, CACHE_ARGUMENTS)
        if cache is not None:
            # (a legacy tuple cache: causal layers raise when they need its state)
            call.cache, call.past, call.wants_state = cache, cache.get_seq_length() if is_cache(cache) else 0, True
        elif not call.tracing and _takes_cache(module.forward):
            use_cache = _find_argument(module.forward, args, kwargs, ("use_cache",))
            if use_cache is None:
                use_cache = getattr(getattr(module, "config", None), "use_cache", False)
            call.wants_state = bool(use_cache)

    def _leave_call(self, module, args, output):
        call = self._context.leave()
        if call is None or call.state is None or not call.used:
            return
        cache = _output_cache(output)
        if cache is None:
            cache = call.cache
        if cache is not None:
            call.state.length = cache.get_seq_length()
            track_cache(cache, call.state)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---- adapters ------------------------------------------------------------------------

    def lily_layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LilyLinear)]

    def add_adapter(
        self, adapter_name: str, config: LilyConfig, *, dtype: torch.dtype | None = None, trainable: bool = True
    ) -> None:
        """Injects a new adapter (not made active: see ``set_adapter``).

        ``dtype``: of the adapter weights (default: the base layer's, float32 for half precision);
        ``trainable=False`` keeps it frozen even when active (inference).
        """
        if not isinstance(config, LilyConfig):
            raise TypeError(f"config: expected a lily_ext.LilyConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name: expected a non-empty name without '.', got {adapter_name!r}")
        if adapter_name in self.configs:
            raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
        groups = plan_adapter(self.model, config)
        save_paths = modules_to_save_paths(self.model, config)
        leaky = next(
            (
                f"{k}={v!r}"
                for k, v in (("routing", config.routing), ("routing_A", config.routing_A))
                if v in ("batch", "sequence")
            ),
            None,
        )
        if leaky is not None and is_decoder(self.model):
            warnings.warn(
                f"adapter {adapter_name!r}: {leaky} on a decoder ({type(self.model).__name__}) averages "
                "the router over whole sequences, so future tokens leak into earlier positions (a teacher-forced "
                "forward is not causal) and KV-cache generation differs from the forward pass. Use "
                'routing="causal" (exact with a KV cache), "token" or "static" for causal language models',
                NonCausalRoutingWarning,
                stacklevel=_caller_stacklevel(),
            )
        for group in groups:
            shared_B = shared_A_bank = None  # (Lily v2: one A bank per group, like the B bank)
            for block in group.a_blocks(config.stride_A):
                shared_A = None
                for path in block:
                    layer = self.model.get_submodule(path)
                    if not isinstance(layer, LilyLinear):
                        layer = LilyLinear(layer, self._context)
                        layer.lily_path = path
                        set_module(self.model, path, layer)
                    layer.add_adapter(
                        adapter_name,
                        config.r,
                        config.num_B,
                        config.scaling,
                        config.routing,
                        config.init_weights,
                        lily_A=shared_A,
                        lily_B=shared_B,
                        dtype=dtype,
                        num_A=config.num_A,
                        routing_A=config.routing_A,
                        lily_A_bank=shared_A_bank,
                    )
                    shared_B = layer.lily_B[adapter_name]
                    if config.num_A is None:
                        shared_A = layer.lily_A[adapter_name]
                    else:
                        shared_A_bank = layer.lily_A_bank[adapter_name]
                    layer.requires_grad_(False)
        for path in save_paths:
            module = self.model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_module(self.model, path, module)
            module.add_adapter(adapter_name)
            module.modules_to_save[adapter_name].requires_grad_(False)
        self.configs[adapter_name] = config
        self.groups[adapter_name] = groups
        self.trainable[adapter_name] = trainable

    def _wrappers(self):
        return [m for m in self.model.modules() if isinstance(m, (LilyLinear, ModulesToSave))]

    def set_adapter(self, adapter_name: str) -> None:
        """Makes ``adapter_name`` the active (and only trainable) adapter."""
        if adapter_name not in self.configs:
            raise ValueError(f"adapter_name: no adapter {adapter_name!r} (have: {', '.join(self.configs) or 'none'})")
        for module in self._wrappers():
            module.active_adapter = adapter_name
        for name in self.configs:
            self._set_trainable(name, name == adapter_name and self.trainable[name])
        self.active_adapter = adapter_name

    def _set_trainable(self, adapter_name: str, trainable: bool) -> None:
        for module in self._wrappers():
            if isinstance(module, LilyLinear):
                for table in (module.lily_A, module.lily_B, module.lily_router, module.lily_router_A):
                    if adapter_name in table:
                        table[adapter_name].requires_grad_(trainable)
                # static logits, a frozen layer's own Bc, Lily v2's A bank and static A logits
                for table in (module.lily_theta, module.lily_Bc, module.lily_A_bank, module.lily_theta_A):
                    if adapter_name in table:
                        table[adapter_name].requires_grad_(trainable)
            elif adapter_name in module.modules_to_save:
                module.modules_to_save[adapter_name].requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.configs:
            raise ValueError(f"adapter_name: no adapter {adapter_name!r} (have: {', '.join(self.configs) or 'none'})")
        for module in self._wrappers():
            module.delete_adapter(adapter_name)
        del self.configs[adapter_name]
        del self.groups[adapter_name]
        del self.trainable[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.configs:
                self.set_adapter(next(iter(self.configs)))

    @property
    def peft_config(self) -> dict[str, LilyConfig]:
        return self.configs

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside this context the model behaves as the base model."""
        modules = self._wrappers()
        previous = [m.disable_adapters for m in modules]
        for m in modules:
            m.disable_adapters = True
        try:
            yield
        finally:
            for m, p in zip(modules, previous):
                m.disable_adapters = p

    def unload(self) -> nn.Module:
        """Removes every adapter and returns the base model (its own modules back in place)."""
        for path, module in list(self.model.named_modules()):
            if isinstance(module, LilyLinear):
                set_module(self.model, path, module.base_layer)
            elif isinstance(module, ModulesToSave):
                set_module(self.model, path, module.original_module)
        for hook in self._hooks:
            hook.remove()
        base = self.model
        self.configs.clear()
        self.groups.clear()
        self.trainable.clear()
        return base

    # ---- merging (static routing) --------------------------------------------------------------

    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Folds a static adapter into the base weights: ``W' = W + scaling * Bc^T A`` (Lily v2 with both
        routers static: ``W' = W + scaling * Bc^T Ac``, ``Ac = sum_a softmax(theta_A)_a A_a``)."""
        name = adapter_name or self.active_adapter
        if name not in self.configs:
            raise ValueError(f"adapter_name: no adapter {name!r} (have: {', '.join(self.configs) or 'none'})")
        layers = [m for _, m in self.lily_layers() if name in m.r]
        for layer in layers:  # check every layer before changing any
            layer.delta_weight(name)
            if name in layer.merged_adapters:
                raise ValueError(f"adapter {name!r} is already merged; call unmerge_adapter() first")
        for layer in layers:
            layer.merge(name)

    def unmerge_adapter(self) -> None:
        """Takes every merged adapter back out of the base weights."""
        layers = [m for _, m in self.lily_layers() if m.merged_adapters]
        if not layers:
            raise ValueError("unmerge_adapter: no adapter is merged")
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merges the active (static) adapter and returns the plain base model.

        Modules listed in ``modules_to_save`` keep their trained copy.
        """
        if not any(self.active_adapter in m.merged_adapters for _, m in self.lily_layers()):
            self.merge_adapter(self.active_adapter)
        for path, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSave) and module.active_adapter in module.modules_to_save:
                set_module(self.model, path, module.modules_to_save[module.active_adapter])
        return self.unload()

    # ---- reporting -----------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- checkpoints (lily_ext/checkpoint.py, lily_ext/peft_format.py) ---------------------

    def save_adapter(self, path, adapter_name: str | None = None) -> None:
        """Writes ``lily_config.json`` + ``adapter.safetensors`` (each shared tensor once), atomically."""
        save_adapter(self, path, adapter_name)

    def load_adapter(self, path, adapter_name: str, is_trainable: bool = False) -> None:
        """Adds the adapter saved at ``path`` under ``adapter_name`` (not made active)."""
        load_into(self, path, adapter_name, is_trainable)

    def save_peft_adapter(self, path, adapter_name: str | None = None) -> None:
        """Writes the adapter in PEFT's format (``PeftModel.from_pretrained`` loads it)."""
        save_peft_adapter(self, path, adapter_name)


def get_lily_model(model: nn.Module, config: LilyConfig, adapter_name: str = "default") -> LilyModel:
    """Wraps ``model`` with a Lily adapter; base weights are frozen, the adapter is trainable."""
    if isinstance(model, LilyModel):
        raise ValueError("model: already a LilyModel; use model.add_adapter(name, config) for another adapter")
    return LilyModel(model, config, adapter_name)


def load_adapter(base_model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False) -> LilyModel:
    """Wraps ``base_model`` with the adapter saved at ``path`` (by ``LilyModel.save_adapter``).

    ``is_trainable=False`` (PEFT's default) leaves the adapter frozen, for inference.
    """
    if isinstance(base_model, LilyModel):
        raise ValueError("base_model: already a LilyModel; use model.load_adapter(path, adapter_name)")
    config, _, tensors = read_adapter(base_model, path)
    model = LilyModel(base_model, config, adapter_name, dtype=adapter_dtype(tensors), trainable=is_trainable)
    assign_tensors(model, adapter_name, tensors)
    return model
