"""Decode-sized products: gemm_small (column blocks) vs gemm_stream (B row by row), one thread.

    python benchmarks/bench_small_gemm.py [--repeats N]

Builds benchmarks/cpp/small_gemm_bench.cpp with the host compiler (-O3, as the extension) and
prints a markdown table of median microseconds per product C[M, N] = A[M, K] @ B[K, N] for the
token-mode mix at decode (K = E * r): with B in cache (one copy) and from memory (copies of B
spanning 96 MiB, used in turn). Both kernels sum each element over k in the same order: the table
also reports their largest difference, which must be 0.
"""

import argparse
import subprocess
import tempfile

from native_build import build_program

# (label, K, N): the ORT decoder benchmark's r = 16, E = 3 on out = 512; the fused_layer
# benchmark's r = 128, E = 4 on q_proj (out = 512) and gate_proj (out = 1408).
SHAPES = [("r=16 E=3 out=512", 48, 512), ("r=128 E=4 out=512", 512, 512), ("r=128 E=4 out=1408", 512, 1408)]
ROWS = [1, 2, 4, 8, 16]
MEMORY_BYTES = 96 << 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_program(tmp, "small_gemm_bench", "cpu_primitives", ["-O3", "-Wno-psabi"])
        print("| K x N | M | B | gemm_small us | gemm_stream us | small / stream | max diff |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for label, K, N in SHAPES:
            for M in ROWS:
                for where, copies in (("cache", 1), ("memory", max(2, MEMORY_BYTES // (K * N * 4)))):
                    repeats = args.repeats if copies == 1 else max(3, args.repeats // 3)
                    run = subprocess.run(
                        [exe, str(M), str(K), str(N), str(copies), str(repeats)],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    small, stream, diff = (float(v) for v in run.stdout.split())
                    print(
                        f"| {K} x {N} ({label}) | {M} | {where} | {small:.1f} | {stream:.1f} | "
                        f"{small / stream:.2f} | {diff:g} |"
                    )


if __name__ == "__main__":
    main()
