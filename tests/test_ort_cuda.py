"""lily.RoutedMix on ONNX Runtime's CUDA execution provider (liblily_ort.so built with CUDA).

The CUDA EP tests skip, saying why, unless the library has CUDA EP kernels, onnxruntime offers
CUDAExecutionProvider and a GPU is present (torch.cuda.is_available()). They pin every node to the
CUDA EP (session.disable_cpu_ep_fallback, or the profile for exported models) so a silent CPU
fallback cannot pass for a CUDA result. Models and inputs come from helpers.ort_models (one RoutedMix
node, symbolic dims); results are checked against the float64 reference (helpers/reference.py),
the CPU EP kernel and PyTorch.

Every test is marked ort; the CUDA EP tests are also marked gpu. The library checks at the end
(NEEDED entries, exported symbols, build_info) run wherever the library is built.
"""

import json
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers.lily_models import DYNAMIC, bert_model, example_and_other_inputs
from helpers.ort_models import (
    ORT_ERRORS,
    bad_run_cases,
    bfloat16_cast_model,
    expected,
    make_model,
    numpy_inputs,
    ort,
    run_cpu,
)
from helpers.shapes import CUDA_SHAPES, CUDA_TOL, shape_id
from onnx import TensorProto

import lily_ext
from lily_ext.ops import MODES
from lily_ext.ort import library_has_cuda, library_record, library_status

pytestmark = pytest.mark.ort


def _why_no_cuda_ep():
    if library_status()[0] is None or not torch.cuda.is_available():
        return None  # the ort / gpu markers skip these, saying why (tests/conftest.py)
    if not library_has_cuda():
        return f"liblily_ort.so was built without CUDA EP kernels: {library_record().get('cuda_reason')}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} offers no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    return None


WHY_NO_CUDA_EP = _why_no_cuda_ep()


def needs_cuda_ep(test):
    """A test on the CUDA EP: marked gpu (and ort, as the whole module); skipped, saying why, unless
    the library has CUDA EP kernels and onnxruntime offers the CUDA EP."""
    return pytest.mark.gpu(pytest.mark.skipif(WHY_NO_CUDA_EP is not None, reason=str(WHY_NO_CUDA_EP))(test))


TOL = {np.float32: CUDA_TOL[torch.float32], np.float16: CUDA_TOL[torch.float16], np.float64: CUDA_TOL[torch.float64]}
PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def rel_err(actual, expected_):
    actual, expected_ = np.asarray(actual, dtype=np.float64), np.asarray(expected_, dtype=np.float64)
    if expected_.size == 0:
        return 0.0
    if not np.isfinite(actual).all():
        return float("inf")
    return float(np.abs(actual - expected_).max() / max(np.abs(expected_).max(), 1e-30))


def cuda_session(model, pinned=True, **options):
    """A session on the CUDA EP with the library registered; pinned: session creation fails unless
    every node (RoutedMix included) is assigned to the CUDA EP."""
    so = ort.SessionOptions()
    for key, value in options.items():
        setattr(so, key, value)
    so.register_custom_ops_library(lily_ext.ort_library_path(cuda=True))
    if pinned:  # (ORT refuses this together with an explicit CPU EP in the provider list)
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    session = ort.InferenceSession(model, sess_options=so, providers=PROVIDERS[:1] if pinned else PROVIDERS)
    assert session.get_providers()[0] == "CUDAExecutionProvider", session.get_providers()
    return session


def run_cuda(feeds, **attrs):
    session = cuda_session(make_model(feeds, **attrs).SerializeToString())
    return session.run(None, {k: v for k, v in feeds.items() if k})[0]


def routed_mix_providers(session, feeds):
    """Execution providers the profile shows RoutedMix nodes running on (session has profiling on)."""
    session.run(None, feeds)
    with open(session.end_profiling(), encoding="utf-8") as f:
        events = json.load(f)
    return {
        e["args"].get("provider")
        for e in events
        if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "RoutedMix"
    }


