"""Hand-built ONNX models of one lily.RoutedMix node (every input dim symbolic, so that shape errors
reach the kernel), their inputs and expected results, for the ONNX Runtime tests."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import lily_ext  # registers the lily.RoutedMix schema with the ONNX checker

from .reference import routed_mix_reference
from .shapes import make_inputs

ort = pytest.importorskip("onnxruntime")  # not a hard dependency of lily_ext: the importing test module skips

# IR 10 / opset 17: what every ONNX Runtime since 1.16 reads (newer onnx stamps newer versions).
IR_VERSION = 10
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("lily", 1)]
ONNX_TYPE = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(object): TensorProto.STRING,
}
TORCH_OF = {np.float32: torch.float32, np.float16: torch.float16, np.float64: torch.float64}
ORT_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
)


def value_info(name, array):
    return helper.make_tensor_value_info(name, ONNX_TYPE[array.dtype], [f"{name}_{i}" for i in range(array.ndim)])


def make_model(feeds, out_rank=None, out_type=None, check=True, **attrs):
    """One lily.RoutedMix node over `feeds` (name -> array, in input order), symbolic dims."""
    names = list(feeds)
    hidden = feeds["hidden"]
    out_rank = hidden.ndim if out_rank is None else out_rank
    out = helper.make_tensor_value_info(
        "delta", out_type or ONNX_TYPE[hidden.dtype], [f"o{i}" for i in range(out_rank)]
    )
    node = helper.make_node("RoutedMix", names, ["delta"], domain="lily", **attrs)
    graph = helper.make_graph([node], "routed_mix", [value_info(n, feeds[n]) for n in names if n], [out])
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=IR_VERSION)
    if check:  # (the checker knows lily.RoutedMix once lily_ext.export registered its schema)
        onnx.checker.check_model(model)
    return model


def run_cpu(feeds, session_options=None, **attrs):
    """make_model(feeds, **attrs) run once in a CPU EP session (lily_ext.ort_session)."""
    model = make_model(feeds, **attrs)
    session = lily_ext.ort_session(model.SerializeToString(), **(session_options or {}))
    return session.run(None, {k: v for k, v in feeds.items() if k})[0]


def numpy_inputs(lead, E, r, out, mode, dtype, seed=0):
    hidden, router, bank = make_inputs(lead, E, r, out, mode, torch.float64, seed=seed)
    return {
        "hidden": hidden.numpy().astype(dtype),
        "router": router.numpy().astype(dtype),
        "bank": bank.numpy().astype(dtype),
    }


def expected(feeds, scaling, mode, mask=None):
    """The float64 reference on the feeds (mask: a numpy array or None)."""
    scaling = float(np.float32(scaling))  # ONNX float attributes are 32-bit
    t = [torch.from_numpy(np.asarray(feeds[k], dtype=np.float64)) for k in ("hidden", "router", "bank")]
    return routed_mix_reference(*t, scaling=scaling, mode=mode, mask=None if mask is None else torch.from_numpy(mask))


def bfloat16_cast_model(feeds, mode):
    """numpy has no bfloat16: Cast float32 -> bfloat16 -> RoutedMix -> Cast back, inside the graph."""
    cast_in = [helper.make_node("Cast", [k], [k + "_bf16"], to=TensorProto.BFLOAT16) for k in feeds]
    node = helper.make_node("RoutedMix", [k + "_bf16" for k in feeds], ["d16"], domain="lily", mode=mode)
    cast_out = helper.make_node("Cast", ["d16"], ["delta"], to=TensorProto.FLOAT)
    out = helper.make_tensor_value_info("delta", TensorProto.FLOAT, ["a", "b", "c"])
    graph = helper.make_graph([*cast_in, node, cast_out], "bf16", [value_info(k, v) for k, v in feeds.items()], [out])
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=IR_VERSION)


def bad_run_cases():
    """name -> (feeds, attributes, message of the ORT error naming the argument)."""
    good = numpy_inputs((2, 3), 3, 4, 5, "batch", np.float32)
    static = numpy_inputs((2, 3), 3, 4, 5, "static", np.float32)
    seq = numpy_inputs((2, 3), 3, 4, 5, "sequence", np.float32)
    f32 = np.float32
    return {
        "scalar hidden": (dict(good, hidden=np.array(1.0, f32)), {}, "hidden: expected a tensor"),
        "hidden r": (dict(good, hidden=np.ones((2, 3, 6), f32)), {}, "hidden: last dim must equal"),
        "router rank": (dict(good, router=np.ones((3, 4, 1), f32)), {}, "router: expected shape"),
        "router r": (dict(good, router=np.ones((3, 5), f32)), {}, "router: expected shape"),
        "router E": (dict(good, router=np.ones((2, 4), f32)), {}, "router: expected shape"),
        "bank rank": (dict(good, bank=np.ones((3, 20), f32)), {}, "bank: expected a 3-D tensor"),
        "bank out 0": (dict(good, bank=np.ones((3, 4, 0), f32)), {}, "bank: every dim"),
        "one expert": (dict(good, router=np.ones((1, 4), f32), bank=np.ones((1, 4, 5), f32)), {}, "bank: mode 'batch'"),
        "static theta": (dict(static, router=np.ones((3, 4), f32)), {"mode": "static"}, "router: static mode expects"),
        "router dtype": (dict(good, router=good["router"].astype(np.float16)), {}, "router: dtype float16 differs"),
        "bank dtype": (dict(good, bank=good["bank"].astype(np.float64)), {}, "bank: dtype float64 differs"),
        "mask shape": (dict(seq, mask=np.ones((2, 4), np.int64)), {"mode": "sequence"}, "mask: expected shape"),
        "mask rank": (dict(seq, mask=np.ones((6,), np.int64)), {"mode": "sequence"}, "mask: expected shape"),
        "mask mode": (dict(good, mask=np.ones((2, 3), np.int64)), {}, "mask: only modes 'sequence' and 'causal'"),
        "mask type": (
            dict(seq, mask=np.full((2, 3), "x", dtype=object)),
            {"mode": "sequence"},
            "mask: expected a bool",
        ),
    }
