"""Which modules a LilyConfig adapts, and how their A and B are shared (PEFT's rules)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import LilyConfig
from .layer import LilyLinear, ModulesToSave


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


def modules_to_save_paths(model: nn.Module, config: LilyConfig) -> list[str]:
    """Paths of the modules ``config.modules_to_save`` names (outermost matches only)."""
    if not config.modules_to_save:
        return []
    paths = []
    for key, _ in model.named_modules():
        inner = f".{key}."
        if ".modules_to_save." in inner or ".original_module." in inner or any(key.startswith(p + ".") for p in paths):
            continue
        if any(key == m or key.endswith(f".{m}") for m in config.modules_to_save):
            paths.append(key)
    if not paths:
        raise ValueError(f"LilyConfig.modules_to_save: {config.modules_to_save!r} matches no module of this model")
    return paths


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Puts ``module`` at the dotted ``path`` of ``root``, in place of what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
