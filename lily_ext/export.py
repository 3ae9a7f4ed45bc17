"""ONNX export in three forms: ``custom`` (lily.RoutedMix nodes), ``decomposed`` (standard ops only)
and ``merged`` (static routing folded into the base weights: a plain model)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ._build.atomic import atomic_file
from .layer import fused_layers
from .model import LilyModel
from .ops import routed_mix, routed_mix_decomposed

FORMS = ("custom", "decomposed", "merged")
DOMAIN = "lily"
DOMAIN_VERSION = 1
# What the ONNX Runtime op accepts as a mask (export/RoutedMix.md).
MASK_TYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float",
    "double",
)

_schema_registered = False


def register_onnx_schema() -> None:
    """Declares ``lily.RoutedMix`` (version 1) to the onnx package, for onnxscript and onnx.checker."""
    global _schema_registered
    if _schema_registered:
        return
    import onnx
    from onnx.defs import OpSchema

    if not onnx.defs.has(  # another copy of lily_ext in this process may have registered it
        "RoutedMix", DOMAIN
    ):
        P = OpSchema.FormalParameter
        schema = OpSchema(
            "RoutedMix",
            DOMAIN,
            DOMAIN_VERSION,
            "Lily routed B-bank mixing: scaling * hidden @ sum_e w_e bank[e], w chosen by `mode` (see lily_ext).",
            inputs=[
                P("hidden", "T", "[..., r]"),
                P("router", "T", "[E, r], or theta [E] for mode static"),
                P("bank", "T", "[E, r, out]"),
                P(
                    "mask",
                    "M",
                    "sequence and causal modes: hidden.shape[:-1], nonzero = token counts",
                    param_option=OpSchema.FormalParameterOption.Optional,
                ),
            ],
            outputs=[P("delta", "T", "[..., out]")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"], "float tensors"),
                ("M", [f"tensor({t})" for t in MASK_TYPES], "mask: nonzero marks a token"),
            ],
            attributes=[
                OpSchema.Attribute("scaling", onnx.helper.make_attribute("scaling", 1.0), "multiplier of the delta"),
                OpSchema.Attribute(
                    "mode", onnx.helper.make_attribute("mode", "batch"), "batch | sequence | token | static | causal"
                ),
            ],
        )
        onnx.defs.register_schema(schema)
    _schema_registered = True


def _routed_mix_translation(hidden, router, bank, scaling: float = 1.0, mode: str = "batch", mask=None):
    """onnxscript translation of torch.ops.lily.routed_mix: one lily.RoutedMix node."""
    import onnxscript

    lily = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
    if mask is None:
        return lily.RoutedMix(hidden, router, bank, scaling=float(scaling), mode=mode)
    return lily.RoutedMix(hidden, router, bank, mask, scaling=float(scaling), mode=mode)


def _routed_mix_symbolic(g, hidden, router, bank, scaling, mode, mask):
    """TorchScript-exporter (dynamo=False) symbolic: one lily.RoutedMix node."""
    from torch.onnx import symbolic_helper

    inputs = [hidden, router, bank]
    if not symbolic_helper._is_none(mask):
        inputs.append(mask)
    return g.op(
        f"{DOMAIN}::RoutedMix",
        *inputs,
        scaling_f=symbolic_helper._parse_arg(scaling, "f"),
        mode_s=symbolic_helper._parse_arg(mode, "s"),
    )


def register_torchscript_symbolic() -> None:
    """Lets ``torch.onnx.export(..., dynamo=False)`` write lily.RoutedMix nodes."""
    if hasattr(torch.onnx, "register_custom_op_symbolic"):
        torch.onnx.register_custom_op_symbolic("lily::routed_mix", _routed_mix_symbolic, 9)


def _decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``lily::routed_mix`` replaced by its plain-op formula (``ops.routed_mix_decomposed``), through
    torch.export's own decomposition pass; every other op is left for the ONNX exporter."""

    def routed_mix(hidden, router, bank, scaling=1.0, mode="batch", mask=None):
        return routed_mix_decomposed(hidden, router, bank, scaling=scaling, mode=mode, mask=mask)

    return program.run_decompositions({torch.ops.lily.routed_mix.default: routed_mix})


