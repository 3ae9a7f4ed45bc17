"""The portable blocked GEMM of the ORT library (csrc/lily/cpu_gemm.h), and the small-N products and
routing primitives of csrc/lily/cpu_primitives.h, checked by C++ programs (tests/cpp/gemm_check.cpp,
small_gemm_check.cpp, routing_check.cpp) built with the host compiler, once per micro-kernel this
host can run."""

import subprocess

import pytest
from helpers import ROOT, cxx_compiler

pytestmark = pytest.mark.cpp  # (skipped without a C++ compiler, tests/conftest.py)

# (defines, expected kernel on an AVX-512 host): the dispatched kernel, AVX2 forced, generic only.
VARIANTS = {"dispatched": [], "no-avx512": ["-DLILY_GEMM_NO_AVX512"], "generic": ["-DLILY_NO_MULTIVERSION"]}


def run_check(tmp_path, program, library, defines):
    """Builds tests/cpp/<program>.cpp with csrc/lily/<library>.cpp and runs it: it must print "ok"."""
    exe = tmp_path / program
    cmd = [
        cxx_compiler(),
        "-O3",  # as setup.py and CMake build it: the loops contracted to FMA decide the bits
        "-std=c++17",
        "-Wno-psabi",
        *defines,
        f"-I{ROOT}/csrc",
        f"{ROOT}/tests/cpp/{program}.cpp",
        f"{ROOT}/csrc/lily/{library}.cpp",
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocked_gemm_matches_float64(variant, tmp_path):
    run_check(tmp_path, "gemm_check", "cpu_gemm", VARIANTS[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_small_products_match_float64_and_each_other(variant, tmp_path):
    # gemm_stream against float64, and bit for bit against gemm_small (same order over k)
    run_check(tmp_path, "small_gemm_check", "cpu_primitives", VARIANTS[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_routing_primitives_match_float64(variant, tmp_path):
    # router softmax (a row alone has its bits in a block), bank gradient pass, kron backward
    run_check(tmp_path, "routing_check", "cpu_primitives", VARIANTS[variant])
