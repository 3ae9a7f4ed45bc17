"""LilyModel: Lily adapters injected into any PyTorch / Hugging Face model, PEFT's semantics."""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import LilyConfig
from .layer import LilyLinear, ModulesToSave, RoutingContext


@dataclass
class ShareGroup:
    """Layers of one target that share a B bank, and As in blocks of ``stride_A`` consecutive layers."""

    suffix: str
    shape: tuple  # base weight shape [out, in]
    layers: list  # module paths, traversal order

    def a_blocks(self, stride_A: int) -> list:
        return [self.layers[i : i + stride_A] for i in range(0, len(self.layers), stride_A)]

    def to_dict(self) -> dict:
        return {"suffix": self.suffix, "shape": list(self.shape), "layers": list(self.layers)}


# ---- which modules a config adapts (PEFT's rules: tuners_utils.check_target_module_exists) --------


def _name_matches(names, key: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index(config: LilyConfig, key: str):
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def _is_target(config: LilyConfig, targets, key: str) -> bool:
    if config.exclude_modules and _name_matches(config.exclude_modules, key):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(config, key)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _resolve_targets(model: nn.Module, config: LilyConfig):
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        try:
            from peft.utils import TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING as defaults
        except ImportError:
            defaults = {}
        if model_type not in defaults:
            raise ValueError(
                "LilyConfig.target_modules: None, and there is no default for this model "
                f"(model_type={model_type!r}); name the modules to adapt, e.g. ['q_proj', 'v_proj']"
            )
        return list(defaults[model_type])
    if isinstance(targets, str) and targets.lower() == "all-linear":
        excluded = set()
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None:
            excluded.add(next(n for n, m in model.named_modules() if m is output))
        return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in excluded)
    return targets


def plan_adapter(model: nn.Module, config: LilyConfig) -> list[ShareGroup]:
    """The layers ``config`` adapts in ``model`` and how they share A and B; changes nothing.

    Raises ValueError when nothing matches or a matching module is not an ``nn.Linear``.
    """
    targets = _resolve_targets(model, config)
    groups: dict[tuple, ShareGroup] = {}
    for key, module in model.named_modules():
        # never inside our own wrappers (a second adapter targets the wrapped layers themselves)
        inner = f".{key}."
        if not key or isinstance(module, ModulesToSave) or ".lily_" in inner or ".modules_to_save." in inner:
            continue
        if key.endswith(".base_layer") or ".original_module." in inner:
            continue
        if not _is_target(config, targets, key):
            continue
        base = module.base_layer if isinstance(module, LilyLinear) else module
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"target module {key!r} is a {type(base).__module__}.{type(base).__name__}; "
                "Lily adapts only torch.nn.Linear layers (narrow target_modules or use exclude_modules)"
            )
        # PEFT groups by the matched target (the last matching one) and the base weight shape.
        if isinstance(targets, str):
            suffix = targets
        else:
            suffix = None
            for t in targets:
                if key.endswith(t):
                    suffix = t
        group_key = (suffix, tuple(base.weight.shape))
        groups.setdefault(group_key, ShareGroup(suffix, tuple(base.weight.shape), []))
        groups[group_key].layers.append(key)
    if not groups:
        raise ValueError(
            f"LilyConfig.target_modules: {config.target_modules!r} matches no module of this "
            f"{type(model).__name__} (example module names: {_example_names(model)})"
        )
    return list(groups.values())


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:5]
    return ", ".join(names) if names else "the model has no nn.Linear"


