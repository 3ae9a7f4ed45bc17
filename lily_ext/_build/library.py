"""Loads the compiled op library (lily_ext._C) into torch.ops.lily."""

import importlib.util
import os

import torch

_path = None


def library_path() -> str:
    """Path of the shared library that registers the ``lily`` ops (for ``torch.ops.load_library`` / libtorch)."""
    spec = importlib.util.find_spec("lily_ext._C")
    if spec is None or spec.origin is None or not os.path.exists(spec.origin):
        raise ImportError(
            "lily_ext._C is not built: install the package with "
            "`pip install --no-build-isolation -e .` (see README.md)"
        )
    return spec.origin


def load() -> str:
    global _path
    if _path is None:
        path = library_path()
        torch.ops.load_library(path)
        _path = path
    return _path
