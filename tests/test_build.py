"""What the installation was built with: the CUDA sources compile wherever a toolkit is found, and
the ONNX Runtime library is part of the build (set LILY_EXT_CUDA=0 / LILY_EXT_ORT=0 to opt out)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lily_ext


def test_build_info_fields():
    info = lily_ext.build_info()
    for key in ("torch", "cuda_kernels", "cuda_archs", "cxx_compiler", "nvcc", "onnxruntime_library"):
        assert key in info
    assert info["torch"] == torch.__version__
    out = subprocess.run([sys.executable, "-m", "lily_ext"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["torch"] == torch.__version__


def test_cuda_kernels_compiled_when_a_toolkit_is_present():
    if (
        os.environ.get("LILY_EXT_CUDA") == "0"
        or torch.version.cuda is None
        or not (shutil.which("nvcc") or os.environ.get("CUDA_HOME"))
    ):
        pytest.skip("no CUDA toolkit or a CPU build of torch (or LILY_EXT_CUDA=0): CUDA sources are not compiled")
    info = lily_ext.build_info()
    assert info["cuda_kernels"], (
        "a CUDA toolkit and a CUDA build of torch are present, but no CUDA kernels were compiled"
    )
    assert info["cuda_archs"] and info["nvcc"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lily::routed_mix_backward", "CUDA")


def test_onnxruntime_library_built():
    info = lily_ext.build_info()
    if (info["onnxruntime_library_reason"] or "").startswith("disabled by LILY_EXT_ORT=0"):  # the build's record
        pytest.skip("LILY_EXT_ORT=0: built without the ONNX Runtime library on request")
    assert info["onnxruntime_library"], (
        f"the ONNX Runtime library was not built: {info.get('onnxruntime_library_reason')}"
    )
    assert os.path.isfile(lily_ext.ort_library_path())
