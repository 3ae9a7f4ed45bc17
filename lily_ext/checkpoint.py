"""Compact adapter checkpoints: every shared tensor stored once, the sharing recorded.

A checkpoint is a directory with

- ``lily_config.json``: format version, the LilyConfig, the sharing groups (which layers share
  a B bank; As are shared by blocks of ``stride_A`` consecutive layers of a group), the
  modules_to_save paths, the tensor dtype and the SHA-256 of the tensor file;
- ``adapter.safetensors``: ``group.{g}.B``, ``group.{g}.A.{block}``, ``router.{layer}`` (or
  ``theta.{layer}`` for static routing) and ``save.{module}.{name}`` tensors.

Format 2 (Lily v2, ``num_A`` set) stores ``group.{g}.A_bank`` (``[num_A, in, r]``, once per group)
and ``router_A.{layer}`` (``[num_A, in]``, or ``theta_A.{layer}`` ``[num_A]`` for static A routing)
instead of ``group.{g}.A.{block}``. A v1 adapter is still written as format 1 (so earlier
lily_ext versions read it); every format up to ``FORMAT_VERSION`` is read.

Saving is atomic (see _build/atomic.py). Loading checks everything against the base model before
changing it, and names the first mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ._build.atomic import atomic_directory
from .config import LilyConfig
from .layer import ModulesToSave
from .targets import ShareGroup, modules_to_save_paths, plan_adapter

FORMAT = "lily_ext.adapter"
FORMAT_VERSION = 2  # 2: Lily v2 (routed A bank); v1 adapters are written as format 1
CONFIG_NAME = "lily_config.json"
WEIGHTS_NAME = "adapter.safetensors"


class AdapterLoadError(ValueError):
    """A saved adapter that cannot be loaded into the given base model (the message says why)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_tensors(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's unique tensors under their checkpoint keys (each shared tensor once)."""
    config = model.configs[adapter_name]
    tensors = {}
    for g, group in enumerate(model.groups[adapter_name]):
        first = model.model.get_submodule(group.layers[0])
        tensors[f"group.{g}.B"] = first.lily_B[adapter_name].weight
        if config.num_A is not None:
            tensors[f"group.{g}.A_bank"] = first.lily_A_bank[adapter_name]
        else:
            for b, block in enumerate(group.a_blocks(config.stride_A)):
                tensors[f"group.{g}.A.{b}"] = model.model.get_submodule(block[0]).lily_A[adapter_name].weight
        for path in group.layers:
            layer = model.model.get_submodule(path)
            if adapter_name in layer.lily_Bc:
                raise ValueError(
                    f"adapter {adapter_name!r}: layer {path!r} was frozen to its own combined bank "
                    "(freeze_router method='optimal_bc'), which checkpoint format version 1 cannot hold (nor format 2, "
                    "which adds Lily v2's A bank); "
                    "save the adapter before freezing, freeze with method='optimal_weights' or 'mean', "
                    "or export the merged form"
                )
            if config.routing == "static":
                tensors[f"theta.{path}"] = layer.lily_theta[adapter_name]
            else:
                tensors[f"router.{path}"] = layer.lily_router[adapter_name].weight
            if config.num_A is not None:
                if config.routing_A == "static":
                    tensors[f"theta_A.{path}"] = layer.lily_theta_A[adapter_name]
                else:
                    tensors[f"router_A.{path}"] = layer.lily_router_A[adapter_name].weight
    for path in _saved_module_paths(model, adapter_name):
        wrapper = model.model.get_submodule(path)
        for name, value in wrapper.modules_to_save[adapter_name].state_dict().items():
            tensors[f"save.{path}.{name}"] = value
    return tensors


def _saved_module_paths(model, adapter_name: str) -> list[str]:
    return [
        p for p, m in model.model.named_modules() if isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save
    ]


def _base_model_info(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def save_adapter(model, path, adapter_name: str | None = None) -> None:
    with atomic_directory(path) as tmp:
        write_adapter_files(model, tmp, adapter_name)


def write_adapter_files(model, directory: Path, adapter_name: str | None = None) -> None:
    """Writes lily_config.json and adapter.safetensors into an existing (fresh) directory."""
    from safetensors.torch import save_file

    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.configs:
        raise ValueError(f"adapter_name: no adapter {adapter_name!r} (have: {', '.join(model.configs) or 'none'})")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_tensors(model, adapter_name).items()}
    dtypes = {str(t.dtype).replace("torch.", "") for k, t in tensors.items() if not k.startswith("save.")}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if model.configs[adapter_name].num_A is not None else 1,
        "adapter_name": adapter_name,
        "config": model.configs[adapter_name].to_dict(),
        "dtype": dtypes.pop() if len(dtypes) == 1 else None,
        "groups": [g.to_dict() for g in model.groups[adapter_name]],
        "modules_to_save": _saved_module_paths(model, adapter_name),
        "base_model": _base_model_info(model.model),
        "weights_sha256": _sha256(directory / WEIGHTS_NAME),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _read_record(path: Path) -> dict:
    if not path.is_dir():
        raise AdapterLoadError(f"path: {str(path)!r} is not an adapter directory")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        hint = (
            " (it looks like a PEFT adapter: use lily_ext.load_peft_adapter)"
            if (path / "adapter_config.json").exists()
            else ""
        )
        raise AdapterLoadError(f"{CONFIG_NAME}: missing in {str(path)!r}{hint}")
    try:
        record = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise AdapterLoadError(
            f"{CONFIG_NAME}: not a lily_ext adapter (format {record.get('format') if isinstance(record, dict) else None!r})"
        )
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{CONFIG_NAME}: format_version {version!r} was written by a newer lily_ext; "
            f"this version reads format_version <= {FORMAT_VERSION} (upgrade lily_ext)"
        )
    for key in ("config", "groups", "modules_to_save", "weights_sha256"):
        if key not in record:
            raise AdapterLoadError(f"{CONFIG_NAME}: missing field {key!r}")
    return record