def _modules_to_save_paths(model: nn.Module, config: LilyConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    paths = []
    for key, module in model.named_modules():
        inner = f".{key}."
        if ".modules_to_save." in inner or ".original_module." in inner or any(key.startswith(p + ".") for p in paths):
            continue
        if any(key == m or key.endswith(f".{m}") for m in config.modules_to_save):
            paths.append(key)
    if not paths:
        raise ValueError(f"LilyConfig.modules_to_save: {config.modules_to_save!r} matches no module of this model")
    return paths


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _find_attention_mask(forward, args, kwargs):
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    try:
        bound = inspect.signature(forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return bound.arguments.get("attention_mask")


class LilyModel(nn.Module):
    """A base model with Lily adapters. Calls are forwarded to the base model.

    Attributes it does not have itself are looked up on the base model (``model.config``,
    ``model.generate``...), as with PEFT's models.
    """

    def __init__(self, model: nn.Module, config: LilyConfig, adapter_name: str = "default", *,
                 dtype: torch.dtype | None = None, trainable: bool = True):
        super().__init__()
        self.model = model
        self.configs: dict[str, LilyConfig] = {}
        self.groups: dict[str, list[ShareGroup]] = {}
        self.trainable: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self._context = RoutingContext()
        # Every call into the base model (direct, generate(), a Trainer) hands its attention
        # mask to the layers, for sequence routing.
        self._hooks = [
            model.register_forward_pre_hook(self._capture_mask, with_kwargs=True),
            model.register_forward_hook(self._release_mask, always_call=True),
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

    def _capture_mask(self, module, args, kwargs):
        self._context.mask = _find_attention_mask(module.forward, args, kwargs)

    def _release_mask(self, module, args, output):
        self._context.mask = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---- adapters ------------------------------------------------------------------------

    def lily_layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LilyLinear)]

    def add_adapter(self, adapter_name: str, config: LilyConfig, *, dtype: torch.dtype | None = None,
                    trainable: bool = True) -> None:
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
        save_paths = _modules_to_save_paths(self.model, config)
        for group in groups:
            shared_B = None
            for block in group.a_blocks(config.stride_A):
                shared_A = None
                for path in block:
                    layer = self.model.get_submodule(path)
                    if not isinstance(layer, LilyLinear):
                        layer = LilyLinear(layer, self._context)
                        _set_module(self.model, path, layer)
                    layer.add_adapter(adapter_name, config.r, config.num_B, config.scaling, config.routing,
                                      config.init_weights, lily_A=shared_A, lily_B=shared_B, dtype=dtype)
                    shared_A, shared_B = layer.lily_A[adapter_name], layer.lily_B[adapter_name]
                    layer.requires_grad_(False)
        for path in save_paths:
            module = self.model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _set_module(self.model, path, module)
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
                for table in (module.lily_A, module.lily_B, module.lily_router):
                    if adapter_name in table:
                        table[adapter_name].requires_grad_(trainable)
                if adapter_name in module.lily_theta:
                    module.lily_theta[adapter_name].requires_grad_(trainable)
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
                _set_module(self.model, path, module.base_layer)
            elif isinstance(module, ModulesToSave):
                _set_module(self.model, path, module.original_module)
        for hook in self._hooks:
            hook.remove()
        base = self.model
        self.configs.clear()
        self.groups.clear()
        self.trainable.clear()
        return base

    # ---- merging (static routing) --------------------------------------------------------------

    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Folds a static adapter into the base weights: ``W' = W + scaling * Bc^T A``."""
        name = adapter_name or self.active_adapter
        if name not in self.configs:
            raise ValueError(f"adapter_name: no adapter {name!r} (have: {', '.join(self.configs) or 'none'})")
        layers = [m for _, m in self.lily_layers() if name in m.lily_A]
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
                _set_module(self.model, path, module.modules_to_save[module.active_adapter])
        return self.unload()

    # ---- reporting -----------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- checkpoints (lily_ext/checkpoint.py, lily_ext/peft_interop.py) -------------------

    def save_adapter(self, path, adapter_name: str | None = None) -> None:
        """Writes ``lily_config.json`` + ``adapter.safetensors`` (each shared tensor once), atomically."""
        from .checkpoint import save_adapter

        save_adapter(self, path, adapter_name)

    def load_adapter(self, path, adapter_name: str, is_trainable: bool = False) -> None:
        """Adds the adapter saved at ``path`` under ``adapter_name`` (not made active)."""
        from .checkpoint import load_into

        load_into(self, path, adapter_name, is_trainable)

    def save_peft_adapter(self, path, adapter_name: str | None = None) -> None:
        """Writes the adapter in PEFT's format (``PeftModel.from_pretrained`` loads it)."""
        from .peft_interop import save_peft_adapter

        save_peft_adapter(self, path, adapter_name)


def get_lily_model(model: nn.Module, config: LilyConfig, adapter_name: str = "default") -> LilyModel:
    """Wraps ``model`` with a Lily adapter; base weights are frozen, the adapter is trainable."""
    if isinstance(model, LilyModel):
        raise ValueError("model: already a LilyModel; use model.add_adapter(name, config) for another adapter")
    return LilyModel(model, config, adapter_name)
