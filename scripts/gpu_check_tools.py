"""Helpers of scripts/gpu_check.sh: preparing what the GPU machine lacks, and its environment stage.

    python scripts/gpu_check_tools.py prepare DIR [--with-ort-gpu] [--ort-gpu-version V] [--part-mib N]
                                                  [--parts-dir P] [--wheel SPEC ...]
    python scripts/gpu_check_tools.py env --dir DIR [--dry-run]
    python scripts/gpu_check_tools.py install-wheels --dir DIR --target T
    python scripts/gpu_check_tools.py ort-gpu --dir DIR --parts-dir P --target T [--verify-only]

``prepare`` (here, with a network) collects into DIR what a run on the GPU machine needs and the
project does not track: the ONNX Runtime C/C++ headers (found as lily_ext/_build/ort_library.py
finds them) in DIR/onnxruntime-include, optional small wheels (--wheel) in DIR/wheels, and
DIR/manifest.json (what, versions, sha256). ``--with-ort-gpu`` also downloads the onnxruntime-gpu
wheel for CPython 3.12 manylinux x86_64 (the version pinned in requirements.txt) and splits it into
numbered parts under P (default .gpu_parts beside DIR), each small enough to travel with one call;
the manifest records every part's and the whole wheel's sha256.

``env`` prints the environment and fails (exit 1, one "FAIL:" line per problem) when the run cannot
work: pytest missing, torch not a CUDA build, no GPU, no nvcc or nvcc's CUDA major differing from
torch's, no ONNX Runtime headers. With --dry-run only pytest is required; the rest is reported.

``ort-gpu`` reassembles the parts (when all are present), checks the sha256 and installs the wheel
with ``pip install --no-deps --no-index --target T``; exit 77 (skipped, the last line says why)
when no parts were prepared or some have not arrived yet. --verify-only checks without installing.

Standard library only (torch and friends are imported inside ``env``); Python 3.10+.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "onnxruntime_c_api.h"
INCLUDE = "onnxruntime-include"
MANIFEST = "manifest.json"
SKIP = 77
DEFAULT_ORT_GPU = "1.31.1"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
MiB = 1 << 20


def sha256_file(path, chunk=8 * MiB):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths, chunk=8 * MiB):
    """sha256 of the files concatenated in order (the reassembled wheel) without writing it."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def tree_digest(directory):
    """(files, bytes, sha256 over the sorted relative paths and contents) of a folder."""
    h, count, size = hashlib.sha256(), 0, 0
    for base, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            h.update(os.path.relpath(path, directory).encode() + b"\0")
            with open(path, "rb") as f:
                data = f.read()
            h.update(data)
            count, size = count + 1, size + len(data)
    return count, size, h.hexdigest()


