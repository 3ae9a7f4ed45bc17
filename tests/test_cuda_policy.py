"""Source-level guards of the CUDA layer's policies (no GPU, no compiler; runs in a second).

What they keep from coming back:
- a kernel launch outside LILY_LAUNCH (csrc/cuda/common.cuh), whose failure could then be reported
  with an error left pending by earlier, unrelated CUDA work, or not at all;
- a reduced-precision cuBLAS compute type or math mode (TF32, FAST_16F / 16BF) in the CUDA layer or
  its bindings: float32 results must not depend on torch's allow_tf32 switch nor on the path;
- the torch binding fetching torch's cuBLAS handle on calls that make no cuBLAS call.

The behaviour itself (every GEMM's math mode, the handle restored, the error attribution, the knobs
read once, the compute capability cached) is checked on the CPU emulation of the kernels
(tests/cuda_emulation/harness.cpp, run_policy_cases and every case) and, on a GPU, by
tests/test_ops_cuda.py (test_float32_ignores_tf32_switch and friends).
"""

import re

from helpers import TESTS_DIR

ROOT = TESTS_DIR.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
BINDINGS = [
    ROOT / "csrc" / "torch" / "cuda" / "routed_mix_cuda.cpp",
    ROOT / "export" / "ort" / "cuda" / "routed_mix_cuda.cpp",
]

LAUNCH = re.compile(r"\b([A-Za-z_]\w*)(?:<[^<>;()]*>)?\s*<<<")
CHECKED = re.compile(r'LILY_LAUNCH\("(\w+)",\s*$')


def strip_comments(text):
    return re.sub(r"//[^\n]*", "", text)


def test_every_kernel_launch_goes_through_lily_launch():
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources
    launches = 0
    for path in sources:
        text = strip_comments(path.read_text())
        for match in LAUNCH.finditer(text):
            launches += 1
            before = text[: match.start()]
            opener = CHECKED.search(before)
            assert opener is not None, f"{path.name}: launch of {match.group(1)} is not inside LILY_LAUNCH(...)"
            assert opener.group(1) == match.group(1), (
                f"{path.name}: LILY_LAUNCH names {opener.group(1)} but launches {match.group(1)}"
            )
    assert launches >= 20
    assert "LILY_LAUNCH_CHECK" not in "".join(strip_comments(p.read_text()) for p in sources)


def test_lily_launch_checks_before_and_after():
    text = (CUDA_DIR / "common.cuh").read_text()
    body = text[text.index("#define LILY_LAUNCH(") :]
    body = body[: body.index("while (0)")]
    pending, launch, status = (
        body.index("error_pending_before_launch"),
        body.index("__VA_ARGS__"),
        body.index("launch_status"),
    )
    assert pending < launch < status
    helpers = text[text.index("inline std::string error_pending_before_launch") :]
    assert "cudaPeekAtLastError()" in helpers.split("inline std::string launch_status")[0]


def test_no_reduced_precision_cublas_modes():
    files = sorted(CUDA_DIR.glob("*")) + BINDINGS
    forbidden = re.compile(r"CUBLAS_COMPUTE_32F_FAST_\w+|CUBLAS_TF32_TENSOR_OP_MATH|CUBLAS_TENSOR_OP_MATH|_PEDANTIC")
    for path in files:
        code = strip_comments(path.read_text())
        assert not forbidden.search(code), f"{path.relative_to(ROOT)}: {forbidden.search(code).group(0)}"
    header = strip_comments((CUDA_DIR / "routed_mix_cuda.h").read_text())
    assert re.search(
        r"kBlasMathMode\s*=\s*static_cast<cublasMath_t>\(\s*CUBLAS_DEFAULT_MATH\s*\|\s*"
        r"CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION\s*\)",
        header,
    )
    driver = strip_comments((CUDA_DIR / "routed_mix_cuda.cu").read_text())
    # every GEMM passes compute_type<A>() (32F / 64F) and runs after a BlasScope is entered
    assert driver.count("cublasGemmEx(") == driver.count("cublasGemmStridedBatchedEx(") == 1
    assert driver.count("compute_type<A>()") == 2
    assert "cublasSetMathMode(handle, kBlasMathMode)" in driver
    assert "cublasSetMathMode(handle_, old_math_)" in driver
    ort = strip_comments(BINDINGS[1].read_text())
    assert "cublasSetMathMode(handle, lily::cuda::kBlasMathMode)" in ort


def test_torch_binding_fetches_the_cublas_handle_only_when_used():
    code = strip_comments(BINDINGS[0].read_text())
    assert code.count("getCurrentCUDABlasHandle(") == 1
    assert re.search(r"plan\.uses_blas\s*\?\s*at::cuda::getCurrentCUDABlasHandle\(\)\s*:\s*nullptr", code)
    # no 0-byte scratch tensor
    assert re.search(r"if \(bytes == 0\) return at::Tensor\(\);", code)
