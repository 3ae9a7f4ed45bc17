"""Serving from C++: the examples in export/examples, built by their CMakeLists.txt against ONNX
Runtime's C++ API and the pip wheel's libonnxruntime (serve_onnx: a custom-form model with
liblily_ort.so), and against libtorch (load_torchscript: a traced model with lily_ext's _C)."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from helpers.lily_models import DYNAMIC, bert_model, lily_net

import lily_ext
from lily_ext._build.library import library_path
from lily_ext._build.ort_library import find_headers
from lily_ext.export import export_onnx

pytestmark = pytest.mark.cpp


def build_example(target, build_dir, **cache):
    """Configures export/examples with CMake (``cache``: -D variables) and builds ``target``."""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is a build requirement of lily_ext (pyproject.toml) and must be on PATH"
    subprocess.run(
        [
            cmake,
            "-S",
            str(ROOT / "export" / "examples"),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            *(f"-D{k}={v}" for k, v in cache.items()),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    subprocess.run([cmake, "--build", str(build_dir), "--target", target], check=True, timeout=600, capture_output=True)
    return build_dir / target


@pytest.mark.ort
def test_cpp_program_serves_the_custom_form(tmp_path):
    import onnxruntime

    headers = find_headers(fetch=False).include_dir  # the build fetched them into the cache
    assert headers, "ONNX Runtime headers not found although the library was built"
    runtime = next((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    binary = build_example(
        "serve_onnx", tmp_path / "build", ONNXRUNTIME_INCLUDE_DIR=headers, ONNXRUNTIME_LIBRARY=runtime
    )
    model = bert_model("token")
    example = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    export_onnx(model, (), tmp_path / "m.onnx", form="custom", kwargs=example, dynamic_shapes=DYNAMIC)
    tokens = [11, 42, 7, 3, 88]
    result = subprocess.run(
        [str(binary), str(tmp_path / "m.onnx"), lily_ext.ort_library_path(), *map(str, tokens)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    got = np.array([float(v) for v in result.stdout.split()])
    expected = model(input_ids=torch.tensor([tokens])).logits.detach().numpy().ravel()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_libtorch_program_runs_a_traced_model(tmp_path):
    """export/examples/load_torchscript.cpp: dlopen lily_ext's _C library (no Python), torch::jit::load."""
    binary = build_example("load_torchscript", tmp_path / "build", TORCH_DIR=Path(torch.__file__).parent)
    traced = torch.jit.trace(lily_net("token").model, (torch.randn(2, 5, 16),))
    traced.save(str(tmp_path / "traced.pt"))
    result = subprocess.run(
        [str(binary), str(tmp_path / "traced.pt"), library_path()], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "output [2, 5, 5]" in result.stdout, result.stderr
