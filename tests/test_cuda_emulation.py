"""The CUDA kernels run on the CPU emulation of tests/cuda_emulation (no GPU needed).

Runs by default, so CI checks the CUDA kernels' results without a GPU: every case in every dtype
(about 45 s on 2 cores, most of it compiling); marked emulation and slow: `python -m pytest -m "not
emulation"` leaves it out of a quick local run.
"""

import subprocess
import sys

import pytest
from helpers import TESTS_DIR

pytestmark = [pytest.mark.emulation, pytest.mark.slow, pytest.mark.cpp]


def test_kernels_on_cpu_emulation_match_cpu_implementation():
    script = TESTS_DIR / "cuda_emulation" / "run_emulation.py"
    # a kernel that never returns would hang the run (a barrier others never reach stops it with a message)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 and "not found" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