def read_manifest(directory):
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def api_version(include_dir):
    try:
        with open(os.path.join(include_dir, HEADER), encoding="utf-8", errors="replace") as f:
            match = re.search(r"^#define ORT_API_VERSION (\d+)", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


# ---- prepare ------------------------------------------------------------------------------------


def find_headers():
    """(include dir, source line) the way the build finds them (lily_ext/_build/ort_library.py)."""
    script = os.path.join(ROOT, "lily_ext", "_build", "ort_library.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.path.isfile(os.path.join(lines[0], HEADER)):
        why = (proc.stdout + proc.stderr).strip().splitlines()
        raise SystemExit(f"prepare: no ONNX Runtime headers found: {why[-1] if why else 'no output'}")
    return lines[0], (lines[1] if len(lines) > 1 else "")


def requirement_version(name, default):
    """The version requirements.txt pins for `name` (e.g. onnxruntime-gpu==1.31.1), else default."""
    try:
        with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
            for line in f:
                match = re.match(rf"\s*{re.escape(name)}\s*==\s*([\w.+-]+)", line, re.I)
                if match:
                    return match.group(1)
    except OSError:
        pass
    return default


def pip_download(spec, dest):
    """Downloads the CPython 3.12 manylinux x86_64 wheel of `spec` (no dependencies) into dest."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--progress-bar",
        "off",
        "-d",
        dest,
    ]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    print("$ " + " ".join(cmd + [spec]), flush=True)
    proc = subprocess.run(cmd + [spec], text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"prepare: pip download {spec} failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    wheels = sorted(glob.glob(os.path.join(dest, "*.whl")), key=os.path.getmtime)
    if not wheels:
        raise SystemExit(f"prepare: pip download {spec} left no wheel in {dest}")
    return wheels[-1]


def split_file(path, parts_dir, max_part):
    """Splits `path` into equal numbered parts of at most max_part bytes; returns their records."""
    size = os.path.getsize(path)
    count = max(1, -(-size // max_part))
    part_size = -(-size // count)
    name = os.path.basename(path)
    records = []
    with open(path, "rb") as f:
        for i in range(count):
            part = f"{name}.part{i + 1}of{count}"
            h = hashlib.sha256()
            with open(os.path.join(parts_dir, part), "wb") as out:
                left = part_size
                while left > 0 and (block := f.read(min(8 * MiB, left))):
                    out.write(block)
                    h.update(block)
                    left -= len(block)
            records.append(
                {"name": part, "size": os.path.getsize(os.path.join(parts_dir, part)), "sha256": h.hexdigest()}
            )
    return records


def prepare_main(args):
    directory = os.path.abspath(args.dir)
    parts_dir = os.path.abspath(args.parts_dir or os.path.join(os.path.dirname(directory), ".gpu_parts"))
    os.makedirs(directory, exist_ok=True)
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "by": "scripts/gpu_check.sh --prepare",
        "python_here": platform.python_version(),
    }

    include, source = find_headers()
    target = os.path.join(directory, INCLUDE)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(include, target)
    licence = os.path.join(os.path.dirname(include), "copyright")
    if os.path.isfile(licence):  # the headers' licence travels with them
        shutil.copy(licence, os.path.join(directory, "onnxruntime-include.copyright"))
    files, size, digest = tree_digest(target)
    manifest["onnxruntime_headers"] = {
        "dir": INCLUDE,
        "from": include,
        "source": source.removeprefix("source: "),
        "api_version": api_version(target),
        "files": files,
        "bytes": size,
        "sha256": digest,
    }
    print(f"prepare: ONNX Runtime headers (C API {api_version(target)}) from {include} -> {target}")

    wheels_dir = os.path.join(directory, "wheels")
    shutil.rmtree(wheels_dir, ignore_errors=True)
    manifest["wheels"] = []
    if args.wheel:
        os.makedirs(wheels_dir)
        for spec in args.wheel:
            wheel = pip_download(spec, wheels_dir)
            manifest["wheels"].append(
                {
                    "spec": spec,
                    "file": os.path.basename(wheel),
                    "bytes": os.path.getsize(wheel),
                    "sha256": sha256_file(wheel),
                }
            )
            print(f"prepare: wheel {os.path.basename(wheel)} -> {wheels_dir}")

    old = read_manifest(directory).get("ort_gpu")
    if args.with_ort_gpu:
        version = args.ort_gpu_version or requirement_version("onnxruntime-gpu", DEFAULT_ORT_GPU)
        os.makedirs(parts_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(parts_dir, "*.part*of*")):
            os.remove(stale)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = pip_download(f"onnxruntime-gpu=={version}", tmp)
            parts = split_file(wheel, parts_dir, args.part_mib * MiB)
            manifest["ort_gpu"] = {
                "version": version,
                "wheel": os.path.basename(wheel),
                "bytes": os.path.getsize(wheel),
                "sha256": sha256_file(wheel),
                "parts_dir": os.path.relpath(parts_dir, ROOT) if parts_dir.startswith(ROOT) else parts_dir,
                "parts": parts,
            }
        print(
            f"prepare: {manifest['ort_gpu']['wheel']} ({manifest['ort_gpu']['bytes'] / MiB:.1f} MiB) split into "
            f"{len(parts)} parts of <= {args.part_mib} MiB in {parts_dir}"
        )
    elif old:
        manifest["ort_gpu"] = old  # a --prepare without the option keeps the parts made earlier
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    _, total, _ = tree_digest(directory)
    print(f"prepare: {directory} holds {total / MiB:.2f} MiB; manifest {os.path.join(directory, MANIFEST)}")
    print_protocol(directory, manifest)
    return 0


def print_protocol(directory, manifest):
    rel = os.path.relpath(directory, ROOT) if directory.startswith(ROOT + os.sep) else directory
    print()
    print("On the GPU machine (device `run`), one call:")
    print(f'  carry ["{rel}"], command: bash scripts/gpu_check.sh --dir {rel}')
    ort = manifest.get("ort_gpu")
    if not ort:
        return
    parts = ort["parts"]
    pdir = ort["parts_dir"]
    print(f"With onnxruntime-gpu ({len(parts)} parts; the machine must stay warm between the calls):")
    for i, part in enumerate(parts[:-1], 1):
        print(f'  call {i}: carry ["{pdir}/{part["name"]}"], command: ls -l {pdir}')
    print(
        f'  call {len(parts)}: carry ["{rel}", "{pdir}/{parts[-1]["name"]}"], '
        f"command: bash scripts/gpu_check.sh --dir {rel}"
    )


# ---- env ----------------------------------------------------------------------------------------


def version_of(*distributions):
    """(distribution, version) of the first one installed (metadata only: no import), or (None, None)."""
    for name in distributions:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def load_build_module(name):
    """lily_ext/_build/<name>.py by path (standard library only; lily_ext itself may not be built)."""
    directory = os.path.join(ROOT, "lily_ext", "_build")
    spec = importlib.util.spec_from_file_location(
        "_gpu_check_build", os.path.join(directory, "__init__.py"), submodule_search_locations=[directory]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{spec.name}.{name}")


def run_text(cmd, timeout=60):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def env_main(args):
    dry = args.dry_run
    failures, notes = [], []

    def fail(message):
        (notes if dry else failures).append(message)

    print(
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}  host: {platform.node()}  "
        f"cpus: {os.cpu_count()}  mode: {'dry run' if dry else 'GPU run'}"
    )
    print(f"python {platform.python_version()} ({sys.executable})")
    code, out = run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    print(f"nvidia-smi: {out.splitlines()[0] if code == 0 and out else 'not available'}")

    torch_cuda = None
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        failures.append(f"torch does not import: {exc}")
        torch = None
    if torch is not None:
        torch_cuda = torch.version.cuda
        available = torch.cuda.is_available()
        print(
            f"torch {torch.__version__} | torch CUDA {torch_cuda} | cuda available {available}"
            + (
                f" | {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
                if available
                else ""
            )
        )
        if torch_cuda is None:
            fail(f"torch {torch.__version__} is not a CUDA build")
        if not available:
            fail("no CUDA device: torch.cuda.is_available() is False")
        try:
            from torch.utils.cpp_extension import is_ninja_available

            print(f"ninja: {'available' if is_ninja_available() else 'missing: serial build (slower)'}")
        except Exception as exc:  # noqa: BLE001
            print(f"ninja: unknown ({exc})")

    toolkit = load_build_module("toolkit")
    cuda_home = toolkit.find_cuda_home()
    nvcc = toolkit.nvcc_version(cuda_home) if cuda_home else None
    print(f"nvcc: {nvcc or 'not found'} (CUDA toolkit {cuda_home or 'not found'}; the one the build uses)")
    if cuda_home is None or nvcc in (None, "unknown"):
        fail("no CUDA toolkit with a working nvcc (set CUDA_HOME or put nvcc on PATH)")
    elif torch_cuda is not None and nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        failures.append(
            f"CUDA major mismatch: nvcc {nvcc} ({cuda_home}) vs torch's CUDA {torch_cuda}: "
            "the extension would build against one runtime and load with the other"
        )
    sanitizer = shutil.which("compute-sanitizer") or next(
        (
            p
            for p in (
                os.path.join(cuda_home or "/nonexistent", "bin", "compute-sanitizer"),
                os.path.join(cuda_home or "/nonexistent", "compute-sanitizer", "compute-sanitizer"),
            )
            if os.path.isfile(p)
        ),
        None,
    )
    print(f"compute-sanitizer: {sanitizer or 'not found (the sanitizer stages will say so)'}")
    print(f"cmake: {shutil.which('cmake') or 'not found (the ONNX Runtime library cannot be built)'}")

    for names in (("pytest",), ("onnxruntime-gpu", "onnxruntime"), ("onnx",), ("transformers",), ("peft",), ("numpy",)):
        dist, version = version_of(*names)
        print(f"{names[-1]}: {dist + ' ' + version if version else 'MISSING'}")
        if names == ("pytest",) and version is None:
            failures.append("pytest is missing: the test stages cannot run")
    try:
        import onnxruntime

        print(
            f"onnxruntime providers: {', '.join(onnxruntime.get_available_providers())} "
            f"({os.path.dirname(onnxruntime.__file__)})"
        )
    except Exception as exc:  # noqa: BLE001 - reported, the ORT stages say what it means
        print(f"onnxruntime providers: onnxruntime does not import ({type(exc).__name__}: {exc})")
    include = os.environ.get("ONNXRUNTIME_INCLUDE_DIR", "")
    if include:
        ok = os.path.isfile(os.path.join(include, HEADER))
        print(
            f"ONNX Runtime headers: ONNXRUNTIME_INCLUDE_DIR={include} "
            f"({'C API ' + str(api_version(include)) if ok else 'holds no ' + HEADER})"
        )
        if not ok:
            fail(f"ONNXRUNTIME_INCLUDE_DIR={include} holds no {HEADER}")
    else:
        found = load_build_module("ort_library").find_headers(fetch=False)
        print(f"ONNX Runtime headers: {found.source or found.reason}")
        if not found.include_dir:
            fail(
                f"no ONNX Runtime headers: run `bash scripts/gpu_check.sh --prepare {args.dir}` on a machine with "
                f"a network and carry {args.dir}"
            )
        elif not dry:
            # the build would find them, but not from the prepared folder: say so, it is not an error
            print(f"  (not from {args.dir}: ONNXRUNTIME_INCLUDE_DIR unset)")
    manifest = read_manifest(args.dir)
    if manifest:
        ort = manifest.get("ort_gpu")
        print(
            f"prepared folder {args.dir}: made {manifest.get('created')}, wheels: "
            f"{', '.join(w['file'] for w in manifest.get('wheels', [])) or 'none'}, onnxruntime-gpu parts: "
            f"{len(ort['parts']) if ort else 'none'}"
        )
    else:
        print(f"prepared folder {args.dir}: {'no manifest' if os.path.isdir(args.dir) else 'absent'}")
    for key in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "LILY_EXT_ORT_FETCH", "CUDA_HOME"):
        print(f"{key}={os.environ.get(key, '')}")
    for message in notes:
        print(f"note (dry run, a GPU run would fail): {message}")
    for message in failures:
        print(f"FAIL: {message}")
    return 1 if failures else 0


# ---- wheels and onnxruntime-gpu -----------------------------------------------------------------


def pip_install(wheel, target):
    os.makedirs(target, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--no-compile",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--upgrade",
        "--target",
        target,
        wheel,
    ]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def install_wheels_main(args):
    wheels = sorted(glob.glob(os.path.join(args.dir, "wheels", "*.whl")))
    if not wheels:
        print("no prepared wheels")
        return 0
    for wheel in wheels:
        if pip_install(wheel, args.target) != 0:
            print(f"FAIL: installing {wheel}")
            return 1
    return 0


def ort_gpu_main(args):
    ort = read_manifest(args.dir).get("ort_gpu")
    if not ort:
        where = os.path.relpath(args.dir, ROOT) if os.path.abspath(args.dir).startswith(ROOT + os.sep) else args.dir
        print(
            f"skipped: no onnxruntime-gpu parts prepared (bash scripts/gpu_check.sh --prepare {where} "
            "--with-ort-gpu, then the calls it prints)"
        )
        return SKIP
    marker = os.path.join(args.target, ".lily_gpu_check_installed")
    if not args.verify_only and os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if f.read().strip() == ort["sha256"]:
                print(f"{ort['wheel']} already installed in {args.target}")
                return 0
    paths = [os.path.join(args.parts_dir, p["name"]) for p in ort["parts"]]
    missing = [
        os.path.basename(p)
        for p, rec in zip(paths, ort["parts"])
        if not os.path.isfile(p) or os.path.getsize(p) != rec["size"]
    ]
    if missing:
        print(f"{len(paths) - len(missing)} of {len(paths)} parts in {args.parts_dir}; missing: {', '.join(missing)}")
        print(
            f"skipped: onnxruntime-gpu {ort['version']}: {len(missing)} of {len(paths)} parts not here yet "
            "(each earlier call carries one part; see scripts/gpu_check.sh --help)"
        )
        return SKIP
    digest = sha256_files(paths)
    if digest != ort["sha256"]:
        bad = [rec["name"] for p, rec in zip(paths, ort["parts"]) if sha256_file(p) != rec["sha256"]]
        print(
            f"FAIL: the reassembled {ort['wheel']} has sha256 {digest}, expected {ort['sha256']}; "
            f"parts that differ: {', '.join(bad) or 'none (order?)'}"
        )
        return 1
    print(f"{len(paths)} parts present, sha256 of {ort['wheel']} ok")
    if args.verify_only:
        return 0
    wheel = os.path.join(args.parts_dir, ort["wheel"])
    with open(wheel, "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 8 * MiB)
    code = pip_install(wheel, args.target)
    os.remove(wheel)
    if code != 0:
        print(f"FAIL: pip install {ort['wheel']} exit {code}")
        return 1
    with open(marker, "w", encoding="utf-8") as f:
        f.write(ort["sha256"] + "\n")
    print(f"installed {ort['wheel']} into {args.target}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="collect the headers (and wheels) into DIR")
    p.add_argument("dir")
    p.add_argument("--with-ort-gpu", action="store_true", help="also download and split onnxruntime-gpu")
    p.add_argument("--ort-gpu-version", help="default: requirements.txt's pin")
    p.add_argument("--part-mib", type=int, default=56, help="largest part, MiB (default 56)")
    p.add_argument("--parts-dir", help="default: .gpu_parts beside DIR")
    p.add_argument("--wheel", action="append", default=[], help="another wheel (NAME==VERSION) to carry in DIR/wheels")
    e = sub.add_parser("env", help="print the environment, fail on what breaks the run")
    e.add_argument("--dir", required=True)
    e.add_argument("--dry-run", action="store_true")
    w = sub.add_parser("install-wheels", help="install DIR/wheels/*.whl into a target folder")
    w.add_argument("--dir", required=True)
    w.add_argument("--target", required=True)
    o = sub.add_parser("ort-gpu", help="reassemble, check and install the onnxruntime-gpu parts")
    o.add_argument("--dir", required=True)
    o.add_argument("--parts-dir", required=True)
    o.add_argument("--target", required=True)
    o.add_argument("--verify-only", action="store_true")
    args = parser.parse_args(argv)
    return {"prepare": prepare_main, "env": env_main, "install-wheels": install_wheels_main, "ort-gpu": ort_gpu_main}[
        args.command
    ](args)


if __name__ == "__main__":
    sys.exit(main())
