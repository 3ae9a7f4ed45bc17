"""ONNX export in three forms: ``custom`` (lily.RoutedMix nodes), ``decomposed`` (standard ops only)
and ``merged`` (static routing folded into the base weights: a plain model)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ._build.atomic import atomic_file
from .model import LilyModel
from .ops import routed_mix_decomposed

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
        routing = model.configs[model.active_adapter].routing
        if routing != "static":
            raise ValueError(
                f"form 'merged': the active adapter uses {routing!r} routing, which depends on the input; "
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
        with torch.no_grad(), _quiet_exporter():
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
