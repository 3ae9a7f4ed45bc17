"""The portable blocked GEMM of the ORT library (csrc/lily/cpu_gemm.h), checked by a C++ program
(tests/cpp/gemm_check.cpp) built with the host compiler, once per micro-kernel this host can run."""

import subprocess

import pytest
from helpers import ROOT, cxx_compiler

pytestmark = pytest.mark.cpp  # (skipped without a C++ compiler, tests/conftest.py)

# (defines, expected kernel on an AVX-512 host): the dispatched kernel, AVX2 forced, generic only.
VARIANTS = {"dispatched": [], "no-avx512": ["-DLILY_GEMM_NO_AVX512"], "generic": ["-DLILY_NO_MULTIVERSION"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocked_gemm_matches_float64(variant, tmp_path):
    exe = tmp_path / "gemm_check"
    cmd = [
        cxx_compiler(),
        "-O2",
        "-std=c++17",
        *VARIANTS[variant],
        f"-I{ROOT}/csrc",
        f"{ROOT}/tests/cpp/gemm_check.cpp",
        f"{ROOT}/csrc/lily/cpu_gemm.cpp",
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
