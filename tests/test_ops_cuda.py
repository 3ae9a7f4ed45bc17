"""lily::routed_mix on CUDA against the float64 reference (tests/helpers/reference.py) and the
CPU kernels.

Marked gpu: skipped, with the reason, where torch.cuda.is_available() is False. The shapes
(helpers.shapes.CUDA_SHAPES) cover both sides of every CUDA path: the fused small-N forward
(N <= 64) and the routing-kernel + cuBLAS / tiled (W kron h) paths above it, the per-row backward
(<= 4 rows per group) and the grouped one, vector and scalar tile loads (r, out multiples of 8 or
not), partial tiles, N = 0 / 1, r = 1, out = 1.
"""

import contextlib
import os

import pytest
import torch
from helpers import shapes
from helpers.reference import routed_mix_reference
from helpers.shapes import CUDA_SHAPES as SHAPES
from helpers.shapes import CUDA_TOL as TOL
from helpers.shapes import rel_err, shape_id

import lily_ext
from lily_ext.ops import MODES, reload_cuda_knobs, routed_mix

pytestmark = pytest.mark.gpu

DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# modes that take a mask (samples [..., L, r])
MASKED_MODES = ("sequence", "causal")


def make_inputs(lead, E, r, out, mode, dtype=torch.float32, seed=0, device=DEV):
    return shapes.make_inputs(lead, E, r, out, mode, dtype, seed, device)


def random_mask(lead, seed=0, fully_masked_sample=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*lead, generator=g) < 0.7
    if len(lead) >= 2 and lead[0] > fully_masked_sample:
        mask[fully_masked_sample] = False
    return mask


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    reload_cuda_knobs()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_cuda_knobs()


@contextlib.contextmanager
def matmul_flags(tf32, reduced_precision_reduction=True):
    """torch's cuBLAS precision switches for the block, put back afterwards."""
    matmul = torch.backends.cuda.matmul
    names = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    old = [getattr(matmul, n) for n in names]
    for n, v in zip(names, (tf32, reduced_precision_reduction, reduced_precision_reduction)):
        setattr(matmul, n, v)
    try:
        yield
    finally:
        for n, v in zip(names, old):
            setattr(matmul, n, v)


def forward_and_grads(hidden, router, bank, mode, scaling=0.7, mask=None, grad=None):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, router, bank)]
    out = routed_mix(*leaves, scaling=scaling, mode=mode, mask=mask)
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad.to(device=out.device, dtype=out.dtype))
    return out, [t.grad for t in leaves], grad


