"""Serving from C++: the example program (examples/cpp/serve_onnx.cpp) built against ONNX Runtime's
C++ API and the pip wheel's libonnxruntime, running a custom-form model with liblily_ort.so."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from models import tiny_bert

import lily_ext
from lily_ext import LilyConfig, get_lily_model
from lily_ext._ort_build import find_headers
from lily_ext.export import export_onnx

ROOT = Path(__file__).resolve().parents[1]


def test_cpp_program_serves_the_custom_form(tmp_path):
    headers = find_headers(fetch=False).include_dir  # the build fetched them into the cache
    assert headers, "ONNX Runtime headers not found although the library was built"
    # the wheel ships libonnxruntime.so.1.x.y whose soname is libonnxruntime.so.1: link through that name
    runtime = next((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    runtime_dir = tmp_path / "lib"
    runtime_dir.mkdir()
    (runtime_dir / "libonnxruntime.so.1").symlink_to(runtime)
    (runtime_dir / "libonnxruntime.so").symlink_to(runtime)
    binary = tmp_path / "serve_onnx"
    subprocess.run([shutil.which("g++") or "c++", "-std=c++17", "-O1", str(ROOT / "examples/cpp/serve_onnx.cpp"), f"-I{headers}",
                    f"-L{runtime_dir}", "-lonnxruntime", f"-Wl,-rpath,{runtime_dir}", "-o", str(binary)], check=True, timeout=300)
    model = get_lily_model(tiny_bert(), LilyConfig(r=4, num_B=3, target_modules=["query", "value"], routing="token", init_weights=False)).eval()
    with torch.no_grad():
        for _, layer in model.lily_layers():
            layer.lily_B["default"].weight.normal_(std=0.2)
    example = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    export_onnx(model, (), tmp_path / "m.onnx", form="custom", kwargs=example,
                dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    tokens = [11, 42, 7, 3, 88]
    result = subprocess.run([str(binary), str(tmp_path / "m.onnx"), lily_ext.ort_library_path(), *map(str, tokens)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    got = np.array([float(v) for v in result.stdout.split()])
    expected = model(input_ids=torch.tensor([tokens])).logits.detach().numpy().ravel()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_libtorch_program_runs_a_traced_model(tmp_path):
    """examples/cpp/load_torchscript.cpp: dlopen lily_ext's _C library (no Python), torch::jit::load."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_export import lily_net

    torch_dir = Path(torch.__file__).parent
    binary = tmp_path / "load_torchscript"
    subprocess.run([shutil.which("g++") or "c++", "-std=c++20", "-O1", str(ROOT / "examples/cpp/load_torchscript.cpp"),
                    f"-I{torch_dir}/include", f"-I{torch_dir}/include/torch/csrc/api/include", f"-L{torch_dir}/lib",
                    "-ltorch", "-ltorch_cpu", "-lc10", "-ldl", f"-Wl,-rpath,{torch_dir}/lib", "-o", str(binary)], check=True, timeout=600)
    traced = torch.jit.trace(lily_net("token").model, (torch.randn(2, 5, 16),))
    traced.save(str(tmp_path / "traced.pt"))
    from lily_ext._library import library_path

    result = subprocess.run([str(binary), str(tmp_path / "traced.pt"), library_path()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "output [2, 5, 5]" in result.stdout, result.stderr
