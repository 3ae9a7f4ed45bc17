"""The ORT library's portable GEMM (csrc/lily/cpu_gemm.h) vs torch.mm (MKL), both on one thread.

    python benchmarks/bench_gemm.py [--repeats N]

Builds benchmarks/cpp/gemm_bench.cpp with the host compiler (-O3) and prints a markdown table of
median milliseconds and GFLOP/s for the GEMM shapes of routed_mix at N=4096, r=128, E=4, out=1024.
"""

import argparse
import statistics
import subprocess
import tempfile
import time

import torch
from native_build import build_program

# (label, M, N, K, trans_a, trans_b)
SHAPES = [
    ("h @ Bc (fwd, batch)", 4096, 1024, 128, False, False),
    ("Z @ Bk_flat (fwd, token)", 4096, 1024, 512, False, False),
    ("h^T @ G (bwd dBc)", 128, 1024, 4096, True, False),
    ("G @ Bc^T (bwd dh)", 4096, 128, 1024, False, True),
]


def torch_median(M, N, K, ta, tb, repeats):
    a = torch.randn(K, M).T if ta else torch.randn(M, K)
    b = torch.randn(N, K).T if tb else torch.randn(K, N)
    c = torch.empty(M, N)
    for _ in range(2):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_program(tmp, "gemm_bench", "cpu_gemm", ["-O3"])
        rows = []
        for label, M, N, K, ta, tb in SHAPES:
            out = subprocess.run(
                [exe, str(M), str(N), str(K), str(int(ta)), str(int(tb)), str(args.repeats)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            kernel, ours = out[0], float(out[1])
            ref = torch_median(M, N, K, ta, tb, args.repeats)
            rows.append((label, M, N, K, ta, tb, ours, ref))
    print(f"one thread, float32; lily kernel: {kernel}; torch {torch.__version__} (torch.mm, MKL)")
    print()
    print("| product | M x N x K | lily ms | lily GFLOP/s | torch.mm ms | torch.mm GFLOP/s | lily / MKL speed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, M, N, K, ta, tb, ours, ref in rows:
        flop = 2.0 * M * N * K
        print(
            f"| {label} | {M}x{N}x{K}{' (A^T)' if ta else ''}{' (B^T)' if tb else ''} | {ours * 1e3:.2f} | "
            f"{flop / ours / 1e9:.1f} | {ref * 1e3:.2f} | {flop / ref / 1e9:.1f} | {ref / ours:.0%} |"
        )


if __name__ == "__main__":
    main()