def sequence_mask(lead, dtype, seed=0):
    """A [S, L] mask with a fully masked second sample and partially masked others."""
    rng = np.random.default_rng(seed)
    mask = rng.random(lead) < 0.7
    mask[..., 0] = True
    if len(lead) >= 2 and lead[0] > 1:
        mask[1] = False
    return mask.astype(dtype)


# ---- results ----


@needs_cuda_ep
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64], ids=lambda d: np.dtype(d).name)
def test_matches_reference(mode, shape, dtype):
    # CUDA_SHAPES cross every path of the CUDA forward: fused small N (<= 64), routing kernels +
    # cuBLAS (batch, static, sequence L > 1), the tiled per-row kernel (token, 2-D sequence), N = 0
    lead, E, r, out = shape
    feeds = numpy_inputs(lead, E, r, out, mode, dtype)
    delta = run_cuda(feeds, mode=mode, scaling=0.7)
    assert delta.dtype == dtype and delta.shape == (*lead, out)
    assert rel_err(delta, expected(feeds, 0.7, mode)) <= TOL[dtype]
    # and the CPU EP kernel on the same inputs (half precision: both round to float16 once)
    assert rel_err(delta, run_cpu(feeds, mode=mode, scaling=0.7)) <= TOL[dtype]


@needs_cuda_ep
@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_through_casts(mode):
    feeds = numpy_inputs((3, 70), 3, 16, 40, mode, np.float32)
    model = bfloat16_cast_model(feeds, mode)
    delta = cuda_session(model.SerializeToString()).run(None, feeds)[0]
    rounded = {k: torch.from_numpy(v).bfloat16().double().numpy() for k, v in feeds.items()}
    assert rel_err(delta, expected(rounded, 1.0, mode)) <= CUDA_TOL[torch.bfloat16]


@needs_cuda_ep
@pytest.mark.parametrize(
    "mask_dtype", [np.int64, np.int32, np.bool_, np.float32, np.float16], ids=lambda d: np.dtype(d).name
)
@pytest.mark.parametrize("lead", [(4, 6), (3, 40), (2, 3, 30), (80,)], ids=lambda s: "x".join(map(str, s)))
def test_sequence_mask_with_fully_masked_sample(mask_dtype, lead):
    # small path (4x6), routing kernels + batched cuBLAS (3x40, 2x3x30), per-row kernel (80,)
    feeds = numpy_inputs(lead, 3, 8, 12, "sequence", np.float32)
    feeds["mask"] = sequence_mask(lead, mask_dtype)
    delta = run_cuda(feeds, mode="sequence", scaling=0.7)
    if len(lead) >= 2:
        assert np.all(delta[1] == 0), "a fully masked sample must get a zero delta"
    assert rel_err(delta, expected(feeds, 0.7, "sequence", feeds["mask"].astype(bool))) <= 2e-5
    assert rel_err(delta, run_cpu(feeds, mode="sequence", scaling=0.7)) <= 2e-5


@needs_cuda_ep
def test_float_mask_nan_counts_and_negative_zero_does_not():
    # the device conversion (lily::cuda::mask_to_bytes) and the CPU EP read masks alike
    feeds = numpy_inputs((3, 4), 2, 8, 6, "sequence", np.float32)
    feeds["mask"] = np.array([[np.nan, 0, 0, 1], [-0.0, -0.0, 2, 0], [-0.0, 0, 0, 0]], np.float32)
    delta = run_cuda(feeds, mode="sequence")
    assert np.all(delta[2] == 0)
    bool_mask = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]], bool)
    assert rel_err(delta, expected(feeds, 1.0, "sequence", bool_mask)) <= 2e-5
    assert rel_err(delta, run_cpu(feeds, mode="sequence")) <= 2e-5


