"""Shapes, tolerances, inputs and the error measure shared by the routed_mix tests (CPU, CUDA, ORT)."""

import torch

# max |error| / max |reference| of the CPU kernels; gradients get 4x
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

# (leading dims of hidden, E, r, out): edge sizes and both sides of every CPU kernel path
# (small-N fused path <= 64 rows, BLAS path, ragged column blocks, kron row chunks).
SHAPES = [
    ((7,), 4, 16, 24),
    ((1,), 2, 1, 1),  # N = 1, E = 2, r = 1, out = 1
    ((3, 5), 3, 8, 33),  # several leading dims
    ((0,), 4, 8, 16),  # empty N
    ((2, 3, 4), 2, 5, 9),
    ((130,), 5, 12, 70),  # past the small-N path, out not a multiple of the column block
    ((3, 70), 2, 9, 300),  # sequence samples with L > 64, several wide column blocks
    ((64,), 3, 4, 40),  # exactly the small-N limit
    ((2,), 3, 5, 37),  # <= 8 rows: B streamed row by row, ragged columns, K = E * r not a multiple of 4
    ((8,), 3, 87, 1010),  # token / causal: the bank streamed at 8 rows, several column pieces
]

# the same for the CUDA kernels
CUDA_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}

# (leading dims of hidden, E, r, out): both sides of every CUDA path
CUDA_SHAPES = [
    ((7,), 4, 16, 24),  # fused small-N forward
    ((1,), 2, 1, 1),  # N = 1, r = 1, out = 1
    ((3, 5), 3, 8, 33),  # sequence: 3 samples of 5 (per-row small forward)
    ((0,), 4, 8, 16),  # empty N
    ((2, 3, 4), 2, 5, 9),  # sequence L = 3: per-row backward
    ((64,), 3, 4, 40),  # exactly the small-N limit
    ((65,), 3, 12, 70),  # just past it: routing kernels, combine + cuBLAS, tiled (W kron h)
    ((3, 70), 2, 9, 300),  # sequence L = 70: batched cuBLAS, grouped backward
    ((300,), 4, 16, 136),  # r, out multiples of 8: vector tile loads, several tiles
    ((2, 150), 3, 40, 20),  # K = E * r = 120: partial k tiles
    ((4, 1000), 4, 64, 264),  # many routing blocks, split-K partial sums
]


def shape_id(shape):
    """Test id of a (lead, E, r, out) shape: "3x70x2x9x300"."""
    return "x".join(map(str, (*shape[0], shape[1], shape[2], shape[3])))


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| in float64 on the CPU; inf when actual is not finite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return 0.0
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def make_inputs(lead, E, r, out, mode, dtype=torch.float32, seed=0, device="cpu"):
    """(hidden [*lead, r], router [E, r] or theta [E] for mode static, bank [E, r, out]), drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, r, generator=g, dtype=torch.float64)
    router = (
        torch.randn(E, generator=g, dtype=torch.float64)
        if mode == "static"
        else torch.randn(E, r, generator=g, dtype=torch.float64)
    )
    bank = torch.randn(E, r, out, generator=g, dtype=torch.float64) / r**0.5
    return tuple(t.to(device=device, dtype=dtype) for t in (hidden, router, bank))
