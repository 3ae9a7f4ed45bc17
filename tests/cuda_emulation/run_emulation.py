"""Builds and runs the CPU emulation of the CUDA kernels (no GPU needed).

    python tests/cuda_emulation/run_emulation.py [--quick] [--only MODE] [--jobs N]

The kernel sources csrc/cuda/*.cu are compiled unchanged by the host C++ compiler
except for two mechanical rewrites: `kernel<<<grid, block, smem, stream>>>(args)`
becomes `::emu::launch(grid, block, smem, stream, &kernel, args)` and the
`extern __shared__` dynamic shared-memory declaration becomes a pointer to the
emulated block's buffer. include/emu.h then runs every CUDA thread as a fiber
with real barriers (see there). The harness compares forward and backward against
the CPU implementation in float64. Needs g++ (C++20), the CUDA toolkit headers and
the cuBLAS headers (toolkit or the nvidia pip wheels); no CUDA library is linked.
"""

import argparse
import concurrent.futures
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(ROOT, "build", "cuda_emulation")

LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
DYNAMIC_SMEM = "extern __shared__ __align__(16) unsigned char smem_raw[];"


def cuda_include_dirs():
    """(toolkit include dir, dirs with cublas_v2.h) or None when not available."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    toolkit = next(
        (os.path.join(h, "include") for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_fp16.h"))),
        None,
    )
    if toolkit is None:
        return None
    if os.path.exists(os.path.join(toolkit, "cublas_v2.h")):
        return toolkit, []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                return toolkit, [inc]
    return None


def transform(src):
    text = open(src).read()
    text = LAUNCH.sub(lambda m: f"::emu::launch({m.group(2).strip()}, &{m.group(1)}, ", text)
    text = text.replace(DYNAMIC_SMEM, "unsigned char* smem_raw = ::emu::dynamic_smem();")
    if "<<<" in text or "extern __shared__" in text:
        raise SystemExit(f"run_emulation: could not rewrite every launch / shared declaration in {src}")
    return text


def build(jobs):
    found = cuda_include_dirs()
    if found is None:
        raise SystemExit("run_emulation: CUDA toolkit or cuBLAS headers not found")
    toolkit, extra = found
    cxx = os.environ.get("CXX", "g++")
    os.makedirs(BUILD, exist_ok=True)
    common = [
        "-std=c++20",
        os.environ.get("EMU_OPT", "-O1"),
        "-g",
        "-pthread",
        "-w",
        "-DLILY_NO_MULTIVERSION",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-I",
        os.path.join(HERE, "include"),
        "-I",
        os.path.join(ROOT, "csrc", "cuda"),
        "-isystem",
        toolkit,
    ] + [a for d in extra for a in ("-isystem", d)]
    emu = ["-include", os.path.join(HERE, "include", "emu.h")]
    units = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        out = os.path.join(BUILD, os.path.basename(src)[:-3] + ".cpp")
        with open(out, "w") as f:
            f.write(f'#line 1 "{src}"\n' + transform(src))
        units.append((out, emu))
    units.append((os.path.join(HERE, "emu_runtime.cpp"), emu))
    units.append((os.path.join(HERE, "harness.cpp"), []))
    units.append((os.path.join(ROOT, "csrc", "lily", "cpu_primitives.cpp"), []))

    def compile_one(unit):
        src, flags = unit
        obj = os.path.join(BUILD, os.path.basename(src) + ".o")
        cmd = [cxx, *common, *flags, "-c", src, "-o", obj]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run_emulation: compiling {src} failed:\n{proc.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(compile_one, units))
    exe = os.path.join(BUILD, "emulate")
    subprocess.run([cxx, "-pthread", *objs, "-o", exe], check=True)
    return exe


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="skip the larger single-segment shapes; float32 and one other dtype per case",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", metavar="MODE", help="run only the cases of this routing mode")
    args = parser.parse_args()
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        raise SystemExit("run_emulation: no C++ compiler (set CXX)")
    exe = build(args.jobs)
    sys.stdout.flush()
    flags = (["--quick"] if args.quick else []) + ([f"--only={args.only}"] if args.only else [])
    return subprocess.run([exe] + flags).returncode


if __name__ == "__main__":
    sys.exit(main())
