"""lily_ext on CUDA at the issue's shapes vs PEFT's eager formula and torch.compile of it.

    python benchmarks/bench_cuda.py [--dtype bfloat16] [--sizes 1,64,8192] [--budget 0.3]
                                    [--no-compile] [--json results.json]

A Lily-adapted q_proj-like linear: in = out = 4096, r = 256, E = 4 experts, `batch`
routing (PEFT's semantics). Two things are timed, forward and forward+backward:

- the routed mix alone (h [N, r] -> delta [N, out]);
- the whole adapted layer: y = x W^T + s * (x A^T) Bc with W frozen and x, A, router
  and bank trained (PEFT's LilyLayer.forward, written out below).

Each against PEFT's eager formula and torch.compile of that formula. Times are
medians of CUDA-event intervals around one call each (launch gaps included: that is
what an eager caller sees at decode sizes). The other routing modes of lily_ext are
timed too (the routed mix alone; PEFT has no equivalent).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lily_ext
from lily_ext.ops import reload_cuda_knobs, routed_mix

HIDDEN, RANK, EXPERTS, SCALING = 4096, 256, 4, 0.5
DEVICE = "cuda"


def peft_mix(h, R, Bk, scaling):
    """PEFT's LilyLayer.forward, the adapter part (router is an nn.Linear(r, E, bias=False))."""
    router_logits = F.linear(h, R)
    router_probability = F.softmax(router_logits, dim=-1)
    expert_probabilities = router_probability.reshape(-1, Bk.shape[0]).mean(dim=0)
    combined_B = torch.einsum("e,eio->io", expert_probabilities, Bk)
    delta = torch.matmul(h, combined_B)
    return delta * scaling


def peft_layer(x, W, A, R, Bk, scaling):
    result = F.linear(x, W)
    hidden = F.linear(x, A)
    return result + peft_mix(hidden, R, Bk, scaling).to(result.dtype)


def lily_mix(h, R, Bk, scaling, mode="batch"):
    return routed_mix(h, R, Bk, scaling=scaling, mode=mode)


def lily_layer(x, W, A, R, Bk, scaling):
    return F.linear(x, W) + routed_mix(F.linear(x, A), R, Bk, scaling=scaling, mode="batch")


def base_layer(x, W, A, R, Bk, scaling):
    return F.linear(x, W)


def median_us(fn, budget_s, min_runs=10, max_runs=2000):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def step(fn, args, trainable, grad):
    """One call: forward, or forward + backward into the trainable args (grads dropped after)."""
    if grad is None:

        def call():
            with torch.no_grad():
                fn(*args)

    else:

        def call():
            y = fn(*args)
            y.backward(grad)
            for t in trainable:
                t.grad = None

    return call