def _export_dims(spec):
    """``dynamic_shapes`` as torch.export takes it: axis names (which torch.onnx.export also takes,
    and writes into the graph) become ``Dim.DYNAMIC``."""
    if isinstance(spec, str):
        return torch.export.Dim.DYNAMIC
    if isinstance(spec, dict):
        return {key: _export_dims(value) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_export_dims(value) for value in spec)
    return spec


@contextlib.contextmanager
def _quiet_exporter():
    """Hides the exporter's notes that concern other libraries (torchvision ops, deprecations)."""
    import logging
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
            yield
    finally:
        registration.setLevel(level)


def _exportable(model: nn.Module, form: str) -> nn.Module:
    if form == "merged":
        if not isinstance(model, LilyModel):
            raise TypeError(f"model: form 'merged' needs a lily_ext.LilyModel, got {type(model).__name__}")
        config = model.configs[model.active_adapter]
        for what, routing in (("routing", config.routing), ("routing_A", config.routing_A)):
            if routing not in (None, "static"):
                raise ValueError(
                    f"form 'merged': the active adapter uses {what}={routing!r}, which depends on the input; "
                    "freeze it to static weights first with lily_ext.freeze_router(model, calibration_batches)"
                )
        return copy.deepcopy(model).merge_and_unload().eval()
    # Export the wrapped model itself: its forward has the named arguments dynamic_shapes refers to.
    return model.model if isinstance(model, LilyModel) else model


def export_onnx(
    model: nn.Module,
    args=(),
    path=None,
    *,
    form: str = "custom",
    dynamic_shapes=None,
    opset=None,
    kwargs=None,
    dynamo: bool = True,
):
    """Exports ``model`` (a LilyModel or a module containing Lily layers) to ONNX and returns the ModelProto.

    Args:
        args / kwargs: example inputs, as for ``torch.onnx.export``.
        path: where to write the .onnx file (optional).
        form: ``"custom"`` (one ``lily.RoutedMix`` node per adapted layer; run it with
            ``lily_ext.ort_session``), ``"decomposed"`` (standard ONNX ops only) or ``"merged"``
            (static routing folded into the base weights; the graph of the base model).
        dynamic_shapes: as for ``torch.export`` (e.g. ``{"input_ids": {0: "batch", 1: "seq"}}``).
        opset: ONNX opset version (default: the exporter's).
        dynamo: False uses the TorchScript-based exporter (``custom`` and ``merged`` forms).
    """
    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(map(repr, FORMS))}, got {form!r}")
    if not isinstance(args, tuple):
        args = (args,)
    register_onnx_schema()
    target = _exportable(model, form)
    module = target
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _quiet_exporter(), fused_layers(False):
            if dynamo:
                if form == "decomposed":
                    target = _decompose(
                        torch.export.export(
                            target, args, kwargs=kwargs, dynamic_shapes=_export_dims(dynamic_shapes), strict=False
                        )
                    )
                program = torch.onnx.export(
                    target,
                    args,
                    kwargs=kwargs,
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes,
                    opset_version=opset,
                    custom_translation_table={torch.ops.lily.routed_mix.default: _routed_mix_translation},
                    external_data=False,
                    verbose=False,
                )
                proto = program.model_proto
            else:
                if form == "decomposed":
                    raise ValueError("form 'decomposed': use the default dynamo=True exporter")
                import io

                buffer = io.BytesIO()
                torch.onnx.export(
                    target,
                    args,
                    buffer,
                    kwargs=kwargs,
                    dynamo=False,
                    opset_version=opset or 17,
                    custom_opsets={DOMAIN: DOMAIN_VERSION},
                    input_names=None,
                )
                import onnx

                proto = onnx.load_from_string(buffer.getvalue())
    finally:
        module.train(was_training)
    if form == "custom" and not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=DOMAIN, version=DOMAIN_VERSION)
    if path is not None:
        import onnx

        with atomic_file(path) as tmp:
            onnx.save(proto, str(tmp))
    return proto


# ---- causal language models: a decoder with a KV cache (and causal routing's state) ------------------------------

