"""The CUDA kernels run on the CPU emulation of tests/cuda_emulation (no GPU needed).

Runs by default, so CI checks the CUDA kernels' results without a GPU (about 3 minutes on 2
cores); LILY_TEST_CUDA_EMULATION=0 skips it for a quick local run.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(
    os.environ.get("LILY_TEST_CUDA_EMULATION") == "0",
    reason="LILY_TEST_CUDA_EMULATION=0: the CPU emulation of the CUDA kernels was skipped on request",
)


def test_kernels_on_cpu_emulation_match_cpu_implementation():
    script = os.path.join(HERE, "cuda_emulation", "run_emulation.py")
    proc = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True)
    if proc.returncode != 0 and "not found" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
