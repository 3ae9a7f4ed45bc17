"""PEFT's on-disk format for Lily adapters: its config fields, and writing an adapter the way
PEFT's ``save_pretrained`` does (``PeftModel.from_pretrained`` loads it). Reading is in
``peft_interop``; this module sits below ``model`` (it takes a LilyModel but never imports it)."""

from __future__ import annotations

from ._build.atomic import atomic_directory
from .checkpoint import AdapterLoadError, adapter_tensors
from .config import LilyConfig

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
CONFIG_FIELDS = (
    "r",
    "stride_A",
    "num_B",
    "scaling",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "init_weights",
)


def config_from_peft(fields: dict, modules_to_save) -> LilyConfig:
    """The LilyConfig (batch routing, PEFT's only one) of a PEFT Lily config's fields."""
    peft_type = getattr(fields.get("peft_type"), "value", fields.get("peft_type"))  # enum in memory, str on disk
    if str(peft_type).upper() != "LILY":
        raise AdapterLoadError(f"{PEFT_CONFIG_NAME}: peft_type is {fields.get('peft_type')!r}, not 'LILY'")
    values = {k: fields[k] for k in CONFIG_FIELDS if k in fields and fields[k] is not None}
    if isinstance(values.get("target_modules"), (set, tuple)):
        values["target_modules"] = sorted(values["target_modules"])
    values["modules_to_save"] = modules_to_save or None
    try:
        return LilyConfig(**values, routing="batch")
    except (TypeError, ValueError) as e:
        raise AdapterLoadError(f"{PEFT_CONFIG_NAME}: {e}") from None


def save_peft_adapter(model, path, adapter_name: str | None = None) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT's ``save_pretrained`` does."""
    from peft import LilyConfig as PeftLilyConfig
    from safetensors.torch import save_file

    name = adapter_name or model.active_adapter
    if name not in model.configs:
        raise ValueError(f"adapter_name: no adapter {name!r} (have: {', '.join(model.configs) or 'none'})")
    config = model.configs[name]
    if config.num_A is not None:
        raise ValueError(
            f"save_peft_adapter: adapter {name!r} is a Lily v2 adapter (num_A={config.num_A}: a routed A bank), "
            "which PEFT's Lily has no way to hold; save it with save_adapter instead"
        )
    if config.routing != "batch":
        raise ValueError(
            f"save_peft_adapter: PEFT's Lily has batch routing only; this adapter uses routing={config.routing!r}, "
            "which PEFT would silently run as batch routing (save it with save_adapter instead)"
        )
    ours = adapter_tensors(model, name)
    state = {}
    for g, group in enumerate(model.groups[name]):
        for b, block in enumerate(group.a_blocks(config.stride_A)):
            for p in block:  # PEFT stores every layer's copy of the shared tensors
                state[f"{PREFIX}{p}.lily_A.weight"] = ours[f"group.{g}.A.{b}"]
        for p in group.layers:
            state[f"{PREFIX}{p}.lily_B.weight"] = ours[f"group.{g}.B"]
            state[f"{PREFIX}{p}.lily_router.weight"] = ours[f"router.{p}"]
    for key, value in ours.items():
        if key.startswith("save."):
            state[PREFIX + key[len("save.") :]] = value
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    fields = {k: getattr(config, k) for k in CONFIG_FIELDS}
    peft_config = PeftLilyConfig(**fields)
    peft_config.base_model_name_or_path = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
    with atomic_directory(path) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file(state, str(tmp / PEFT_WEIGHTS_NAMES[0]), metadata={"format": "pt"})
