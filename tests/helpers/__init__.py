"""Shared test helpers (importable as ``helpers``: pyproject.toml puts tests/ on sys.path).

    reference      the independent float64 reference of routed_mix
    models         tiny transformers models built offline from configs, token batches
    shapes         shapes, tolerances, inputs and the error measure of the op tests
    lily_models    Lily-wrapped models and inputs shared by the export / serving tests
    ort_models     hand-built one-node lily.RoutedMix ONNX models and their expected results

Test files import from here, never from each other.
"""

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
ROOT = TESTS_DIR.parent


def cxx_compiler():
    """The host C++ compiler (CXX, else c++ or g++ on PATH), or None."""
    import os
    import shutil

    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