def rel_diff(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run(args):
    dtype = getattr(torch, args.dtype)
    dev = DEVICE
    torch.manual_seed(0)
    W = torch.randn(HIDDEN, HIDDEN, device=dev, dtype=dtype) / HIDDEN**0.5
    A0 = torch.randn(RANK, HIDDEN, device=dev, dtype=dtype) / HIDDEN**0.5
    R0 = torch.randn(EXPERTS, RANK, device=dev, dtype=dtype) / RANK**0.5
    B0 = torch.randn(EXPERTS, RANK, HIDDEN, device=dev, dtype=dtype) / RANK**0.5
    theta0 = torch.randn(EXPERTS, device=dev, dtype=dtype)
    compiled = {}
    if not args.no_compile:
        compiled = {"mix": torch.compile(peft_mix, dynamic=False), "layer": torch.compile(peft_layer, dynamic=False)}
    rows, checks = [], []
    for N in args.sizes:
        x0 = torch.randn(N, HIDDEN, device=dev, dtype=dtype)
        h0 = torch.randn(N, RANK, device=dev, dtype=dtype)
        for direction in ("fwd", "fwd+bwd"):
            train = direction != "fwd"
            x = x0.clone().requires_grad_(train)
            h = h0.clone().requires_grad_(train)
            A, R, Bk = (t.clone().requires_grad_(train) for t in (A0, R0, B0))
            grad = torch.randn(N, HIDDEN, device=dev, dtype=dtype) if train else None
            mix_args, layer_args = (h, R, Bk, SCALING), (x, W, A, R, Bk, SCALING)
            mix_train, layer_train = (h, R, Bk), (x, A, R, Bk)
            with torch.no_grad():
                checks.append((N, "mix", rel_diff(lily_mix(*mix_args), peft_mix(*mix_args))))
                checks.append((N, "layer", rel_diff(lily_layer(*layer_args), peft_layer(*layer_args))))
            for what, peft_fn, ours, fn_args, trainable in (
                ("routed mix", peft_mix, lily_mix, mix_args, mix_train),
                ("Lily linear", peft_layer, lily_layer, layer_args, layer_train),
            ):
                t_eager = median_us(step(peft_fn, fn_args, trainable, grad), args.budget)
                key = "mix" if what == "routed mix" else "layer"
                t_comp = (
                    median_us(step(compiled[key], fn_args, trainable, grad), args.budget) if compiled else float("nan")
                )
                t_ours = median_us(step(ours, fn_args, trainable, grad), args.budget)
                t_base = (
                    median_us(step(base_layer, layer_args, (x,), grad), args.budget) if key == "layer" else float("nan")
                )
                rows.append(
                    dict(
                        what=what,
                        N=N,
                        direction=direction,
                        peft_eager_us=t_eager,
                        peft_compiled_us=t_comp,
                        lily_ext_us=t_ours,
                        base_linear_us=t_base,
                    )
                )
                print(
                    f"  {what:11s} N={N:<5d} {direction:8s} eager {t_eager:9.1f}  compiled {t_comp:9.1f}  "
                    f"lily_ext {t_ours:9.1f} us",
                    flush=True,
                )
            # token mode both ways: the tiled kernel (default) and LILY_CUDA_KRON=gemm
            for mode, knob in (("sequence", None), ("token", None), ("token", "gemm"), ("static", None)):
                Rm = (theta0 if mode == "static" else R0).clone().requires_grad_(train)
                hm = h.reshape(math.gcd(N, 8), -1, RANK) if mode == "sequence" else h  # up to 8 samples
                g = None if grad is None else grad.reshape(*hm.shape[:-1], HIDDEN)
                if knob:
                    os.environ["LILY_CUDA_KRON"] = knob
                    reload_cuda_knobs()  # the kernels read their knobs once per process
                try:
                    t = median_us(
                        step(lambda a, b, c, s, m=mode: lily_mix(a, b, c, s, m), (hm, Rm, Bk, SCALING), (h, Rm, Bk), g),
                        args.budget,
                    )
                finally:
                    os.environ.pop("LILY_CUDA_KRON", None)
                    reload_cuda_knobs()
                label = mode + (f", LILY_CUDA_KRON={knob}" if knob else "")
                rows.append(
                    dict(
                        what=f"routed mix ({label})",
                        N=N,
                        direction=direction,
                        peft_eager_us=float("nan"),
                        peft_compiled_us=float("nan"),
                        lily_ext_us=t,
                        base_linear_us=float("nan"),
                    )
                )
    return rows, checks


def print_tables(rows, checks, args):
    info = lily_ext.build_info()
    print()
    print(
        f"torch {info['torch']}, {torch.cuda.get_device_name()}, {args.dtype}, in = out = {HIDDEN}, r = {RANK}, "
        f"E = {EXPERTS}, batch routing; CUDA-event medians in us"
    )
    print()
    print(
        "| what | N | pass | PEFT eager | PEFT torch.compile | lily_ext | vs eager | vs compiled | base linear alone |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["what"].startswith("routed mix ("):
            continue
        sp_e = r["peft_eager_us"] / r["lily_ext_us"]
        sp_c = r["peft_compiled_us"] / r["lily_ext_us"]
        print(
            f"| {r['what']} | {r['N']} | {r['direction']} | {r['peft_eager_us']:.1f} | {r['peft_compiled_us']:.1f} | "
            f"{r['lily_ext_us']:.1f} | {sp_e:.2f}x | {sp_c:.2f}x | {r['base_linear_us']:.1f} |"
        )
    print()
    print("| lily_ext routed mix, other modes | N | pass | us |")
    print("|---|---:|---|---:|")
    for r in rows:
        if r["what"].startswith("routed mix ("):
            print(f"| {r['what'][12:-1]} | {r['N']} | {r['direction']} | {r['lily_ext_us']:.1f} |")
    print()
    worst = max((c[2] for c in checks), default=0.0)
    print(f"lily_ext vs PEFT formula, max relative difference over all calls: {worst:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sizes", default="1,64,8192", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the PEFT formula")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    rows, checks = run(args)
    print_tables(rows, checks, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"rows": rows, "checks": checks, "dtype": args.dtype, "build": lily_ext.build_info()}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
