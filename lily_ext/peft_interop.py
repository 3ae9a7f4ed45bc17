"""Hugging Face PEFT interop: convert PEFT Lily models and adapters, write PEFT's format, and
make PEFT's own Lily layers compute through lily_ext.ops (``patch_peft``)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import AdapterLoadError, assign_tensors
from .config import ROUTINGS
from .model import LilyModel
from .ops import routed_mix
from .peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAMES, PREFIX, config_from_peft, save_peft_adapter
from .targets import modules_to_save_paths, plan_adapter, set_module

# save_peft_adapter lives in peft_format (LilyModel.save_peft_adapter uses it) and is offered here too.
__all__ = ["from_peft", "load_peft_adapter", "patch_peft", "save_peft_adapter", "unpatch_peft"]


def _saved_modules_from_keys(base_model: nn.Module, keys) -> list[str]:
    """Module paths of the non-Lily tensors in a PEFT state dict (modules_to_save)."""
    modules = dict(base_model.named_modules())
    paths = []
    for key in keys:
        if ".lily_" in key or not key.startswith(PREFIX):
            continue
        path = key[len(PREFIX) :].rpartition(".")[0]
        while path and path not in modules:
            path = path.rpartition(".")[0]
        if path and path not in paths:
            paths.append(path)
    return paths


def _routing_override(routing):
    """Checks the ``routing`` a PEFT adapter is converted to (None: PEFT's batch routing)."""
    if routing is None:
        return None
    if routing == "static":
        raise ValueError(
            "routing: a PEFT Lily adapter has per-layer routers; convert it with a router-based routing "
            "('batch', 'sequence', 'token' or 'causal'), then lily_ext.freeze_router(model, batches) for static"
        )
    if routing not in ROUTINGS:
        raise ValueError(f"routing: expected one of {', '.join(map(repr, ROUTINGS))} or None, got {routing!r}")
    return routing


def _from_peft_state(
    base_model: nn.Module, fields: dict, state: dict, adapter_name: str, is_trainable: bool, routing=None
) -> LilyModel:
    """Builds a LilyModel from PEFT's state-dict layout, after checking it fully."""
    config = config_from_peft(fields, _saved_modules_from_keys(base_model, state))
    if routing is not None:
        config = dataclasses.replace(config, routing=routing)
    try:
        groups = plan_adapter(base_model, config)
        save_paths = modules_to_save_paths(base_model, config)
    except ValueError as e:
        raise AdapterLoadError(f"the PEFT adapter does not fit this base model: {e}") from None

    def take(key, shape):
        if key not in state:
            raise AdapterLoadError(f"PEFT adapter: missing tensor {key!r}")
        if tuple(state[key].shape) != tuple(shape):
            raise AdapterLoadError(
                f"PEFT adapter: tensor {key!r} has shape {list(state[key].shape)}, expected {list(shape)}"
            )
        return state[key]

    E, r = config.num_B, config.r
    tensors, used = {}, set()
    for g, group in enumerate(groups):
        out, inp = group.shape
        for b, block in enumerate(group.a_blocks(config.stride_A)):
            keys = [f"{PREFIX}{p}.lily_A.weight" for p in block]
            tensors[f"group.{g}.A.{b}"] = take(keys[0], (r, inp))
            used.update(keys)
            for k in keys[1:]:
                if not torch.equal(take(k, (r, inp)), tensors[f"group.{g}.A.{b}"]):
                    raise AdapterLoadError(
                        f"PEFT adapter: {k!r} differs from {keys[0]!r}, which it should share (stride_A={config.stride_A})"
                    )
        keys = [f"{PREFIX}{p}.lily_B.weight" for p in group.layers]
        tensors[f"group.{g}.B"] = take(keys[0], (E * r, out))
        used.update(keys)
        for k in keys[1:]:
            if not torch.equal(take(k, (E * r, out)), tensors[f"group.{g}.B"]):
                raise AdapterLoadError(f"PEFT adapter: {k!r} differs from {keys[0]!r}, which it should share")
        for p in group.layers:
            key = f"{PREFIX}{p}.lily_router.weight"
            tensors[f"router.{p}"] = take(key, (E, r))
            used.add(key)
    for path in save_paths:
        for name, value in base_model.get_submodule(path).state_dict().items():
            key = f"{PREFIX}{path}.{name}"
            tensors[f"save.{path}.{name}"] = take(key, value.shape).to(value.dtype)
            used.add(key)
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise AdapterLoadError(f"PEFT adapter: unexpected tensor {unexpected[0]!r} (not a layer this config adapts)")
    dtypes = {t.dtype for k, t in tensors.items() if not k.startswith("save.")}
    model = LilyModel(
        base_model, config, adapter_name, dtype=dtypes.pop() if len(dtypes) == 1 else None, trainable=is_trainable
    )
    assign_tensors(model, adapter_name, tensors)
    return model


def load_peft_adapter(
    base_model: nn.Module, peft_dir, adapter_name: str = "default", is_trainable: bool = False, *, routing=None
) -> LilyModel:
    """Loads a Lily adapter directory written by PEFT's ``save_pretrained`` onto ``base_model``.

    ``routing``: as in ``from_peft`` (None keeps PEFT's ``"batch"``).
    """
    routing = _routing_override(routing)
    peft_dir = Path(peft_dir)
    config_file = peft_dir / PEFT_CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"{PEFT_CONFIG_NAME}: missing in {str(peft_dir)!r} (not a PEFT adapter directory)")
    try:
        fields = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{PEFT_CONFIG_NAME}: not valid JSON ({e})") from None
    weights = next((peft_dir / n for n in PEFT_WEIGHTS_NAMES if (peft_dir / n).is_file()), None)
    if weights is None:
        raise AdapterLoadError(f"PEFT adapter: none of {', '.join(PEFT_WEIGHTS_NAMES)} in {str(peft_dir)!r}")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle errors have no common base class
        raise AdapterLoadError(f"{weights.name}: unreadable ({e})") from None
    return _from_peft_state(base_model, fields, state, adapter_name, is_trainable, routing)