@needs_cuda_ep
def test_dynamic_leading_dims_in_one_session():
    feeds = numpy_inputs((2, 3), 3, 8, 9, "token", np.float32)
    session = cuda_session(make_model(feeds, mode="token").SerializeToString())
    for lead in [(2, 3), (1, 1), (7, 200), (0, 4), (1, 65)]:
        h = numpy_inputs(lead, 3, 8, 9, "token", np.float32, seed=len(lead) + lead[0])["hidden"]
        delta = session.run(None, dict(feeds, hidden=h))[0]
        assert delta.shape == (*lead, 9)
        assert rel_err(delta, expected(dict(feeds, hidden=h), 1.0, "token")) <= 2e-5


@needs_cuda_ep
@pytest.mark.parametrize("mode, lead", [("batch", (8,)), ("batch", (300,)), ("token", (300,)), ("sequence", (4, 100))])
def test_concurrent_runs_from_four_threads_are_identical(mode, lead):
    # 4 sessions, one per thread, and one session shared by the 4 threads: ORT runs Compute
    # concurrently (several streams); the pooled cuBLAS handles and the stream-ordered scratch keep
    # every result bitwise equal to a lone run (the kernels are deterministic)
    feeds = numpy_inputs(lead, 4, 32, 96, mode, np.float32, seed=3)
    if mode == "sequence":
        feeds["mask"] = sequence_mask(lead, np.int64)
    model = make_model(feeds, mode=mode, scaling=0.5).SerializeToString()
    want = cuda_session(model).run(None, feeds)[0]
    own = [cuda_session(model) for _ in range(4)]
    shared = cuda_session(model)
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        outs = []
        for _ in range(8):
            outs.append(own[i].run(None, feeds)[0])
            outs.append(shared.run(None, feeds)[0])
        return outs

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    for outs in results:
        for delta in outs:
            assert np.array_equal(delta, want)
    assert rel_err(want, expected(feeds, 0.5, mode, feeds.get("mask"))) <= 2e-5


# ---- errors: an ORT exception naming the argument, and the process goes on ----


def cuda_bad_run_cases():
    # "mask type" feeds a string tensor, which the CUDA EP cannot hold in device memory at all
    return {k: v for k, v in bad_run_cases().items() if k != "mask type"}


@needs_cuda_ep
@pytest.mark.parametrize("case", list(cuda_bad_run_cases()))
def test_bad_inputs_raise_naming_the_argument(case):
    feeds, attrs, message = cuda_bad_run_cases()[case]
    model = make_model(feeds, out_rank=max(feeds["hidden"].ndim, 1), out_type=TensorProto.FLOAT, **attrs)
    session = cuda_session(model.SerializeToString())
    with pytest.raises(ORT_ERRORS, match=message) as info:
        session.run(None, feeds)
    assert "lily.RoutedMix" in str(info.value)
    good = numpy_inputs((2, 3), 3, 4, 5, "token", np.float32)
    assert run_cuda(good, mode="token").shape == (2, 3, 5)


@needs_cuda_ep
def test_too_many_experts_is_an_error_not_a_crash():
    feeds = numpy_inputs((3,), 300, 4, 5, "batch", np.float32)
    session = cuda_session(make_model(feeds).SerializeToString())
    with pytest.raises(ORT_ERRORS, match=r"lily.RoutedMix: CUDA: bank: the CUDA kernels support E <= 256"):
        session.run(None, feeds)
    assert rel_err(run_cpu(feeds), expected(feeds, 1.0, "batch")) <= 2e-5  # the CPU EP has no such limit
    good = numpy_inputs((2, 3), 3, 4, 5, "batch", np.float32)
    assert rel_err(run_cuda(good), expected(good, 1.0, "batch")) <= 2e-5


@needs_cuda_ep
@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"mode": "bogus"}, "mode: expected one of 'batch', 'sequence', 'token', 'static', 'causal', got 'bogus'"),
        ({"scaling": float("inf")}, "scaling: expected a finite float"),
    ],
)
def test_bad_attributes_fail_at_session_creation(attrs, message):
    feeds = numpy_inputs((2, 3), 3, 4, 5, "batch", np.float32)
    with pytest.raises(ORT_ERRORS, match=message):
        cuda_session(make_model(feeds, check=False, **attrs).SerializeToString())


