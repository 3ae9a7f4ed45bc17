"""The portable blocked GEMM of the ORT library (csrc/lily/cpu_gemm.h), checked by a C++ program
(tests/cpp/gemm_check.cpp) built with the host compiler, once per micro-kernel this host can run."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")

# (defines, expected kernel on an AVX-512 host): the dispatched kernel, AVX2 forced, generic only.
VARIANTS = {"dispatched": [], "no-avx512": ["-DLILY_GEMM_NO_AVX512"], "generic": ["-DLILY_NO_MULTIVERSION"]}


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
@pytest.mark.parametrize("variant", VARIANTS)
def test_blocked_gemm_matches_float64(variant, tmp_path):
    exe = tmp_path / "gemm_check"
    cmd = [CXX, "-O2", "-std=c++17", *VARIANTS[variant], f"-I{ROOT}/csrc",
           f"{ROOT}/tests/cpp/gemm_check.cpp", f"{ROOT}/csrc/lily/cpu_gemm.cpp", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
