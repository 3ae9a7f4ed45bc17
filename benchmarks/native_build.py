"""Builds a benchmarks/cpp program with one csrc/lily source by the host compiler (bench_gemm.py,
bench_small_gemm.py)."""

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_program(tmp, program, library, flags):
    """benchmarks/cpp/<program>.cpp + csrc/lily/<library>.cpp with `flags`, into tmp; returns the executable."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise SystemExit("no C++ compiler found (set CXX)")
    exe = os.path.join(tmp, program)
    sources = [f"{ROOT}/benchmarks/cpp/{program}.cpp", f"{ROOT}/csrc/lily/{library}.cpp"]
    subprocess.run([compiler, *flags, "-std=c++17", f"-I{ROOT}/csrc", *sources, "-o", exe], check=True)
    return exe
