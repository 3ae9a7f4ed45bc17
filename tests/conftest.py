"""Markers (registered in pyproject.toml) and the skips they imply.

    gpu        needs a CUDA device: skipped when torch.cuda.is_available() is False
    ort        needs onnxruntime and lily_ext's liblily_ort.so: skipped, with the build's recorded
               reason, when the library was not built (lily_ext.ort.library_status()); a build with
               LILY_EXT_ORT=1 (library required) makes a missing library a failure instead
    cpp        compiles C++ (the host compiler, CMake): skipped when there is no C++ compiler
    emulation  the CPU emulation of the CUDA kernels (tests/cuda_emulation)
    slow       the slowest tests (minutes on CI's 2 cores)

Nothing is deselected by default: `python -m pytest` runs what CI runs. Quicker local runs pick by
marker, e.g. `python -m pytest -m "not slow"` or `-m "not emulation"`.
"""

import functools
import importlib.util
import os

import pytest
import torch
from helpers import cxx_compiler

# test_distributed.py stays as it is (its own module): its marker is given here
SLOW_MODULES = {"test_distributed.py"}


@functools.cache
def why_no_gpu():
    return None if torch.cuda.is_available() else "needs a CUDA device: torch.cuda.is_available() is False"


@functools.cache
def why_no_ort():
    if importlib.util.find_spec("onnxruntime") is None:
        return "needs the onnxruntime package (pip install onnxruntime or onnxruntime-gpu)"
    from lily_ext.ort import library_status

    library, why_missing = library_status()
    if library is None and os.environ.get("LILY_EXT_ORT") != "1":
        return f"liblily_ort.so was not built: {why_missing}"
    return None


@functools.cache
def why_no_cpp():
    return None if cxx_compiler() else "needs a C++ compiler: CXX unset and no c++ / g++ on PATH"


SKIP_REASONS = {"ort": why_no_ort, "gpu": why_no_gpu, "cpp": why_no_cpp}  # checked in this order


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        for marker, why_not in SKIP_REASONS.items():
            if item.get_closest_marker(marker) is not None and (reason := why_not()):
                item.add_marker(pytest.mark.skip(reason=reason))
                break