# Dynamic axes, as ONNX Runtime GenAI's model builder names them.
DECODER_AXES = {
    "batch": "batch_size",
    "seq": "sequence_length",
    "past": "past_sequence_length",
    "total": "total_sequence_length",
}


def _is_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    return bool(getattr(config, "is_decoder", False)) and hasattr(model, "lm_head")


class _StateSlots:
    """What the decoder wrapper hands to the causal layers during one traced call, and what they hand back."""

    def __init__(self):
        self.mask = None  # attention_mask [batch, past + seq]
        self.incoming: dict[str, tuple] = {}
        self.outgoing: dict[str, tuple] = {}


class _CausalLayerWithState(nn.Module):
    """A causal-routing LilyLinear whose running means continue from explicit state tensors.

    ``C [batch, E]`` (sum of the router probabilities of the unmasked tokens so far) and ``n [batch]``
    (their count) come in through ``slots.incoming[key]``; the updated pair goes to
    ``slots.outgoing[key]``. Standard ops only: ``lily.RoutedMix`` takes no state. The formula is
    ``LilyLinear._causal_mix``'s (float32 sums here). Lily v2 with causal A routing has a second state,
    key ``key + ":A"``; a side whose routing is not causal goes through the op as in ``LilyLinear``."""

    def __init__(self, layer, name: str, key: str, slots: _StateSlots):
        super().__init__()
        self.layer, self.adapter, self.key, self.slots = layer, name, key, slots

    def _continue(self, key, hidden, router, bank, scaling):
        C0, n0 = self.slots.incoming[key]
        mask = self.slots.mask
        seq = hidden.shape[1]
        valid = (mask[:, mask.shape[1] - seq :] != 0).to(hidden.dtype)  # the current tokens' mask
        probs = torch.softmax(hidden @ router.T, dim=-1)
        C = C0.to(hidden.dtype).unsqueeze(1) + torch.cumsum(probs * valid.unsqueeze(-1), dim=1)
        n = n0.to(hidden.dtype).unsqueeze(1) + torch.cumsum(valid, dim=1)
        weights = C / n.clamp_min(1.0).unsqueeze(-1)  # 0 until the first unmasked token (C is 0 too)
        z = (weights.unsqueeze(-1) * hidden.unsqueeze(-2)).flatten(-2)  # [batch, seq, E * r]
        self.slots.outgoing[key] = (C[:, -1].to(C0.dtype), n[:, -1].to(n0.dtype))
        return scaling * (z @ bank.reshape(-1, bank.shape[-1]))

    def forward(self, x, *args, **kwargs):
        layer, name = self.layer, self.adapter
        result = layer.base_layer(x, *args, **kwargs)
        if layer.is_v2(name) and layer.routing_A[name] == "causal":
            bank_A = layer.a_bank(name)
            hidden = self._continue(self.key + ":A", x.to(bank_A.dtype), layer.lily_router_A[name].weight, bank_A, 1.0)
        else:
            hidden = layer.project(name, x)  # [batch, seq, r]
        routing = layer.routing[name]
        if routing == "causal":
            delta = self._continue(
                self.key, hidden, layer.lily_router[name].weight, layer.bank(name), layer.scaling[name]
            )
        else:
            mask = layer.sequence_mask(hidden) if routing == "sequence" else None
            delta = routed_mix(
                hidden,
                layer.router(name),
                layer.routed_bank(name),
                scaling=layer.scaling[name],
                mode=routing,
                mask=mask,
            )
        return result + delta.to(result.dtype)


class _DecoderForExport(nn.Module):
    """Flat tensors in, flat tensors out: (input_ids, attention_mask[, position_ids], past keys/values,
    causal states) -> (logits, present keys/values, causal states), through a transformers DynamicCache."""

    def __init__(self, lm: nn.Module, num_layers: int, state_keys: list, slots: _StateSlots, position_ids: bool):
        super().__init__()
        self.lm, self.num_layers, self.state_keys, self.slots = lm, num_layers, state_keys, slots
        self.position_ids = position_ids

    def forward(self, input_ids, attention_mask, position_ids, past, states):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        self.slots.mask = attention_mask
        self.slots.incoming = {k: (states[2 * j], states[2 * j + 1]) for j, k in enumerate(self.state_keys)}
        self.slots.outgoing = {}
        kwargs = {"position_ids": position_ids} if self.position_ids else {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, **kwargs)
        presents = []
        for layer in cache.layers[: self.num_layers]:
            presents += [layer.keys, layer.values]
        new_states = []
        for k in self.state_keys:
            new_states += list(self.slots.outgoing[k])
        return (out.logits, *presents, *new_states)