def reference_and_grads(hidden, router, bank, mode, grad, scaling=0.7, mask=None):
    leaves = [t.detach().cpu().double().requires_grad_() for t in (hidden, router, bank)]
    m = None if mask is None else mask.cpu()
    ref = routed_mix_reference(*leaves, scaling=scaling, mode=mode, mask=m)
    (ref * grad.cpu().double().reshape(ref.shape)).sum().backward()
    return ref, [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def check_against_reference(hidden, router, bank, mode, mask=None, tol=None):
    tol = tol or TOL[hidden.dtype]
    out, grads, grad = forward_and_grads(hidden, router, bank, mode, mask=mask)
    # the reference sees the same rounded inputs and upstream gradient
    ref, ref_grads = reference_and_grads(hidden, router, bank, mode, grad.to(hidden.dtype), mask=mask)
    assert out.shape == ref.shape and out.dtype == hidden.dtype and out.device.type == "cuda"
    assert rel_err(out, ref) <= tol, f"forward error {rel_err(out, ref):.2e}"
    for name, mine, theirs in zip(("hidden", "router", "bank"), grads, ref_grads):
        assert mine is not None and mine.dtype == hidden.dtype and mine.device.type == "cuda", name
        assert rel_err(mine, theirs) <= 4 * tol, f"d{name} error {rel_err(mine, theirs):.2e}"
    return out


def test_cuda_kernels_are_built():
    info = lily_ext.build_info()
    assert info["cuda_kernels"], f"lily_ext was built without CUDA kernels: {info}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(mode, shape, dtype):
    lead, E, r, out = shape
    hidden, router, bank = make_inputs(lead, E, r, out, mode, dtype)
    check_against_reference(hidden, router, bank, mode)


@pytest.mark.parametrize("lead", [(4, 6), (5, 40), (3, 2, 30), (80,)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_mask(lead, dtype):
    # fully masked sample (the second one), partially masked others; small and large paths
    hidden, router, bank = make_inputs(lead, 3, 8, 12, "sequence", dtype)
    mask = random_mask(lead).to(DEV)
    out = check_against_reference(hidden, router, bank, "sequence", mask=mask)
    if len(lead) >= 2:
        assert torch.equal(out[1], torch.zeros_like(out[1])), "a fully masked sample must get a zero delta"
    for other in (mask.long(), mask.float(), mask.to(torch.uint8)):
        torch.testing.assert_close(
            routed_mix(hidden, router, bank, scaling=0.7, mode="sequence", mask=other), out, rtol=0, atol=0
        )


@pytest.mark.parametrize("lead", [(4, 6), (3, 100)], ids=lambda s: "x".join(map(str, s)))
def test_masked_tokens_do_not_route(lead):
    hidden, router, bank = make_inputs(lead, 3, 8, 12, "sequence", torch.float64)
    mask = torch.ones(lead, dtype=torch.bool, device=DEV)
    mask[0, -2:] = False
    out = routed_mix(hidden, router, bank, mode="sequence", mask=mask)
    poked = hidden.clone()
    poked[0, -1] += 100.0
    moved = routed_mix(poked, router, bank, mode="sequence", mask=mask)
    keep = torch.ones(lead, dtype=torch.bool, device=DEV)
    keep[0, -1] = False
    torch.testing.assert_close(moved[keep], out[keep], rtol=0, atol=1e-12)


def test_fully_masked_batch_has_finite_grads():
    for lead in ((2, 3), (2, 100)):
        hidden, router, bank = make_inputs(lead, 2, 4, 5, "sequence", torch.float32)
        leaves = [t.requires_grad_() for t in (hidden, router, bank)]
        out = routed_mix(*leaves, mode="sequence", mask=torch.zeros(lead, dtype=torch.bool, device=DEV))
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        for t in leaves:
            assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(5, 7), (4, 300), (2, 2), (700,)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_and_cuda_agree(mode, lead, dtype):
    hidden, router, bank = make_inputs(lead, 3, 24, 40, mode, dtype, device="cpu")
    mask = random_mask(lead) if mode in MASKED_MODES else None
    cpu_out, cpu_grads, grad = forward_and_grads(hidden, router, bank, mode, mask=mask)
    gpu_out, gpu_grads, _ = forward_and_grads(
        hidden.to(DEV), router.to(DEV), bank.to(DEV), mode, mask=None if mask is None else mask.to(DEV), grad=grad
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(gpu_out, cpu_out) <= tol
    for mine, theirs in zip(gpu_grads, cpu_grads):
        assert rel_err(mine, theirs) <= 4 * tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reproducible_run_to_run(mode, dtype):
    for lead in ((3, 9), (6, 900)):
        hidden, router, bank = make_inputs(lead, 4, 32, 96, mode, dtype)
        mask = random_mask(lead).to(DEV) if mode in MASKED_MODES else None
        first = forward_and_grads(hidden, router, bank, mode, mask=mask)
        second = forward_and_grads(hidden, router, bank, mode, mask=mask, grad=first[2])
        assert torch.equal(first[0], second[0])
        for a, b in zip(first[1], second[1]):
            assert torch.equal(a, b)


def _poison_caching_allocator():
    """Fill free blocks of the caching allocator with 0xFF bytes (NaN in every float dtype)."""
    blocks = []
    for k in range(9, 27):
        for n in (1 << k, 3 << (k - 1)):
            blocks.append(torch.full((n,), 255, dtype=torch.uint8, device=DEV))
    torch.cuda.synchronize()
    del blocks  # back to the cache, not to the driver: the next allocations reuse this memory


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape", [((7,), 4, 16, 24), ((5, 9), 3, 8, 33), ((3, 70), 2, 9, 300), ((300,), 4, 16, 136)], ids=shape_id
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_never_hold_uninitialised_memory(mode, shape, dtype):
    lead, E, r, out = shape
    hidden, router, bank = make_inputs(lead, E, r, out, mode, dtype)
    mask = random_mask(lead).to(DEV) if mode in MASKED_MODES and len(lead) >= 2 else None
    grad = torch.randn(*lead, out, device=DEV, dtype=dtype)
    _poison_caching_allocator()
    delta = torch.ops.lily.routed_mix.default(hidden, router, bank, 0.5, mode, mask)
    _poison_caching_allocator()
    grads = torch.ops.lily.routed_mix_backward.default(grad, hidden, router, bank, 0.5, mode, mask)
    assert torch.isfinite(delta).all()
    for g in grads:
        assert torch.isfinite(g).all()


def test_empty_rows():
    for mode in MODES:
        hidden, router, bank = make_inputs((0,), 3, 4, 5, mode)
        delta = routed_mix(hidden, router, bank, mode=mode)
        assert delta.shape == (0, 5) and delta.device.type == "cuda"
        _poison_caching_allocator()
        dh, dR, dB = torch.ops.lily.routed_mix_backward.default(
            torch.empty(0, 5, device=DEV), hidden, router, bank, 1.0, mode, None
        )
        assert dh.shape == (0, 4) and torch.equal(dR, torch.zeros_like(dR)) and torch.equal(dB, torch.zeros_like(dB))


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode):
    E, r, out, N = 3, 6, 10, 90
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(r, N, generator=g, dtype=torch.float64).T.to(DEV)
    bank = torch.randn(E, r, 2 * out, generator=g, dtype=torch.float64).to(DEV)[..., ::2]
    router = (
        torch.randn(E, generator=g, dtype=torch.float64).to(DEV)
        if mode == "static"
        else torch.randn(r, E, generator=g, dtype=torch.float64).to(DEV).T
    )
    assert not hidden.is_contiguous() and not bank.is_contiguous()
    check_against_reference(hidden, router, bank, mode)


@pytest.mark.parametrize("mode", ["token", "sequence", "causal"])
def test_kron_forward_paths_agree(mode):
    # the tiled kernel (default) and (W kron h) chunks + cuBLAS, and tiny scratch budgets
    lead = (300,)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        hidden, router, bank = make_inputs(lead, 3, 16, 72, mode, dtype)
        mask = random_mask(lead).to(DEV) if mode in MASKED_MODES else None
        base = forward_and_grads(hidden, router, bank, mode, mask=mask)
        for knobs in (
            {"LILY_CUDA_KRON": "gemm"},
            {"LILY_CUDA_KRON": "gemm", "LILY_CUDA_SCRATCH_BYTES": 5000},
            {"LILY_CUDA_SCRATCH_BYTES": 3000},
        ):
            with env(**knobs):
                other = forward_and_grads(hidden, router, bank, mode, mask=mask, grad=base[2])
            tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
            assert rel_err(other[0], base[0]) <= tol, knobs
            for a, b in zip(other[1], base[1]):
                assert rel_err(a, b) <= 4 * tol, knobs


def cuda_kernels_run(fn):
    """Names of the CUDA kernels `fn` runs (torch profiler); None where the profiler sees none."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return names or None


def test_knobs_are_read_once_per_process():
    # token N = 300: the tiled kernel unless LILY_CUDA_KRON=gemm ((W kron h) rows + cuBLAS); a plain
    # environment change is seen only after reload_cuda_knobs()
    hidden, router, bank = make_inputs((300,), 3, 16, 72, "token", torch.float64)

    def run():
        return routed_mix(hidden, router, bank, mode="token")

    def path():
        names = cuda_kernels_run(run)
        if names is None:
            pytest.skip("the torch profiler records no CUDA kernels here")
        tiled, rows = any("kron_gemm" in n for n in names), any("kron_rows_kernel" in n for n in names)
        assert tiled != rows, names
        return "tiled" if tiled else "gemm"

    tiled = run()
    assert path() == "tiled"
    os.environ["LILY_CUDA_KRON"] = "gemm"
    try:
        assert path() == "tiled"  # not re-read
        reload_cuda_knobs()
        assert path() == "gemm"
        gemm = run()
    finally:
        os.environ.pop("LILY_CUDA_KRON", None)
        reload_cuda_knobs()
    assert path() == "tiled"
    assert rel_err(gemm, tiled) <= 1e-12


# float32 shapes over every cuBLAS call site and the hand-written paths beside them: (lead, E, r, out,
# mode, knobs). Forward: small-N fused (no cuBLAS), grouped one GEMM (batch N > 64), grouped batched
# (sequence L > 64), per-row (W kron h) + cuBLAS (LILY_CUDA_KRON=gemm), tiled per-row (SIMT).
# Backward: grouped (L > 4, batched GEMMs) and per-row (token, sequence L = 1) cuBLAS GEMMs.
TF32_CASES = [
    ((7,), 4, 16, 24, "batch", {}),
    ((300,), 4, 32, 96, "batch", {}),
    ((3, 100), 3, 32, 96, "sequence", {}),
    ((300,), 3, 32, 96, "token", {"LILY_CUDA_KRON": "gemm"}),
    ((300,), 3, 32, 96, "token", {}),
    ((300,), 3, 32, 96, "static", {}),
    ((3, 100), 3, 32, 96, "causal", {}),
    ((3, 100), 3, 32, 96, "causal", {"LILY_CUDA_KRON": "gemm"}),
]


@pytest.mark.parametrize("case", TF32_CASES, ids=lambda c: f"{c[4]}-{'x'.join(map(str, c[0]))}-{len(c[5])}")
def test_float32_ignores_tf32_switch(case):
    # precision policy (csrc/cuda/routed_mix_cuda.h): float32 runs in full float32 on every path,
    # whatever torch.backends.cuda.matmul.allow_tf32 says: bitwise the same results either way, and
    # the CPU kernels' to 1e-5
    lead, E, r, out, mode, knobs = case
    hidden, router, bank = make_inputs(lead, E, r, out, mode, torch.float32)
    mask = random_mask(lead).to(DEV) if mode in MASKED_MODES else None
    a = torch.randn(512, 512, device=DEV)
    b = torch.randn(512, 512, device=DEV)
    with env(**knobs):
        with matmul_flags(tf32=False):
            full = a @ b
            base = forward_and_grads(hidden, router, bank, mode, mask=mask)
        with matmul_flags(tf32=True):
            tf32_before = a @ b
            other = forward_and_grads(hidden, router, bank, mode, mask=mask, grad=base[2])
            tf32_after = a @ b
    if torch.cuda.get_device_capability() >= (8, 0):
        # the switch is live on this device (else the comparison below would prove nothing) and the
        # op left torch's TF32 matmuls as they were
        assert not torch.equal(tf32_before, full)
    assert torch.equal(tf32_after, tf32_before)
    assert torch.equal(other[0], base[0])
    for mine, theirs in zip(other[1], base[1]):
        assert torch.equal(mine, theirs)
    cpu = forward_and_grads(
        hidden.cpu(), router.cpu(), bank.cpu(), mode, mask=None if mask is None else mask.cpu(), grad=base[2]
    )
    assert rel_err(other[0], cpu[0]) <= 1e-5
    for mine, theirs in zip(other[1], cpu[1]):
        assert rel_err(mine, theirs) <= 4e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TF32_CASES[1:4], ids=lambda c: f"{c[4]}-{'x'.join(map(str, c[0]))}-{len(c[5])}")
def test_half_types_ignore_reduced_precision_reduction_switch(case, dtype):
    # float16 / bfloat16 GEMMs never use 16-bit split-K reductions, whatever torch allows; a torch GEMM
    # of the same dtype first leaves the handle in the math mode torch picked for it
    lead, E, r, out, mode, knobs = case
    hidden, router, bank = make_inputs(lead, E, r, out, mode, dtype)
    mask = random_mask(lead).to(DEV) if mode in MASKED_MODES else None
    a = torch.randn(256, 4096, device=DEV, dtype=dtype)
    results = []
    with env(**knobs):
        for allowed in (False, True):
            with matmul_flags(tf32=False, reduced_precision_reduction=allowed):
                a @ a.T
                results.append(
                    forward_and_grads(hidden, router, bank, mode, mask=mask, grad=results[0][2] if results else None)
                )
    assert torch.equal(results[0][0], results[1][0])
    for mine, theirs in zip(results[0][1], results[1][1]):
        assert torch.equal(mine, theirs)


def test_group_batches_in_small_scratch():
    # sequence samples in several batches of combined banks (forward and backward)
    hidden, router, bank = make_inputs((9, 20), 3, 8, 24, "sequence", torch.float64)
    mask = random_mask((9, 20)).to(DEV)
    base = forward_and_grads(hidden, router, bank, "sequence", mask=mask)
    with env(LILY_CUDA_SCRATCH_BYTES=6000):
        other = forward_and_grads(hidden, router, bank, "sequence", mask=mask, grad=base[2])
    assert rel_err(other[0], base[0]) <= 1e-12
    for a, b in zip(other[1], base[1]):
        assert rel_err(a, b) <= 1e-12


def test_runs_on_the_current_stream():
    hidden, router, bank = make_inputs((4, 200), 4, 32, 64, "batch")
    expected, expected_grads, grad = forward_and_grads(hidden, router, bank, "batch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, grads, _ = forward_and_grads(hidden, router, bank, "batch", grad=grad)
    side.synchronize()
    # same math; cuBLAS promises identical bits only within one stream
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    for lead in ((2, 5), (2, 70)):
        hidden, router, bank = make_inputs(lead, 3, 4, 6, mode, torch.float32)
        mask = random_mask(lead).to(DEV) if mode in MASKED_MODES else None
        args = (hidden.requires_grad_(), router.requires_grad_(), bank.requires_grad_(), 0.5, mode, mask)
        torch.library.opcheck(torch.ops.lily.routed_mix.default, args)
        grad = torch.randn(*lead, 6, device=DEV)
        torch.library.opcheck(
            torch.ops.lily.routed_mix_backward.default, (grad, *(t.detach() for t in args[:3]), 0.5, mode, mask)
        )


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    for lead in ((3, 4), (2, 40)):
        hidden, router, bank = make_inputs(lead, 3, 5, 6, mode, torch.float64)
        mask = random_mask(lead).to(DEV) if mode in MASKED_MODES else None
        leaves = tuple(t.requires_grad_() for t in (hidden, router, bank))
        assert torch.autograd.gradcheck(
            lambda h, R, B, mask=mask: routed_mix(h, R, B, scaling=0.8, mode=mode, mask=mask), leaves
        )


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    hidden, router, bank = make_inputs((2, 6), 3, 8, 10, mode)
    mask = (
        torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=DEV)
        if mode in MASKED_MODES
        else None
    )

    def layer(h, R, B):
        return torch.tanh(routed_mix(h * 2.0, R, B, scaling=0.5, mode=mode, mask=mask)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if mode == "batch" else "aot_eager")
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, router, bank)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss, *(t.grad for t in leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


def test_bad_input_on_cuda():
    hidden, router, bank = make_inputs((2, 6), 3, 4, 5, "batch")
    with pytest.raises(ValueError, match="bank: on device cpu"):
        routed_mix(hidden, router, bank.cpu())
    with pytest.raises(ValueError, match="mask: on device cpu"):
        routed_mix(hidden, router, bank, mode="sequence", mask=torch.ones(2, 6, dtype=torch.bool))
    big_hidden, big_router, big_bank = make_inputs((3,), 300, 2, 3, "batch")
    with pytest.raises(RuntimeError, match="E <= 256"):
        torch.ops.lily.routed_mix.default(big_hidden, big_router, big_bank, 1.0, "batch", None)


@pytest.mark.parametrize("mode", ["batch", "token"])
def test_training_size_bfloat16(mode):
    # one larger call per path family, checked against float64 math on the GPU
    N, r, E, out = 2048, 128, 4, 1024
    hidden, router, bank = make_inputs((N,), E, r, out, mode, torch.bfloat16)
    out_bf16, grads, grad = forward_and_grads(hidden, router, bank, mode)
    h, R, B = (t.detach().double().requires_grad_() for t in (hidden, router, bank))
    P = torch.softmax(h @ R.T, dim=-1)
    if mode == "batch":
        ref = 0.7 * (h @ torch.einsum("e,eio->io", P.mean(0), B))
    else:
        ref = 0.7 * ((P.unsqueeze(-1) * h.unsqueeze(-2)).reshape(N, E * r) @ B.reshape(E * r, out))
    ref.backward(grad.to(ref.device, torch.bfloat16).double())
    assert rel_err(out_bf16, ref) <= 3e-2
    for mine, theirs in zip(grads, (h.grad, R.grad, B.grad)):
        assert rel_err(mine, theirs) <= 1.2e-1


# ---- causal mode against the float64 reference (tests/helpers/reference.py) on the CPU ---------------


def causal_mask(lead, kind, seed=0):
    """None, "random" (a fully masked second sample, masked first tokens) or "left" (left padding:
    sample g starts with (3 g + 1) mod (L + 1) masked tokens, from none to all)."""
    if kind is None:
        return None
    if kind == "random":
        return random_mask(lead, seed)
    L = lead[-1] if len(lead) >= 2 else 1
    samples = torch.tensor(lead).prod().item() // L
    pad = (torch.arange(samples) * 3 + 1) % (L + 1)
    return (torch.arange(L)[None, :] >= pad[:, None]).reshape(lead)


def check_causal(hidden, router, bank, mask=None, tol=None):
    tol = tol or TOL[hidden.dtype]
    out, grads, grad = forward_and_grads(hidden, router, bank, "causal", mask=mask)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (hidden, router, bank)]
    ref = routed_mix_reference(*leaves, scaling=0.7, mode="causal", mask=None if mask is None else mask.cpu())
    (ref * grad.to(hidden.dtype).cpu().double().reshape(ref.shape)).sum().backward()
    assert out.shape == ref.shape and out.dtype == hidden.dtype and out.device.type == "cuda"
    assert rel_err(out, ref) <= tol, f"forward error {rel_err(out, ref):.2e}"
    for name, mine, theirs in zip(("hidden", "router", "bank"), grads, (t.grad for t in leaves)):
        assert rel_err(mine, theirs) <= 4 * tol, f"d{name} error {rel_err(mine, theirs):.2e}"
    if mask is not None:  # tokens before their sample's first unmasked token: an exact zero delta
        m = mask.reshape(-1, mask.shape[-1] if mask.dim() >= 2 else 1).cpu() != 0
        none_yet = (m.long().cumsum(-1) == 0).reshape(mask.shape).to(DEV)
        assert torch.equal(out[none_yet], torch.zeros_like(out[none_yet]))
    return out


CAUSAL_SHAPES = [
    ((7,), 4, 16, 24),  # 2-D: one token per sample, fused small-N forward
    ((1, 1), 2, 1, 1),
    ((6, 1), 2, 4, 8),  # L = 1
    ((5, 7), 3, 8, 33),  # small-N forward, per-row backward
    ((2, 3, 10), 2, 5, 9),
    ((3, 70), 2, 9, 300),  # routing kernels + scan, tiled (W kron h)
    ((2, 300), 4, 16, 136),  # several rows per scan thread, vector tile loads
    ((1, 333), 40, 8, 24),  # E > 32
    ((4, 1000), 4, 64, 264),
]


@pytest.mark.parametrize("mask_kind", [None, "random", "left"], ids=str)
@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_matches_reference(shape, mask_kind, dtype):
    lead, E, r, out = shape
    hidden, router, bank = make_inputs(lead, E, r, out, "causal", dtype)
    mask = causal_mask(lead, mask_kind)
    check_causal(hidden, router, bank, mask=None if mask is None else mask.to(DEV))


@pytest.mark.parametrize("lead", [(4, 6), (3, 100), (2, 400)], ids=lambda s: "x".join(map(str, s)))
def test_causal_later_tokens_do_not_reach_earlier_ones(lead):
    # poking token t of a sample leaves every earlier token of it, and every other sample, unchanged
    hidden, router, bank = make_inputs(lead, 3, 8, 12, "causal", torch.float64)
    mask = causal_mask(lead, "left").to(DEV)
    out = routed_mix(hidden, router, bank, mode="causal", mask=mask)
    t = lead[1] // 2
    poked = hidden.clone()
    poked[-1, t:] += 3.0
    moved = routed_mix(poked, router, bank, mode="causal", mask=mask)
    torch.testing.assert_close(moved[:-1], out[:-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(moved[-1, :t], out[-1, :t], rtol=0, atol=1e-12)
    assert not torch.allclose(moved[-1, t:], out[-1, t:])


def test_causal_batch_invariant():
    # a sample's result does not depend on the other samples of the call
    lead = (4, 150)
    hidden, router, bank = make_inputs(lead, 3, 16, 40, "causal", torch.float32)
    mask = causal_mask(lead, "left").to(DEV)
    together = routed_mix(hidden, router, bank, mode="causal", mask=mask)
    for b in range(lead[0]):
        alone = routed_mix(hidden[b : b + 1], router, bank, mode="causal", mask=mask[b : b + 1])
        torch.testing.assert_close(alone[0], together[b], rtol=1e-5, atol=1e-6)


def test_causal_fully_masked_has_zero_delta_and_finite_grads():
    for lead in ((2, 3), (2, 100)):
        hidden, router, bank = make_inputs(lead, 2, 4, 5, "causal", torch.float32)
        leaves = [t.requires_grad_() for t in (hidden, router, bank)]
        out = routed_mix(*leaves, mode="causal", mask=torch.zeros(lead, dtype=torch.bool, device=DEV))
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        for t in leaves:
            assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("mask_kind", [None, "random", "left"], ids=str)
@pytest.mark.parametrize("lead", [(5, 7), (4, 300), (2, 2), (700,)], ids=lambda s: "x".join(map(str, s)))
def test_causal_cpu_and_cuda_agree(lead, mask_kind):
    hidden, router, bank = make_inputs(lead, 3, 24, 40, "causal", torch.float64, device="cpu")
    mask = causal_mask(lead, mask_kind)
    cpu_out, cpu_grads, grad = forward_and_grads(hidden, router, bank, "causal", mask=mask)
    gpu_out, gpu_grads, _ = forward_and_grads(
        hidden.to(DEV), router.to(DEV), bank.to(DEV), "causal", mask=None if mask is None else mask.to(DEV), grad=grad
    )
    assert rel_err(gpu_out, cpu_out) <= 1e-12
    for mine, theirs in zip(gpu_grads, cpu_grads):
        assert rel_err(mine, theirs) <= 4e-12


def test_causal_gradcheck():
    for lead, kind in (((3, 4), "random"), ((2, 40), "left"), ((5,), None)):
        hidden, router, bank = make_inputs(lead, 3, 5, 6, "causal", torch.float64)
        mask = causal_mask(lead, kind)
        mask = None if mask is None else mask.to(DEV)
        leaves = tuple(t.requires_grad_() for t in (hidden, router, bank))
        assert torch.autograd.gradcheck(
            lambda h, R, B, mask=mask: routed_mix(h, R, B, scaling=0.8, mode="causal", mask=mask), leaves
        )
