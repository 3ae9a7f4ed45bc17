"""compute-sanitizer over lily::routed_mix: every CUDA kernel and dtype on a few small shapes.

    python scripts/gpu_sanitize.py cases [--device cuda|cpu] [--list]
    python scripts/gpu_sanitize.py check --tool memcheck|racecheck [--probe-file FILE]

``cases`` runs forward and backward of torch.ops.lily.routed_mix on a targeted set of shapes, modes,
dtypes, masks and knobs that together reach every kernel of csrc/cuda (see CASES), checks each
result against the float64 CPU op, and prints one line per case. ``--device cpu`` runs the same
cases on the CPU: the dry run of scripts/gpu_check.sh uses it to prove this script works there.

``check`` runs ``cases`` under ``compute-sanitizer --tool TOOL``: first a probe (the sanitizer's
version and a trivial CUDA program under it; a runtime that refuses the sanitizer, e.g. "Device not
supported" under gVisor, ends the check as skipped, exit 77, with the reason), then the cases.
Exit 0: no errors; 1: the sanitizer or the cases reported errors; 77: skipped (the last line says
why); 124: out of time (GPU_CHECK_STAGE_LIMIT_S, set by gpu_check.sh's stage helper).

Standard library plus torch and lily_ext; runs on Python 3.10+ and torch 2.6+.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = 77

# (label, leading dims of hidden, E, r, out, modes, dtypes, mask, env): what each case reaches is in
# its label; the paths are chosen in csrc/cuda/routed_mix_cuda.cu (plan_forward / plan_backward),
# kernels.h (plan_small_mix) and kron_gemm.cu (launch_kron_gemm).
ALL_DTYPES = ("float32", "float64", "float16", "bfloat16")
ALL_MODES = ("batch", "sequence", "token", "static")
CASES = [
    # N <= 64: the fused small_mix kernel; per-row modes (sequence with one token per sample, token)
    # have K = E * r = 64 -> two split-K slices + split_reduce; batch / static one slice. Backward:
    # token and sequence L = 1 per-row (kron_rows + cuBLAS + kron_rows_backward, convert for half
    # types), batch / static grouped with G = 1 (bank_grad_groups writing dbank directly).
    ("small-N fused forward, split-K", (7,), 4, 16, 24, ALL_MODES, ALL_DTYPES, "sequence", {}),
    # sequence L = 4: router_finalize with L > 1, per-row backward (L <= 4) and sum_group_rows
    ("sequence L=4, per-row backward", (2, 3, 4), 2, 5, 9, ("sequence",), ("float32", "bfloat16"), "sequence", {}),
    # N > 64, per-row: router_rows then the tiled kron kernel: tensor-core vector variant (r, out
    # multiples of 8, 16-byte aligned) for half types, SIMT for float / double
    ("kron tiled, tensor-core vector / SIMT", (300,), 4, 16, 136, ("token",), ALL_DTYPES, None, {}),
    ("kron tiled, masked sequence L=1", (300,), 4, 16, 136, ("sequence",), ("float32", "float16"), "sequence", {}),
    # r = 12, out = 70: the tensor-core scalar variant
    ("kron tiled, tensor-core scalar", (65,), 3, 12, 70, ("token",), ("float16", "bfloat16"), None, {}),
    # grouped forward with one group (combine + cuBLAS GEMM), grouped backward G = 1
    ("grouped, one group", (300,), 4, 16, 136, ("batch",), ("float16",), None, {}),
    ("grouped, static weights", (65,), 3, 12, 70, ("static",), ("float64",), None, {}),
    # sequence L = 70 over 3 samples (one fully masked): batched cuBLAS forward, grouped backward
    # with bank_grad_accumulate across groups
    ("batched cuBLAS, grouped backward, masks", (3, 70), 2, 9, 300, ("sequence",), ALL_DTYPES, "sequence", {}),
    ("batch over 3x70", (3, 70), 2, 9, 300, ("batch",), ("float32",), None, {}),
    # a tiny scratch budget: several group batches (grouped) and row chunks (per-row)
    (
        "grouped, several group batches",
        (3, 70),
        2,
        9,
        300,
        ("sequence",),
        ("float32", "bfloat16"),
        "sequence",
        {"LILY_CUDA_SCRATCH_BYTES": "12000"},
    ),
    # LILY_CUDA_KRON=gemm: kron_rows chunks + cuBLAS instead of the tiled kernel
    (
        "kron rows + cuBLAS (LILY_CUDA_KRON=gemm)",
        (130,),
        5,
        12,
        70,
        ("token",),
        ("float32", "bfloat16"),
        None,
        {"LILY_CUDA_KRON": "gemm"},
    ),
    (
        "kron rows in chunks",
        (130,),
        5,
        12,
        70,
        ("token",),
        ("float16",),
        None,
        {"LILY_CUDA_KRON": "gemm", "LILY_CUDA_SCRATCH_BYTES": "4000"},
    ),
    # many router blocks: router_grad partial sums over 63 blocks
    ("many router blocks", (4, 1000), 4, 64, 264, ("sequence", "token"), ("float32",), None, {}),
    # N = 0: the memsets of the empty backward
    ("empty N", (0,), 4, 8, 16, ("batch", "static"), ("float32",), None, {}),
]

# max |error| / max |reference| accepted (loose: the tests check precision, this only catches garbage)
TOL = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


def expand_cases():
    """One (label, lead, E, r, out, mode, dtype, masked, env) per run."""
    for label, lead, E, r, out, modes, dtypes, masked_mode, env in CASES:
        for mode in modes:
            for dtype in dtypes:
                yield label, lead, E, r, out, mode, dtype, masked_mode == mode, env


def rel_err(actual, expected):
    import torch

    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if expected.numel() == 0:
        return 0.0
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def run_case(lead, E, r, out, mode, dtype_name, masked, device, seed):
    """Forward + backward on `device` against the float64 CPU op; returns the worst relative error."""
    import torch

    from lily_ext.ops import routed_mix

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, r, generator=g, dtype=torch.float64)
    router = (
        torch.randn(E, generator=g, dtype=torch.float64)
        if mode == "static"
        else torch.randn(E, r, generator=g, dtype=torch.float64)
    )
    bank = torch.randn(E, r, out, generator=g, dtype=torch.float64) / r**0.5
    mask = None
    if masked:
        mask = torch.rand(*lead, generator=g) < 0.7
        if len(lead) >= 2 and lead[0] > 1:
            mask[1] = False  # a fully masked sample
    grad = torch.randn(*lead, out, generator=g, dtype=torch.float64)
    # the reference sees the same rounded inputs
    inputs = [t.to(dtype) for t in (hidden, router, bank)]
    grad = grad.to(dtype)

    def forward_backward(tensors, dev, as_dtype):
        leaves = [t.detach().to(device=dev, dtype=as_dtype).clone().requires_grad_() for t in tensors]
        m = None if mask is None else mask.to(dev)
        y = routed_mix(*leaves, scaling=0.7, mode=mode, mask=m)
        y.backward(grad.to(device=dev, dtype=as_dtype))
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        return [y, *grads]

    got = forward_backward(inputs, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    ref = forward_backward(inputs, "cpu", torch.float64)
    return max(rel_err(a, b) for a, b in zip(got, ref))


def cases_main(args):
    import torch

    import lily_ext
    from lily_ext.ops import reload_cuda_knobs

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not lily_ext.build_info().get("cuda_kernels"):
        print("gpu_sanitize: lily_ext was built without its CUDA kernels", file=sys.stderr)
        return 2
    runs = list(expand_cases())
    print(
        f"gpu_sanitize: {len(runs)} forward + backward runs of lily::routed_mix on {args.device} "
        f"(torch {torch.__version__})",
        flush=True,
    )
    failures = 0
    for i, (label, lead, E, r, out, mode, dtype, masked, env) in enumerate(runs):
        shape = "x".join(map(str, (*lead, E, r, out)))
        what = f"{label}: lead x E x r x out = {shape}, {mode}, {dtype}{', mask' if masked else ''}" + "".join(
            f", {k}={v}" for k, v in env.items()
        )
        if args.list:
            print(what)
            continue
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        reload_cuda_knobs()  # the kernels read their knobs once per process
        start = time.perf_counter()
        try:
            err = run_case(lead, E, r, out, mode, dtype, masked, args.device, seed=i)
            status = "ok" if err <= TOL[dtype] else f"MISMATCH (tolerance {TOL[dtype]:.0e})"
        except Exception as exc:  # a kernel error surfaces here as a RuntimeError from the op
            err, status = float("nan"), f"ERROR {type(exc).__name__}: {str(exc).strip()[:300]}"
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            reload_cuda_knobs()
        failures += status != "ok"
        print(
            f"[{i + 1:2d}/{len(runs)}] {status:<8s} rel err {err:.1e} {time.perf_counter() - start:6.2f}s  {what}",
            flush=True,
        )
    if args.list:
        return 0
    print(f"gpu_sanitize: {len(runs) - failures} of {len(runs)} runs ok", flush=True)
    return 1 if failures else 0


# ---- compute-sanitizer --------------------------------------------------------------------------


def find_sanitizer():
    """compute-sanitizer on PATH, else next to the CUDA toolkit the build uses; None if none."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    homes += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, homes):
        for candidate in (
            os.path.join(home, "bin", "compute-sanitizer"),
            os.path.join(home, "compute-sanitizer", "compute-sanitizer"),
        ):
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return None