def read_adapter(base_model: nn.Module, path) -> tuple[LilyConfig, list[ShareGroup], dict[str, torch.Tensor]]:
    """Reads and checks a saved adapter against ``base_model`` without changing anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    record = _read_record(path)
    try:
        config = LilyConfig.from_dict(record["config"])
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{CONFIG_NAME}: bad config: {e}") from None
    if config.num_A is not None and record["format_version"] < 2:
        raise AdapterLoadError(
            f"{CONFIG_NAME}: format_version {record['format_version']} cannot hold a Lily v2 adapter (num_A="
            f"{config.num_A}); the file is inconsistent"
        )
    try:
        groups = plan_adapter(base_model, config)
        save_paths = modules_to_save_paths(base_model, config)
    except ValueError as e:
        raise AdapterLoadError(f"the adapter does not fit this base model: {e}") from None
    saved_groups = record["groups"]
    for g, group in enumerate(groups):
        if g >= len(saved_groups):
            raise AdapterLoadError(
                f"the adapter does not fit this base model: it adapts no layers like {group.layers[0]!r}"
            )
        saved = saved_groups[g]
        if saved.get("layers") != group.layers or tuple(saved.get("shape", ())) != group.shape:
            mine = dict(zip(group.layers, [group.shape] * len(group.layers)))
            theirs = dict(zip(saved.get("layers", []), [tuple(saved.get("shape", ()))] * len(saved.get("layers", []))))
            first = next((k for k in theirs if k not in mine or mine[k] != theirs[k]), None) or next(
                k for k in mine if k not in theirs
            )
            what = (
                f"weight shape {list(mine[first])}, the adapter expects {list(theirs[first])}"
                if first in mine and first in theirs
                else ("not in this base model" if first not in mine else "not adapted by the saved adapter")
            )
            raise AdapterLoadError(f"the adapter does not fit this base model: layer {first!r}: {what}")
    if len(saved_groups) != len(groups):
        raise AdapterLoadError(
            f"the adapter does not fit this base model: layer {saved_groups[len(groups)]['layers'][0]!r} is missing"
        )
    if record["modules_to_save"] != save_paths:
        raise AdapterLoadError(
            f"modules_to_save: the adapter saved {record['modules_to_save']}, this base model has {save_paths}"
        )

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterLoadError(f"{WEIGHTS_NAME}: missing in {str(path)!r}")
    if _sha256(weights) != record["weights_sha256"]:
        raise AdapterLoadError(
            f"{WEIGHTS_NAME}: contents do not match the checksum in {CONFIG_NAME} (truncated or corrupted file)"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterLoadError(f"{WEIGHTS_NAME}: unreadable ({e})") from None

    expected = _expected_shapes(base_model, config, groups, save_paths)
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise AdapterLoadError(f"{WEIGHTS_NAME}: missing tensor {key!r}")
        if key not in expected:
            raise AdapterLoadError(f"{WEIGHTS_NAME}: unexpected tensor {key!r}")
        shape, dtype = expected[key]
        if tuple(tensors[key].shape) != shape:
            raise AdapterLoadError(
                f"{WEIGHTS_NAME}: tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(shape)}"
            )
        want = dtype if dtype is not None else getattr(torch, record.get("dtype") or "float32", None)
        if want is not None and tensors[key].dtype != want:
            raise AdapterLoadError(f"{WEIGHTS_NAME}: tensor {key!r} has dtype {tensors[key].dtype}, expected {want}")
    return config, groups, tensors


def _expected_shapes(base_model, config: LilyConfig, groups, save_paths) -> dict:
    """Checkpoint key -> (shape, dtype or None for "the adapter's dtype")."""
    E, r = config.num_B, config.r
    expected = {}
    for g, group in enumerate(groups):
        out, inp = group.shape
        expected[f"group.{g}.B"] = ((E * r, out), None)
        if config.num_A is not None:
            expected[f"group.{g}.A_bank"] = ((config.num_A, inp, r), None)
        else:
            for b, _ in enumerate(group.a_blocks(config.stride_A)):
                expected[f"group.{g}.A.{b}"] = ((r, inp), None)
        for path in group.layers:
            if config.routing == "static":
                expected[f"theta.{path}"] = ((E,), None)
            else:
                expected[f"router.{path}"] = ((E, r), None)
            if config.num_A is not None:
                if config.routing_A == "static":
                    expected[f"theta_A.{path}"] = ((config.num_A,), None)
                else:
                    expected[f"router_A.{path}"] = ((config.num_A, inp), None)
    for path in save_paths:
        module = base_model.get_submodule(path)
        module = getattr(module, "original_module", module)  # already wrapped by another adapter
        for name, value in module.state_dict().items():
            expected[f"save.{path}.{name}"] = (tuple(value.shape), value.dtype)
    return expected


@torch.no_grad()
def assign_tensors(model, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    targets = adapter_tensors(model, adapter_name)
    for key, target in targets.items():
        target.copy_(tensors[key])


def adapter_dtype(tensors) -> torch.dtype | None:
    dtypes = {t.dtype for k, t in tensors.items() if not k.startswith("save.")}
    return dtypes.pop() if len(dtypes) == 1 else None


def load_weights_into(model, path, adapter_name: str | None = None) -> None:
    """Overwrites the weights of an existing adapter with those saved at ``path`` (same config)."""
    adapter_name = adapter_name or model.active_adapter
    config, _, tensors = read_adapter(model.model, path)
    if config != model.configs[adapter_name]:
        raise AdapterLoadError(
            f"the adapter at {str(path)!r} has config {config}, adapter {adapter_name!r} has {model.configs[adapter_name]}"
        )
    assign_tensors(model, adapter_name, tensors)


def load_into(model, path, adapter_name: str, is_trainable: bool = False) -> None:
    if adapter_name in model.configs:
        raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
    config, _, tensors = read_adapter(model.model, path)
    model.add_adapter(adapter_name, config, dtype=adapter_dtype(tensors), trainable=is_trainable)
    assign_tensors(model, adapter_name, tensors)
