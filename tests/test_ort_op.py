"""lily.RoutedMix in ONNX Runtime (CPU execution provider) through liblily_ort.so.

Models are built by hand with onnx.helper: one RoutedMix node, every input dim symbolic so that
shape errors reach the kernel. Results are checked against the independent float64 reference
(tests/helpers/reference.py) and against torch.ops.lily.routed_mix.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers.ort_models import (
    ORT_ERRORS,
    TORCH_OF,
    bad_run_cases,
    bfloat16_cast_model,
    expected,
    make_model,
    numpy_inputs,
    run_cpu,
)
from helpers.shapes import SHAPES, TOL, rel_err, shape_id
from onnx import TensorProto

import lily_ext
from lily_ext.ops import MODES, routed_mix

pytestmark = pytest.mark.ort


# ---- results ----


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
def test_matches_reference(mode, shape, dtype):
    lead, E, r, out = shape
    feeds = numpy_inputs(lead, E, r, out, mode, dtype)
    delta = run_cpu(feeds, mode=mode, scaling=0.7)
    assert delta.dtype == dtype and delta.shape == (*lead, out)
    ref = expected(feeds, 0.7, mode)
    assert rel_err(torch.from_numpy(delta), ref) <= TOL[TORCH_OF[dtype]]
    # the torch op runs the same kernels (with MKL for the large GEMMs)
    mine = routed_mix(
        *(torch.from_numpy(feeds[k]) for k in ("hidden", "router", "bank")), scaling=float(np.float32(0.7)), mode=mode
    )
    assert rel_err(torch.from_numpy(delta), mine) <= TOL[TORCH_OF[dtype]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead, E, r, out", [((300,), 4, 128, 1024), ((2, 257), 3, 64, 520), ((33,), 2, 40, 130)])
def test_blocked_gemm_paths(mode, lead, E, r, out):
    # sizes past the small-N kernels: the ORT library's own blocked GEMM does the products
    feeds = numpy_inputs(lead, E, r, out, mode, np.float32, seed=2)
    delta = run_cpu(feeds, mode=mode, scaling=0.5)
    assert rel_err(torch.from_numpy(delta), expected(feeds, 0.5, mode)) <= 2e-5


@pytest.mark.parametrize("mode", ["sequence", "causal"])
@pytest.mark.parametrize("mask_dtype", [np.int64, np.int32, np.bool_, np.float32])
def test_mask_with_fully_masked_sample(mask_dtype, mode):
    feeds = numpy_inputs((4, 6), 3, 8, 12, mode, np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    feeds["mask"] = mask.astype(mask_dtype)
    delta = run_cpu(feeds, mode=mode, scaling=0.7)
    assert np.all(delta[2] == 0), "a fully masked sample must get a zero delta"
    assert rel_err(torch.from_numpy(delta), expected(feeds, 0.7, mode, mask)) <= 2e-5
    torch_delta = routed_mix(
        *(torch.from_numpy(feeds[k]) for k in ("hidden", "router", "bank")),
        scaling=0.7,
        mode=mode,
        mask=torch.from_numpy(mask.astype(bool)),
    )
    assert rel_err(torch.from_numpy(delta), torch_delta) <= 2e-5


def test_sequence_mask_given_as_empty_name_is_absent():
    feeds = numpy_inputs((2, 3), 2, 4, 5, "sequence", np.float32)
    with_empty = dict(feeds, **{"": None})  # inputs ["hidden", "router", "bank", ""]
    model = make_model(with_empty, mode="sequence")
    delta = lily_ext.ort_session(model.SerializeToString()).run(None, feeds)[0]
    assert rel_err(torch.from_numpy(delta), expected(feeds, 1.0, "sequence")) <= 2e-5


def test_defaults_are_batch_mode_and_unit_scaling():
    feeds = numpy_inputs((5, 3), 3, 6, 7, "batch", np.float32)
    assert rel_err(torch.from_numpy(run_cpu(feeds)), expected(feeds, 1.0, "batch")) <= 2e-5


def test_dynamic_leading_dims_in_one_session():
    feeds = numpy_inputs((2, 3), 3, 8, 9, "token", np.float32)
    session = lily_ext.ort_session(make_model(feeds, mode="token").SerializeToString())
    for lead in [(2, 3), (1, 1), (7, 2), (0, 4)]:
        h = numpy_inputs(lead, 3, 8, 9, "token", np.float32, seed=len(lead) + lead[0])["hidden"]
        delta = session.run(None, dict(feeds, hidden=h))[0]
        assert delta.shape == (*lead, 9)
        assert rel_err(torch.from_numpy(delta), expected(dict(feeds, hidden=h), 1.0, "token")) <= 2e-5


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
    assert run_cpu(good, mode="token").shape == (2, 3, 5)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"mode": "bogus"}, "mode: expected one of 'batch', 'sequence', 'token', 'static', 'causal', got 'bogus'"),
        ({"mode": 3}, "mode: expected a string attribute"),
        ({"scaling": "big"}, "scaling: expected a float attribute"),
        ({"scaling": float("inf")}, "scaling: expected a finite float"),
    ],
)
def test_bad_attributes_fail_at_session_creation(attrs, message):
    feeds = numpy_inputs((2, 3), 3, 4, 5, "batch", np.float32)
    with pytest.raises(ORT_ERRORS, match=message):
        lily_ext.ort_session(make_model(feeds, check=False, **attrs).SerializeToString())
    assert run_cpu(feeds).shape == (2, 3, 5)  # still alive


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
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            lily_ext.ort_library_path(),
            str(model_path),
            str(feeds_path),
            str(out_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], "the fresh process imported torch or lily_ext"
    delta = np.load(out_path)
    assert rel_err(torch.from_numpy(delta), expected(feeds, 0.25, "sequence", feeds["mask"])) <= 2e-5