def run_logged(cmd, timeout, env=None):
    """(returncode or 124 on timeout, output); output is also echoed as it comes."""
    print("$ " + " ".join(cmd), flush=True)
    lines = []
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            errors="replace",
            start_new_session=False,
        )
    except OSError as exc:
        return 127, str(exc)
    deadline = time.monotonic() + timeout
    try:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(cmd, timeout)
            if not sel.select(timeout=min(left, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            print(line, end="", flush=True)
        return proc.wait(timeout=max(deadline - time.monotonic(), 1)), "".join(lines)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 124, "".join(lines)


PROBE = (
    "import torch; x = torch.ones(1024, device='cuda'); y = (x * 2).sum(); torch.cuda.synchronize(); "
    "print('probe ok', y.item())"
)


def probe(sanitizer, python, timeout):
    """None when the sanitizer runs a trivial CUDA program, else the reason it does not."""
    code, out = run_logged([sanitizer, "--version"], min(timeout, 30))
    if code != 0:
        return f"`compute-sanitizer --version` exit {code}: {last_lines(out)}"
    code, out = run_logged([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", python, "-c", PROBE], timeout)
    if code == 124:
        return f"a trivial CUDA program did not finish under compute-sanitizer in {timeout:.0f} s"
    if code != 0 or "probe ok" not in out:
        return f"the runtime refuses compute-sanitizer (trivial CUDA program exit {code}): {last_lines(out, 3)}"
    return None


def last_lines(text, count=2):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "no output"


def tool_command(sanitizer, tool, filtered=True):
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "30"]
    if tool == "memcheck":
        cmd += ["--leak-check", "no"]
    elif filtered:
        # shared-memory hazards in lily's own kernels (cuBLAS's and torch's are not ours to check)
        cmd += ["--kernel-name", "kns=lily"]
    return cmd


def check_main(args):
    limit = float(os.environ.get("GPU_CHECK_STAGE_LIMIT_S") or args.time_limit)
    start = time.monotonic()
    python = sys.executable
    if args.probe_file and os.path.isfile(args.probe_file):
        with open(args.probe_file, encoding="utf-8") as f:
            reason = f.read().strip()
        print(f"probe result from {args.probe_file}: {reason or 'ok'}")
    else:
        sanitizer = find_sanitizer()
        if sanitizer is None:
            reason = "no compute-sanitizer on PATH or in the CUDA toolkit"
        else:
            reason = probe(sanitizer, python, timeout=min(60.0, limit / 2)) or ""
        if args.probe_file:
            with open(args.probe_file, "w", encoding="utf-8") as f:
                f.write(reason + "\n")
    if reason:
        print(f"skipped: {reason}")
        return SKIP
    sanitizer = find_sanitizer()
    env = dict(os.environ)
    # every tensor its own cudaMalloc, so an access past a tensor's end is outside any allocation
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    cases = [python, os.path.join(HERE, "gpu_sanitize.py"), "cases", "--device", "cuda"]
    left = limit - (time.monotonic() - start) - 3
    code, out = run_logged(tool_command(sanitizer, args.tool) + cases, left, env)
    if (
        code not in (0, 124)
        and re.search(r"unrecognized|unknown option|invalid option|kernel-name", out, re.I)
        and "gpu_sanitize:" not in out
    ):
        print(f"{args.tool}: retrying without the kernel-name filter")
        left = limit - (time.monotonic() - start) - 3
        code, out = run_logged(tool_command(sanitizer, args.tool, filtered=False) + cases, left, env)
    summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", out)
    if code == 124:
        print(f"{args.tool}: out of time after {time.monotonic() - start:.0f} s (cap {limit:.0f} s)")
        return 124
    print(f"{args.tool}: {'; '.join(summary) or 'no summary line'}; exit {code}")
    return 0 if code == 0 else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cases = sub.add_parser("cases", help="run the cases (forward + backward, checked against the CPU)")
    cases.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    cases.add_argument("--list", action="store_true", help="only list the cases")
    check = sub.add_parser("check", help="run the cases under compute-sanitizer")
    check.add_argument("--tool", choices=["memcheck", "racecheck"], required=True)
    check.add_argument("--probe-file", help="reuse / record the probe's result here")
    check.add_argument(
        "--time-limit", type=float, default=120.0, help="seconds in all (GPU_CHECK_STAGE_LIMIT_S overrides)"
    )
    args = parser.parse_args(argv)
    return cases_main(args) if args.command == "cases" else check_main(args)


if __name__ == "__main__":
    sys.exit(main())
