"""Lily v2's A side through the same op: routed_mix(x, R_A, A_bank) vs eager PyTorch.

    lily-ext bench a_side
    python -m lily_ext.app.benchmarks.a_side [--in-features 4096] [--ranks 32,128] [--num-A 4]
        [--tokens 1,64,4096] [--threads N] [--budget S] [--quick]

The A side has the opposite shape of the B side: the op's "r" is the layer's input width (e.g.
4096) and its "out" is the adapter rank (32-128), so the contraction is long and the output
narrow. This times, per routing mode, the op against the math as a PyTorch user writes it,
``h = x @ (sum_a w_a A_a)^T`` (per sample for ``sequence``; per token for ``token`` and ``causal``:
all experts' projections in one GEMM, then the weighted sum), forward and forward + backward,
median of runs alternating between the two. The issue asks for a second kernel only if this shape is slow.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lily_ext.ops import routed_mix

MODES = ("batch", "sequence", "token", "static", "causal")


def eager_a_side(x, router, bank, mode):
    """``x [..., in] -> h [..., r]``, bank ``[num_A, in, r]``, router ``[num_A, in]`` (theta for static)."""
    num_A, width, r = bank.shape
    if mode == "static":
        return x @ torch.einsum("a,aik->ik", F.softmax(router, dim=0), bank)
    probs = F.softmax(x @ router.T, dim=-1)
    if mode == "batch":
        return x @ torch.einsum("a,aik->ik", probs.reshape(-1, num_A).mean(0), bank)
    if mode == "sequence":
        return torch.bmm(x, torch.einsum("sa,aik->sik", probs.mean(dim=-2), bank))
    if mode == "causal":
        steps = torch.arange(1, x.shape[-2] + 1, dtype=x.dtype).unsqueeze(-1)
        probs = torch.cumsum(probs, dim=-2) / steps
    experts = (x @ bank.permute(1, 0, 2).reshape(width, num_A * r)).view(*x.shape[:-1], num_A, r)
    return (probs.unsqueeze(-1) * experts).sum(-2)


def shape(mode, tokens, width):
    if mode not in ("sequence", "causal"):
        return (tokens, width)
    samples = min(tokens, 4)
    return (samples, tokens // samples, width)


def median_ms(fns, budget_s, min_runs=3):
    """Median ms of each of ``fns``, run alternately in rounds (so that load from other jobs hits all alike)."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    started = time.perf_counter()
    while len(times[0]) < min_runs or (time.perf_counter() - started < budget_s and len(times[0]) < 50):
        for fn, spent in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
    return [1e3 * sorted(t)[len(t) // 2] for t in times]


def measure(mode, tokens, width, r, num_A, budget_s, backward):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape(mode, tokens, width), generator=g)
    router = torch.randn((num_A,) if mode == "static" else (num_A, width), generator=g) * 0.02
    bank = torch.randn(num_A, width, r, generator=g) / width**0.5
    leaves = [t.requires_grad_(backward) for t in (x, router, bank)]

    def run(fn):
        def step():
            out = fn(*leaves)
            if backward:
                out.sum().backward()
                for t in leaves:
                    t.grad = None

        return step

    op = run(lambda a, b, c: routed_mix(a, b, c, scaling=1.0, mode=mode))
    eager = run(lambda a, b, c: eager_a_side(a, b, c, mode))
    with torch.no_grad() if not backward else torch.enable_grad():
        ours, theirs = median_ms([op, eager], budget_s)
    return ours, theirs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--ranks", default="32,128")
    parser.add_argument("--num-A", dest="num_A", type=int, default=4)
    parser.add_argument("--tokens", default="1,64,4096")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement (at least 3 rounds)")
    parser.add_argument("--quick", action="store_true", help="r = 32 only, tokens 1 and 64, shorter budget")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ranks = [32] if args.quick else [int(v) for v in args.ranks.split(",")]
    tokens = [1, 64] if args.quick else [int(v) for v in args.tokens.split(",")]
    budget = 0.2 if args.quick else args.budget
    print(
        f"A side: x [N, {args.in_features}] -> h [N, r], num_A={args.num_A}; CPU, {torch.get_num_threads()} threads, "
        "median ms (lily_ext op / eager PyTorch)"
    )
    print()
    print("| mode | r | N | fwd op | fwd eager | ratio | fwd+bwd op | fwd+bwd eager | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes.split(","):
        for r in ranks:
            for n in tokens:
                fwd = measure(mode, n, args.in_features, r, args.num_A, budget, backward=False)
                both = measure(mode, n, args.in_features, r, args.num_A, budget, backward=True)
                print(
                    f"| {mode} | {r} | {n} | {fwd[0]:.3f} | {fwd[1]:.3f} | {fwd[1] / fwd[0]:.2f}x "
                    f"| {both[0]:.3f} | {both[1]:.3f} | {both[1] / both[0]:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