def _decoder_dims(config) -> dict:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_size": head_dim,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "context_length": getattr(text, "max_position_embeddings", None) or 2048,
    }


def _rename_dims(proto, names: dict) -> None:
    """Gives the dynamic axes of the graph's inputs and outputs the names in ``names``
    (value name -> {axis: name}), and renames the exporter's symbols to match in the value infos."""
    graph = proto.graph
    renamed = {}
    for value in list(graph.input) + list(graph.output):
        for axis, name in names.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param and dim.dim_param != name:
                renamed.setdefault(dim.dim_param, name)
            dim.Clear()
            dim.dim_param = name
    for value in graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renamed:
                dim.dim_param = renamed[dim.dim_param]


def _genai_config(dims: dict, model_type: str, form: str, position_ids: bool, library: str | None, tokens: dict):
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    session_options = {"log_id": "onnxruntime-genai", "provider_options": []}
    if library is not None:
        session_options["custom_ops_library"] = library
    return {
        "model": {
            "bos_token_id": tokens.get("bos"),
            "context_length": dims["context_length"],
            "decoder": {
                "session_options": session_options,
                "filename": "model.onnx",
                "head_size": dims["head_size"],
                "hidden_size": dims["hidden_size"],
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": dims["num_attention_heads"],
                "num_hidden_layers": dims["num_hidden_layers"],
                "num_key_value_heads": dims["num_key_value_heads"],
            },
            "eos_token_id": tokens.get("eos"),
            "pad_token_id": tokens.get("pad"),
            "type": model_type,
            "vocab_size": dims["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": dims["context_length"],
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _token_ids(lm) -> dict:
    def first(value):
        if isinstance(value, (list, tuple)):
            return value[0] if value else None
        return value

    gen = getattr(lm, "generation_config", None)
    config = lm.config
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else getattr(config, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    pad = pad if pad is not None else getattr(config, "pad_token_id", None)
    bos = getattr(gen, "bos_token_id", None) if gen is not None else None
    bos = bos if bos is not None else getattr(config, "bos_token_id", None)
    eos_all = eos if isinstance(eos, (list, tuple)) else eos
    return {"bos": first(bos), "eos": eos_all, "pad": first(pad) if pad is not None else first(eos)}


def export_causal_lm(model: nn.Module, out_dir, *, form: str = "custom", calibration=None, tokenizer=None, opset=None):
    """Exports a causal language model (a LilyModel around a ``...ForCausalLM``, or the plain model) to
    a deployable folder ``out_dir`` and returns its path.

    The folder holds ``model.onnx`` (inputs ``input_ids``, ``attention_mask``, ``position_ids`` when the
    architecture takes them, ``past_key_values.{i}.key/.value``; outputs ``logits``,
    ``present.{i}.key/.value``; dynamic ``batch_size``, ``sequence_length``, ``past_sequence_length``
    and ``total_sequence_length`` axes), ``genai_config.json`` (ONNX Runtime GenAI),
    ``lily_decoder.json`` (what ``lily_ext.ort.generate`` needs), for ``custom`` a copy of
    ``liblily_ort.so``, and the tokenizer's files when ``tokenizer`` is given.

    ``causal`` routing adds, per adapted layer k (in ``lily_decoder.json``'s ``state_layers`` order),
    inputs ``lily_state.{k}.sum`` ``[batch, E]`` and ``lily_state.{k}.count`` ``[batch]`` (float32;
    zeros for the prefill) and outputs ``lily_present.{k}.sum`` / ``.count``: the running sums the
    next step continues from. ONNX Runtime GenAI cannot carry them; run such folders with
    ``lily_ext.ort.generate``.

    Args:
        form: ``"custom"`` (``lily.RoutedMix`` nodes where the routing takes no state),
            ``"decomposed"`` (standard ops only) or ``"merged"`` (the adapter folded into the weights:
            the base decoder's graph; needs static routing or ``calibration``).
        calibration: batches (as for ``lily_ext.freeze_router``) to freeze a dynamic router to static
            weights before exporting (on a copy; ``model`` is left as it is). Required by ``merged`` for
            dynamic routing.
        tokenizer: a transformers tokenizer, saved into the folder.
        opset: ONNX opset version (default: the exporter's).

    Raises ValueError when ``out_dir`` exists and is not empty (the folder is written to a temporary
    directory beside it and renamed into place when complete), for an unknown form, or for ``merged``
    on a dynamic router without ``calibration``; TypeError when ``model`` is not a causal LM.
    """
    import json
    import os
    import shutil
    import warnings
    from pathlib import Path

    from ._build.atomic import atomic_directory
    from .calibration import freeze_router
    from .ort import DECODER_CONFIG, LIBRARY_NAME, ort_library_path

    if form not in FORMS:
        raise ValueError(f"form: expected one of {', '.join(map(repr, FORMS))}, got {form!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"out_dir: {str(out_dir)!r} exists and is not an empty directory; choose a new folder or remove it"
        )
    base = model.model if isinstance(model, LilyModel) else model
    if not _is_causal_lm(base):
        raise TypeError(
            f"model: expected a causal language model (a transformers ...ForCausalLM, or a LilyModel around one), got "
            f"{type(base).__name__}"
        )
    routing = model.configs[model.active_adapter].routing if isinstance(model, LilyModel) else None
    routing_A = model.configs[model.active_adapter].routing_A if isinstance(model, LilyModel) else None
    dynamic = next((r for r in (routing, routing_A) if r not in (None, "static")), None)
    if form == "merged" and dynamic is not None and calibration is None:
        raise ValueError(
            f"form 'merged': the active adapter uses {dynamic!r} routing, which depends on the input; pass "
            "calibration=batches to freeze it to static weights (lily_ext.freeze_router), or export form 'custom' or "
            "'decomposed'"
        )
    register_onnx_schema()
    work = copy.deepcopy(model)
    if isinstance(work, LilyModel) and calibration is not None and dynamic is not None:
        freeze_router(work, calibration)
        routing = "static"
        routing_A = None if routing_A is None else "static"
    if form == "merged" and isinstance(work, LilyModel):
        lm = work.merge_and_unload()
    else:
        lm = work.model if isinstance(work, LilyModel) else work
    lm.eval()

    slots = _StateSlots()
    state_layers = []  # (key, E, side)
    if isinstance(work, LilyModel) and form != "merged":
        from .layer import LilyLinear
        from .targets import set_module

        name = work.active_adapter
        for path, layer in list(lm.named_modules()):
            if not isinstance(layer, LilyLinear) or name not in layer.r:
                continue
            causal_A = layer.routing_A.get(name) == "causal"
            if layer.routing.get(name) == "causal" or causal_A:
                if layer.disable_adapters or name in layer.merged_adapters:
                    continue
                set_module(lm, path, _CausalLayerWithState(layer, name, path, slots))
                if causal_A:  # Lily v2: the A router's running state, before the B router's
                    state_layers.append((path + ":A", layer.num_A[name], "A"))
                if layer.routing[name] == "causal":
                    state_layers.append((path, layer.num_B[name], "B"))
    dims = _decoder_dims(lm.config)
    layers = dims["num_hidden_layers"]
    import inspect

    takes_position_ids = "position_ids" in inspect.signature(lm.forward).parameters
    wrapper = _DecoderForExport(lm, layers, [k for k, _, _ in state_layers], slots, takes_position_ids).eval()

    # the example: batch 2, 3 new tokens after 2 past ones (no axis of size 0 or 1, so none is specialised)
    param = next(lm.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    batch, seq, past = 2, 3, 2
    ids = torch.randint(0, dims["vocab_size"], (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1).contiguous()
    kv = tuple(
        torch.randn(batch, dims["num_key_value_heads"], past, dims["head_size"], dtype=dtype) * 0.1
        for _ in range(2 * layers)
    )
    states = []
    for _, E, _ in state_layers:
        states += [torch.rand(batch, E) * past / E, torch.full((batch,), float(past))]
    states = tuple(states)

    B, S, P, T = (DECODER_AXES[a] for a in ("batch", "seq", "past", "total"))
    input_names = ["input_ids", "attention_mask"] + (["position_ids"] if takes_position_ids else [])
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    state_in = [f"lily_state.{k}.{part}" for k in range(len(state_layers)) for part in ("sum", "count")]
    input_names += past_names + state_in
    output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    output_names += [f"lily_present.{k}.{part}" for k in range(len(state_layers)) for part in ("sum", "count")]
    dynamic = (
        {0: B, 1: S},
        {0: B, 1: T},
        {0: B, 1: S} if takes_position_ids else None,
        [{0: B, 2: P} for _ in kv],
        [{0: B} for _ in states],
    )
    args = (ids, mask, positions if takes_position_ids else None, list(kv), list(states))

    with torch.no_grad(), _quiet_exporter(), fused_layers(False), warnings.catch_warnings():
        # (the exporter's own renaming of axes; _rename_dims names them below)
        warnings.filterwarnings("ignore", message=".*different number of inputs than the flatten dynamic_shapes")
        target = wrapper
        if form == "decomposed":
            target = _decompose(torch.export.export(wrapper, args, dynamic_shapes=_export_dims(dynamic), strict=False))
        program = torch.onnx.export(
            target,
            args,
            dynamo=True,
            dynamic_shapes=dynamic if form != "decomposed" else None,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            custom_translation_table={torch.ops.lily.routed_mix.default: _routed_mix_translation},
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    axes = {
        "input_ids": {0: B, 1: S},
        "attention_mask": {0: B, 1: T},
        "position_ids": {0: B, 1: S},
        "logits": {0: B, 1: S},
    }
    axes.update({n: {0: B, 2: P} for n in past_names})
    axes.update({n: {0: B, 2: T} for n in output_names if n.startswith("present.")})
    axes.update({n: {0: B} for n in output_names + input_names if n.startswith(("lily_state.", "lily_present."))})
    _rename_dims(proto, axes)
    uses_op = any(node.domain == DOMAIN for node in proto.graph.node) or any(
        node.domain == DOMAIN for f in proto.functions for node in f.node
    )
    if uses_op and not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=DOMAIN, version=DOMAIN_VERSION)

    import onnx

    tokens = _token_ids(lm)
    library = LIBRARY_NAME if form == "custom" else None
    with atomic_directory(out_dir) as tmp:
        tmp = Path(tmp)
        if proto.ByteSize() > 1_800_000_000:  # protobuf's 2 GiB limit: weights in model.onnx.data
            onnx.save(proto, str(tmp / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        else:
            onnx.save(proto, str(tmp / "model.onnx"))
        if library is not None:
            shutil.copy2(ort_library_path(), tmp / LIBRARY_NAME)
        model_type = getattr(lm.config, "model_type", "llama")
        genai = _genai_config(dims, model_type, form, takes_position_ids, library, tokens)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n", encoding="utf-8")
        record = {
            "format": "lily_ext.decoder",
            "format_version": 1,
            "form": form,
            "routing": routing,
            "routing_A": routing_A,
            "custom_ops_library": library,
            "uses_routed_mix": uses_op,
            "position_ids": takes_position_ids,
            "num_hidden_layers": layers,
            "num_key_value_heads": dims["num_key_value_heads"],
            "head_size": dims["head_size"],
            "state_layers": [
                {"index": i, "layer": k.removesuffix(":A"), "side": side, "num_A" if side == "A" else "num_B": E}
                for i, (k, E, side) in enumerate(state_layers)
            ],
            "eos_token_id": tokens["eos"],
            "pad_token_id": tokens["pad"],
            "model_type": model_type,
        }
        (tmp / DECODER_CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)
    return out_dir
