"""lily.RoutedMix in ONNX Runtime (CPU execution provider) through liblily_ort.so.

Models are built by hand with onnx.helper: one RoutedMix node, every input dim symbolic so that
shape errors reach the kernel. Results are checked against the independent float64 reference
(tests/reference.py) and against torch.ops.lily.routed_mix.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import routed_mix_reference
from test_ops_cpu import SHAPES, TOL, make_inputs, rel_err

import lily_ext
from lily_ext.ops import MODES, routed_mix
from lily_ext.ort import library_status

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

LIBRARY, WHY_MISSING = library_status()
# LILY_EXT_ORT=1 (the build's "required" switch) turns a missing library into failures.
pytestmark = pytest.mark.skipif(
    LIBRARY is None and os.environ.get("LILY_EXT_ORT") != "1",
    reason=f"liblily_ort.so was not built: {WHY_MISSING}",
)

# IR 10 / opset 17: what every ONNX Runtime since 1.16 reads (newer onnx stamps newer versions).
IR_VERSION = 10
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("lily", 1)]
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
             np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64,
             np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL,
             np.dtype(object): TensorProto.STRING}
TORCH_OF = {np.float32: torch.float32, np.float16: torch.float16, np.float64: torch.float64}
ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
              ort.capi.onnxruntime_pybind11_state.RuntimeException)


def value_info(name, array):
    return helper.make_tensor_value_info(name, ONNX_TYPE[array.dtype], [f"{name}_{i}" for i in range(array.ndim)])


def make_model(feeds, out_rank=None, out_type=None, check=True, **attrs):
    """One lily.RoutedMix node over `feeds` (name -> array, in input order), symbolic dims."""
    names = list(feeds)
    hidden = feeds["hidden"]
    out_rank = hidden.ndim if out_rank is None else out_rank
    out = helper.make_tensor_value_info("delta", out_type or ONNX_TYPE[hidden.dtype], [f"o{i}" for i in range(out_rank)])
    node = helper.make_node("RoutedMix", names, ["delta"], domain="lily", **attrs)
    graph = helper.make_graph([node], "routed_mix", [value_info(n, feeds[n]) for n in names if n], [out])
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=IR_VERSION)
    if check:  # (the checker knows lily.RoutedMix once lily_ext.export registered its schema)
        onnx.checker.check_model(model)
    return model


def run(feeds, session_options=None, **attrs):
    model = make_model(feeds, **attrs)
    session = lily_ext.ort_session(model.SerializeToString(), **(session_options or {}))
    return session.run(None, {k: v for k, v in feeds.items() if k})[0]


def numpy_inputs(lead, E, r, out, mode, dtype, seed=0):
    hidden, router, bank = make_inputs(lead, E, r, out, mode, torch.float64, seed=seed)
    return {"hidden": hidden.numpy().astype(dtype), "router": router.numpy().astype(dtype),
            "bank": bank.numpy().astype(dtype)}


def expected(feeds, scaling, mode, mask=None):
    scaling = float(np.float32(scaling))  # ONNX float attributes are 32-bit
    t = [torch.from_numpy(np.asarray(feeds[k], dtype=np.float64)) for k in ("hidden", "router", "bank")]
    return routed_mix_reference(*t, scaling=scaling, mode=mode, mask=None if mask is None else torch.from_numpy(mask))


# ---- results ----


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2], s[3]))))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
def test_matches_reference(mode, shape, dtype):
    lead, E, r, out = shape
    feeds = numpy_inputs(lead, E, r, out, mode, dtype)
    delta = run(feeds, mode=mode, scaling=0.7)
    assert delta.dtype == dtype and delta.shape == (*lead, out)
    ref = expected(feeds, 0.7, mode)
    assert rel_err(torch.from_numpy(delta), ref) <= TOL[TORCH_OF[dtype]]
    # the torch op runs the same kernels (with MKL for the large GEMMs)
    mine = routed_mix(*(torch.from_numpy(feeds[k]) for k in ("hidden", "router", "bank")),
                      scaling=float(np.float32(0.7)), mode=mode)
    assert rel_err(torch.from_numpy(delta), mine) <= TOL[TORCH_OF[dtype]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead, E, r, out", [((300,), 4, 128, 1024), ((2, 257), 3, 64, 520), ((33,), 2, 40, 130)])
def test_blocked_gemm_paths(mode, lead, E, r, out):
    # sizes past the small-N kernels: the ORT library's own blocked GEMM does the products
    feeds = numpy_inputs(lead, E, r, out, mode, np.float32, seed=2)
    delta = run(feeds, mode=mode, scaling=0.5)
    assert rel_err(torch.from_numpy(delta), expected(feeds, 0.5, mode)) <= 2e-5


@pytest.mark.parametrize("mask_dtype", [np.int64, np.int32, np.bool_, np.float32])
def test_sequence_mask_with_fully_masked_sample(mask_dtype):
    feeds = numpy_inputs((4, 6), 3, 8, 12, "sequence", np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    feeds["mask"] = mask.astype(mask_dtype)
    delta = run(feeds, mode="sequence", scaling=0.7)
    assert np.all(delta[2] == 0), "a fully masked sample must get a zero delta"
    assert rel_err(torch.from_numpy(delta), expected(feeds, 0.7, "sequence", mask)) <= 2e-5
    torch_delta = routed_mix(*(torch.from_numpy(feeds[k]) for k in ("hidden", "router", "bank")), scaling=0.7,
                             mode="sequence", mask=torch.from_numpy(mask.astype(bool)))
    assert rel_err(torch.from_numpy(delta), torch_delta) <= 2e-5


def test_sequence_mask_given_as_empty_name_is_absent():
    feeds = numpy_inputs((2, 3), 2, 4, 5, "sequence", np.float32)
    with_empty = dict(feeds, **{"": None})  # inputs ["hidden", "router", "bank", ""]
    model = make_model(with_empty, mode="sequence")
    delta = lily_ext.ort_session(model.SerializeToString()).run(None, feeds)[0]
    assert rel_err(torch.from_numpy(delta), expected(feeds, 1.0, "sequence")) <= 2e-5


def test_defaults_are_batch_mode_and_unit_scaling():
    feeds = numpy_inputs((5, 3), 3, 6, 7, "batch", np.float32)
    assert rel_err(torch.from_numpy(run(feeds)), expected(feeds, 1.0, "batch")) <= 2e-5


def test_dynamic_leading_dims_in_one_session():
    feeds = numpy_inputs((2, 3), 3, 8, 9, "token", np.float32)
    session = lily_ext.ort_session(make_model(feeds, mode="token").SerializeToString())
    for lead in [(2, 3), (1, 1), (7, 2), (0, 4)]:
        h = numpy_inputs(lead, 3, 8, 9, "token", np.float32, seed=len(lead) + lead[0])["hidden"]
        delta = session.run(None, dict(feeds, hidden=h))[0]
        assert delta.shape == (*lead, 9)
        assert rel_err(torch.from_numpy(delta), expected(dict(feeds, hidden=h), 1.0, "token")) <= 2e-5


def bfloat16_cast_model(feeds, mode):
    """numpy has no bfloat16: Cast float32 -> bfloat16 -> RoutedMix -> Cast back, inside the graph."""
    cast_in = [helper.make_node("Cast", [k], [k + "_bf16"], to=TensorProto.BFLOAT16) for k in feeds]
    node = helper.make_node("RoutedMix", [k + "_bf16" for k in feeds], ["d16"], domain="lily", mode=mode)
    cast_out = helper.make_node("Cast", ["d16"], ["delta"], to=TensorProto.FLOAT)
    out = helper.make_tensor_value_info("delta", TensorProto.FLOAT, ["a", "b", "c"])
    graph = helper.make_graph([*cast_in, node, cast_out], "bf16", [value_info(k, v) for k, v in feeds.items()], [out])
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=IR_VERSION)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_through_casts(mode):
    feeds = numpy_inputs((3, 5), 3, 8, 16, mode, np.float32)
    model = bfloat16_cast_model(feeds, mode)
    onnx.checker.check_model(model)
    delta = lily_ext.ort_session(model.SerializeToString()).run(None, feeds)[0]
    rounded = {k: torch.from_numpy(v).bfloat16().double().numpy() for k, v in feeds.items()}
    assert rel_err(torch.from_numpy(delta), expected(rounded, 1.0, mode)) <= 2e-2


def test_same_result_on_one_and_two_threads():
    feeds = numpy_inputs((600,), 4, 32, 300, "token", np.float32)
    model = make_model(feeds, mode="token").SerializeToString()
    one = lily_ext.ort_session(model, intra_op_num_threads=1).run(None, feeds)[0]
    two = lily_ext.ort_session(model, intra_op_num_threads=2).run(None, feeds)[0]
    assert np.array_equal(one, two)


# ---- errors: an ORT exception naming the argument, and the process goes on ----


def bad_run_cases():
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
        "mask mode": (dict(good, mask=np.ones((2, 3), np.int64)), {}, "mask: only mode 'sequence'"),
        "mask type": (dict(seq, mask=np.full((2, 3), "x", dtype=object)), {"mode": "sequence"}, "mask: expected a bool"),
    }


@pytest.mark.parametrize("case", list(bad_run_cases()))
def test_bad_inputs_raise_naming_the_argument(case):
    feeds, attrs, message = bad_run_cases()[case]
    model = make_model(feeds, out_rank=max(feeds["hidden"].ndim, 1), out_type=TensorProto.FLOAT, **attrs)
    session = lily_ext.ort_session(model.SerializeToString())
    with pytest.raises(ORT_ERRORS, match=message) as info:
        session.run(None, feeds)
    assert "lily.RoutedMix" in str(info.value)
    # the process goes on, and so does ORT: a good model runs next
    good = numpy_inputs((2, 3), 3, 4, 5, "token", np.float32)
    assert run(good, mode="token").shape == (2, 3, 5)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"mode": "bogus"}, "mode: expected one of 'batch', 'sequence', 'token', 'static', got 'bogus'"),
        ({"mode": 3}, "mode: expected a string attribute"),
        ({"scaling": "big"}, "scaling: expected a float attribute"),
        ({"scaling": float("inf")}, "scaling: expected a finite float"),
    ],
)
def test_bad_attributes_fail_at_session_creation(attrs, message):
    feeds = numpy_inputs((2, 3), 3, 4, 5, "batch", np.float32)
    with pytest.raises(ORT_ERRORS, match=message):
        lily_ext.ort_session(make_model(feeds, check=False, **attrs).SerializeToString())
    assert run(feeds).shape == (2, 3, 5)  # still alive


def test_ort_session_rejects_unknown_options():
    with pytest.raises(TypeError, match="unknown session option 'intra_threads'"):
        lily_ext.ort_session(b"", intra_threads=1)


def test_build_info_reports_the_library():
    info = lily_ext.build_info()
    assert info["onnxruntime_library"] == lily_ext.ort_library_path()
    assert info["onnxruntime_library_reason"] is None


# ---- the library stands alone ----


def test_links_no_torch_python_or_onnxruntime():
    tool = shutil.which("readelf")
    if tool is None:
        pytest.skip("readelf not on PATH")
    dynamic = subprocess.run([tool, "-d", lily_ext.ort_library_path()], capture_output=True, text=True, check=True)
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.stdout.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic.stdout
    for lib in needed:
        assert not any(bad in lib for bad in ("torch", "c10", "python", "onnxruntime")), needed


FRESH_PROCESS = r"""
import json, sys
import numpy as np
import onnxruntime as ort
library, model, feeds_path, out_path = sys.argv[1:]
options = ort.SessionOptions()
options.register_custom_ops_library(library)
session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
feeds = dict(np.load(feeds_path))
np.save(out_path, session.run(None, feeds)[0])
print(json.dumps(sorted(m for m in ("torch", "lily_ext") if m in sys.modules)))
"""


def test_saved_model_runs_in_a_fresh_process_with_only_onnxruntime(tmp_path):
    feeds = numpy_inputs((3, 4), 3, 8, 10, "sequence", np.float32)
    feeds["mask"] = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.int64)
    model_path, feeds_path, out_path = tmp_path / "lily.onnx", tmp_path / "feeds.npz", tmp_path / "delta.npy"
    onnx.save(make_model(feeds, mode="sequence", scaling=0.25), str(model_path))
    np.savez(feeds_path, **feeds)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # lily_ext must not be importable there
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, lily_ext.ort_library_path(), str(model_path), str(feeds_path),
         str(out_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], "the fresh process imported torch or lily_ext"
    delta = np.load(out_path)
    assert rel_err(torch.from_numpy(delta), expected(feeds, 0.25, "sequence", feeds["mask"])) <= 2e-5