# ---- exported models ----


@needs_cuda_ep
@pytest.mark.parametrize("routing", ["batch", "sequence", "token", "static"])
def test_exported_custom_form_runs_on_the_cuda_ep(routing, tmp_path):
    model = bert_model(routing)
    example, other = example_and_other_inputs()
    lily_ext.export_onnx(model, (), tmp_path / "m.onnx", form="custom", kwargs=example, dynamic_shapes=DYNAMIC)
    # not pinned: ORT may keep the exporter's shape arithmetic on the CPU; the profile shows where RoutedMix ran
    session = cuda_session(
        str(tmp_path / "m.onnx"), pinned=False, enable_profiling=True, profile_file_prefix=str(tmp_path / "profile")
    )
    feeds = {k: v.numpy() for k, v in other.items()}
    assert routed_mix_providers(session, feeds) == {"CUDAExecutionProvider"}
    with torch.no_grad():
        want = model(**other).logits.numpy()
    np.testing.assert_allclose(session.run(None, feeds)[0], want, rtol=0, atol=1e-4)


# ---- the library itself (runs everywhere) ----

BASE_LIBS = ("libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux", "libpthread.so", "libdl.so", "librt.so")
CUDA_LIBS = ("libcublas.so", "libcublasLt.so", "libcudart.so")


def needed_libraries(path):
    tool = shutil.which("readelf")
    if tool is None:
        pytest.skip("readelf not on PATH")
    dynamic = subprocess.run([tool, "-d", path], capture_output=True, text=True, check=True)
    return [line.split("[", 1)[1].rstrip("]") for line in dynamic.stdout.splitlines() if "(NEEDED)" in line]


def test_cpu_library_needs_only_the_c_runtime():
    # a CPU host with only onnxruntime installed can load it
    needed = needed_libraries(lily_ext.ort_library_path())
    assert needed and all(lib.startswith(BASE_LIBS) for lib in needed), needed


def test_cuda_library_needs_the_c_runtime_and_cublas():
    if not library_has_cuda():
        pytest.skip(f"built without CUDA EP kernels: {library_record().get('cuda_reason')}")
    needed = needed_libraries(lily_ext.ort_library_path(cuda=True))
    assert all(lib.startswith(BASE_LIBS + CUDA_LIBS) for lib in needed), needed
    assert not any(bad in lib for lib in needed for bad in ("torch", "c10", "python", "onnxruntime")), needed
    assert any(lib.startswith("libcublas.so") for lib in needed), needed
    assert not any(lib.startswith("libcudart.so") for lib in needed), "the CUDA runtime is linked statically"


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-library", "cuda-library"])
def test_exports_only_register_custom_ops(cuda):
    tool = shutil.which("nm")
    if tool is None:
        pytest.skip("nm not on PATH")
    if cuda and not library_has_cuda():
        pytest.skip(f"built without CUDA EP kernels: {library_record().get('cuda_reason')}")
    listing = subprocess.run(
        [tool, "-D", "--defined-only", lily_ext.ort_library_path(cuda=cuda)], capture_output=True, text=True, check=True
    )
    names = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    assert names == {"RegisterCustomOps"}, sorted(names)


def test_build_info_reports_cuda_ep_kernels():
    info = lily_ext.build_info()
    assert info["onnxruntime_library_cuda"] is library_has_cuda()
    if info["onnxruntime_library_cuda"]:
        assert info["onnxruntime_library_cuda_reason"] is None and library_record()["cuda_archs"]
    else:
        assert info["onnxruntime_library_cuda_reason"]


def test_cpu_session_needs_no_gpu_when_cuda_kernels_are_compiled_in():
    # registering the CUDA EP kernels must not touch CUDA: a CPU session works without a GPU
    feeds = numpy_inputs((2, 5), 3, 8, 9, "batch", np.float32)
    assert rel_err(run_cpu(feeds), expected(feeds, 1.0, "batch")) <= 2e-5