def _peft_tuner(peft_model):
    from peft.tuners.lily import LilyModel as PeftLilyModel

    tuner = getattr(peft_model, "base_model", None)
    if isinstance(peft_model, PeftLilyModel):
        tuner = peft_model
    if not isinstance(tuner, PeftLilyModel):
        raise TypeError(f"peft_model: expected a PEFT model with a Lily adapter, got {type(peft_model).__name__}")
    return tuner


def from_peft(peft_model, adapter_name: str | None = None, *, routing: str | None = None) -> LilyModel:
    """Converts an in-memory PEFT Lily model into a LilyModel.

    The PEFT model is left untouched; the new model shares its (frozen) base weights and gets
    copies of the adapter weights.

    ``routing``: the converted adapter's routing. None keeps PEFT's ``"batch"`` (same outputs as
    the PEFT model); ``"causal"`` turns a PEFT Lily decoder into a causal one (no future-token leak,
    exact KV-cache generation) for further training, from the same weights; ``"sequence"`` and
    ``"token"`` likewise. (``"static"`` needs ``freeze_router`` after conversion.) The result can
    then be saved with ``save_adapter``; ``save_peft_adapter`` needs ``"batch"``.
    """
    from peft.tuners.lily.layer import LilyLayer

    routing = _routing_override(routing)
    from peft.utils import ModulesToSaveWrapper

    tuner = _peft_tuner(peft_model)
    name = adapter_name or (tuner.active_adapters[0] if tuner.active_adapters else "default")
    if name not in tuner.peft_config:
        raise ValueError(f"adapter_name: the PEFT model has no adapter {name!r} (has {', '.join(tuner.peft_config)})")
    # The module tree is copied; parameters and buffers are shared, not duplicated.
    memo = {id(t): t for t in (*tuner.model.parameters(), *tuner.model.buffers())}
    base = copy.deepcopy(tuner.model, memo)
    state = {}
    for path, module in list(base.named_modules()):
        if isinstance(module, LilyLayer) and name in module.lily_A:
            for part in ("lily_A", "lily_B", "lily_router"):
                state[f"{PREFIX}{path}.{part}.weight"] = getattr(module, part)[name].weight.detach().clone()
        elif isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            for key, value in module.modules_to_save[name].state_dict().items():
                state[f"{PREFIX}{path}.{key}"] = value.detach().clone()
    for path, module in list(base.named_modules()):
        if isinstance(module, LilyLayer):
            set_module(base, path, module.get_base_layer())
        elif isinstance(module, ModulesToSaveWrapper):
            set_module(base, path, module.original_module)
    fields = tuner.peft_config[name].to_dict()
    return _from_peft_state(
        base, fields, state, "default" if adapter_name is None else name, is_trainable=True, routing=routing
    )


# ---- running PEFT's own Lily layers on lily_ext.ops ---------------------------------------------

_original_forward = None


def _peft_lily_forward(self, x, *args, **kwargs):
    """PEFT's Lily Linear.forward with the mixing done by lily_ext.ops.routed_mix (same math)."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or not self.active_adapters:
        return result
    result_dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lily_A.keys():
            continue
        lily_A = self.lily_A[name]
        weight_B = self.lily_B[name].weight
        bank = weight_B.view(self.num_B[name], -1, weight_B.shape[1])
        x = self._cast_input_dtype(x, lily_A.weight.dtype)
        delta = routed_mix(lily_A(x), self.lily_router[name].weight, bank, scaling=self.scaling[name], mode="batch")
        result = result + delta.to(result_dtype)
    return result


def patch_peft(model=None) -> None:
    """Makes PEFT's Lily layers compute through lily_ext.ops (idempotent; undo with unpatch_peft).

    ``model``: optionally the model the patch is for; a LilyModel with a Lily v2 adapter (``num_A``) is
    refused (PEFT has no v2: nothing PEFT runs can hold it)."""
    global _original_forward
    if model is not None:
        configs = getattr(model, "configs", None)
        if not isinstance(configs, dict):
            configs = getattr(model, "peft_config", None) or {}
        for name, config in configs.items():
            if getattr(config, "num_A", None) is not None:
                raise ValueError(
                    f"patch_peft: adapter {name!r} is a Lily v2 adapter (num_A={config.num_A}: a routed A bank); "
                    "PEFT's Lily has no v2, so its layers cannot run it. Use the LilyModel itself"
                )
    from peft.tuners.lily import layer

    if _original_forward is None:
        _original_forward = layer.Linear.forward
        layer.Linear.forward = _peft_lily_forward


def unpatch_peft() -> None:
    """Restores PEFT's own Lily forward."""
    global _original_forward
    from peft.tuners.lily import layer

    if _original_forward is not None:
        layer.Linear.forward = _original_forward
        _original_forward = None
