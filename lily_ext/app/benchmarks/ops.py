"""lily_ext.ops.routed_mix vs the same math in PyTorch eager, measured side by side.

    lily-ext bench ops   [--device cpu|cuda] [--quick]

Prints a markdown table: per mode, N and direction, the median time of eager PyTorch
(PEFT's formula for ``batch``), of lily_ext, their ratio, and the floor being raced:
reading the bank once, or the GEMMs the math cannot avoid, whichever is larger. A second
table puts ``causal`` next to ``token`` and ``sequence`` at the same ``[S, L, r]`` shape (the
issue's target: causal within 1.3x of token).
"""

import argparse
import time

import torch
import torch.nn.functional as F

import lily_ext
from lily_ext.ops import routed_mix


def eager_routed_mix(h, R, Bk, scaling, mode):
    """The math as a PyTorch user writes it (PEFT's Linear.forward for batch)."""
    E, r, out = Bk.shape
    if mode == "static":
        w = F.softmax(R, dim=-1)
        return torch.matmul(h, torch.einsum("e,eio->io", w, Bk)) * scaling
    P = F.softmax(h @ R.T, dim=-1)
    if mode == "batch":
        w = P.reshape(-1, E).mean(dim=0)
        return torch.matmul(h, torch.einsum("e,eio->io", w, Bk)) * scaling
    if mode == "sequence":
        w = P.mean(dim=-2)  # [S, E]
        return torch.bmm(h, torch.einsum("se,eio->sio", w, Bk)) * scaling
    if mode == "causal":  # running mean along the tokens, then the per-row form below
        steps = torch.arange(1, h.shape[-2] + 1, device=h.device, dtype=h.dtype).unsqueeze(-1)
        P = torch.cumsum(P, dim=-2) / steps
    # token: (P kron h) @ Bk_flat, the eager form without an [N, E, out] intermediate
    Z = (P.unsqueeze(-1) * h.unsqueeze(-2)).reshape(*h.shape[:-1], E * r)
    return (Z @ Bk.reshape(E * r, out)) * scaling


def hidden_shape(mode, N, r):
    if mode not in ("sequence", "causal"):
        return (N, r)
    S = min(N, 4)
    return (S, N // S, r)


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def once(self, fn):
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    def compare(self, fns, budget_s):
        """Median microseconds of each fn; rounds interleave the fns so drift hits all alike."""
        for fn in fns:
            for _ in range(3):
                fn()
        self.sync()
        probe = max(self.once(fn) for fn in fns)
        rounds = int(min(max(budget_s * 1e6 / (probe * len(fns)), 5), 2000))
        samples = [[] for _ in fns]
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                samples[i].append(self.once(fn))
        return [min(s) for s in samples]


def run(device, quick):
    torch.manual_seed(0)
    r, E, out, scaling = 128, 4, 1024, 0.5
    sizes = [1, 16, 64, 4096]
    timer = Timer(device)
    budget = 0.3 if quick else 1.5
    rows = []
    bank = torch.randn(E, r, out, device=device) / r**0.5
    read_bank = timer.compare([lambda: bank.sum()], budget)[0]
    for mode in ("batch", "sequence", "token", "static", "causal"):
        router = torch.randn(E, device=device) if mode == "static" else torch.randn(E, r, device=device)
        for N in sizes:
            h = torch.randn(*hidden_shape(mode, N, r), device=device)
            grad = torch.randn(*h.shape[:-1], out, device=device)
            K = E * r if mode in ("token", "causal") else r
            a, b = torch.randn(N, K, device=device), torch.randn(K, out, device=device)
            g = torch.randn(N, out, device=device)
            gemm_fwd = [lambda: a @ b]
            gemm_bwd = [lambda: a @ b, lambda: a.T @ g, lambda: g @ b.T]
            for direction in ("fwd", "fwd+bwd"):
                leaves = [t.clone().requires_grad_(direction != "fwd") for t in (h, router, bank)]

                def step(fn):
                    def call():
                        y = fn(*leaves, scaling, mode)
                        if direction != "fwd":
                            torch.autograd.backward(y, grad)
                            for t in leaves:
                                t.grad = None

                    return call

                ours = lambda h_, R_, B_, s_, m_: routed_mix(h_, R_, B_, scaling=s_, mode=m_)  # noqa: E731
                t_eager, t_ours = timer.compare([step(eager_routed_mix), step(ours)], budget)
                gemms = gemm_fwd if direction == "fwd" else gemm_bwd
                t_gemm = sum(timer.compare(gemms, budget / 2))
                floor = max(read_bank, t_gemm)
                rows.append((mode, N, direction, t_eager, t_ours, t_eager / t_ours, floor, t_ours / floor))
    return rows, read_bank


def run_causal(device, quick):
    """causal next to token and sequence on the same [S, L, r] input: median us per mode."""
    torch.manual_seed(0)
    r, E, out, scaling = 128, 4, 1024, 0.5
    timer = Timer(device)
    budget = 0.3 if quick else 1.5
    bank = torch.randn(E, r, out, device=device) / r**0.5
    router = torch.randn(E, r, device=device)
    rows = []
    for N in (1, 64, 4096):
        h = torch.randn(*hidden_shape("causal", N, r), device=device)
        grad = torch.randn(*h.shape[:-1], out, device=device)
        for direction in ("fwd", "fwd+bwd"):
            leaves = [t.clone().requires_grad_(direction != "fwd") for t in (h, router, bank)]

            def step(mode):
                def call():
                    y = routed_mix(*leaves, scaling=scaling, mode=mode)
                    if direction != "fwd":
                        torch.autograd.backward(y, grad)
                        for t in leaves:
                            t.grad = None

                return call

            times = timer.compare([step(m) for m in ("token", "sequence", "causal")], budget)
            rows.append((N, tuple(h.shape), direction, *times))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="shorter timing budget")
    args = parser.parse_args(argv)
    rows, read_bank = run(args.device, args.quick)
    info = lily_ext.build_info()
    threads = torch.get_num_threads()
    print(f"torch {info['torch']}, device {args.device}, {threads} CPU threads, r=128 E=4 out=1024, scaling 0.5")
    print(f"floor = max(read the bank once: {read_bank:.1f} us, the unavoidable GEMMs via torch.matmul)")
    print()
    print("| mode | N | pass | eager us | lily_ext us | speedup | floor us | lily_ext / floor |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for mode, N, direction, te, to, sp, fl, of in rows:
        print(f"| {mode} | {N} | {direction} | {te:.1f} | {to:.1f} | {sp:.2f}x | {fl:.1f} | {of:.2f} |")
    print()
    print("causal vs token vs sequence, same input (lily_ext, median us):")
    print()
    print("| N | hidden | pass | token us | sequence us | causal us | causal / token |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for N, shape, direction, t_token, t_seq, t_causal in run_causal(args.device, args.quick):
        dims = " x ".join(map(str, shape))
        ratio = t_causal / t_token
        print(f"| {N} | {dims} | {direction} | {t_token:.1f} | {t_seq:.1f} | {t_causal:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
