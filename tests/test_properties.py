"""Property-based tests of lily::routed_mix (hypothesis): forward and backward against the float64
reference over drawn shapes, modes, dtypes, masks, strides and scalings, and bit-identical results
across runs and thread counts. On failure hypothesis prints the minimal failing example."""

import torch
from helpers.reference import routed_mix_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lily_ext  # noqa: F401
from lily_ext.ops import routed_mix

TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 3e-2}
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    mode = draw(st.sampled_from(["batch", "sequence", "token", "static", "causal"]))
    E = draw(st.sampled_from([2, 3, 5, 16]))
    r = draw(st.integers(1, 12))
    out = draw(st.integers(1, 40))
    if mode in ("sequence", "causal") and draw(st.booleans()):
        lead = (draw(st.integers(0, 4)), draw(st.integers(0, 70)))
    else:
        lead = (draw(st.integers(0, 90)),)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    scaling = draw(st.floats(-3, 3, allow_nan=False))
    seed = draw(st.integers(0, 2**31 - 1))
    transpose = draw(st.booleans()) and len(lead) == 1
    masked = mode in ("sequence", "causal") and draw(st.booleans())
    return mode, E, r, out, lead, dtype, scaling, seed, transpose, masked


def build(problem):
    mode, E, r, out, lead, dtype, scaling, seed, transpose, masked = problem
    g = torch.Generator().manual_seed(seed)
    hidden = (
        torch.randn(r, *lead, generator=g, dtype=torch.float64).movedim(0, -1)
        if transpose
        else torch.randn(*lead, r, generator=g, dtype=torch.float64)
    )
    router = (
        torch.randn(E, generator=g, dtype=torch.float64)
        if mode == "static"
        else torch.randn(E, r, generator=g, dtype=torch.float64)
    )
    bank = torch.randn(E, r, out, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(lead, generator=g) < 0.6
        if mask.dim() == 2 and mask.shape[0] > 0:
            mask[0] = False  # always one fully masked sample
    return [t.to(dtype) for t in (hidden, router, bank)], dict(scaling=scaling, mode=mode, mask=mask)


def rel_err(actual, expected):
    if expected.numel() == 0:
        return 0.0
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@SETTINGS
@given(problems())
def test_forward_and_backward_match_the_reference(problem):
    tensors, kwargs = build(problem)
    dtype = tensors[0].dtype
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = routed_mix(*leaves, **kwargs)
    ref_leaves = [t.detach().double().requires_grad_() for t in tensors]
    ref = routed_mix_reference(*ref_leaves, **kwargs)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[dtype]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out.double() * grad).sum().backward()
    (ref * grad).sum().backward()
    for mine, theirs in zip(leaves, ref_leaves):
        expected = theirs.grad if theirs.grad is not None else torch.zeros_like(theirs)
        assert rel_err(mine.grad, expected) <= 4 * TOL[dtype]


@SETTINGS
@given(problems())
def test_bit_identical_across_runs_and_thread_counts(problem):
    tensors, kwargs = build(problem)
    grad = torch.randn(*tensors[0].shape[:-1], tensors[2].shape[-1], generator=torch.Generator().manual_seed(3)).to(
        tensors[0].dtype
    )
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            forward = routed_mix(*tensors, **kwargs)
            backward = torch.ops.lily.routed_mix_backward.default(
                grad, *tensors, float(kwargs["scaling"]), kwargs["mode"], kwargs["mask"]
            )
            results.append((forward, *backward))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
