"""The CUDA kernels run on the CPU emulation of tests/cuda_emulation (no GPU needed).

Runs by default, so CI checks the CUDA kernels' results without a GPU (about 3 minutes on 2
cores); marked emulation and slow: `python -m pytest -m "not emulation"` leaves it out of a quick
local run.
"""

import subprocess
import sys

import pytest
from helpers import TESTS_DIR

pytestmark = [pytest.mark.emulation, pytest.mark.slow, pytest.mark.cpp]


def test_kernels_on_cpu_emulation_match_cpu_implementation():
    script = TESTS_DIR / "cuda_emulation" / "run_emulation.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True)
    if proc.returncode != 0 and "not found" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
