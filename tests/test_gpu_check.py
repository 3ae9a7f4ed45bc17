"""scripts/gpu_check.sh without a GPU: its dry run, --prepare, the env stage's fail-fast, the
onnxruntime-gpu parts protocol, and the sanitizer cases' coverage.

The dry run is what CI runs so that a broken stage, a missing file or an incompatibility in the
script's own Python shows up before a GPU is lent.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = [
    "env",
    "build",
    "memcheck",
    "racecheck",
    "tests",
    "bench_ops",
    "bench_cuda",
    "ort_gpu",
    "ort_cuda_tests",
    "bench_ort_cuda",
]


def load_script_module(name):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path, *args, env=None, timeout=600):
    environment = dict(
        os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work")
    )
    environment.update(env or {})
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout
    )


def stage_rows(summary):
    """{stage: status} from the summary's table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] in STAGES:
            rows[cells[0]] = cells[1]
    return rows


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_dry_run(tmp_path):
    """Every stage runs (or says why not) on a CPU machine; exit 0; at most 8 files for the device's $OUT."""
    proc = run_check(tmp_path, "--dry-run", "--dir", str(tmp_path / "prepared"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("# lily_ext GPU check (dry run)")
    assert proc.stdout.rstrip().endswith(summary.rstrip()), "the summary is printed last"
    rows = stage_rows(summary)
    assert list(rows) == STAGES, summary
    for name, status in rows.items():
        assert status.startswith(("ok", "skipped")), f"{name}: {status}"
    assert rows["memcheck"].startswith("ok"), "the sanitizer cases run on the CPU in a dry run"
    assert rows["tests"] == "ok" and rows["ort_cuda_tests"] == "ok"
    out_files = sorted(os.listdir(tmp_path / "out"))
    assert "logs.tar.gz" in out_files and len(out_files) <= 8, out_files


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build: no CUDA major to mismatch")
def test_env_fails_fast_on_cuda_major_mismatch(tmp_path):
    """A GPU run stops after the env stage when nvcc's CUDA major differs from torch's (a fake nvcc
    first on PATH) or the headers are missing; every later stage is listed as skipped."""
    major = int(torch.version.cuda.split(".")[0])
    toolkit = tmp_path / "fake-cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(
        f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
        f"echo 'Cuda compilation tools, release {major - 1}.8, V{major - 1}.8.93'\n"
    )
    nvcc.chmod(0o755)
    empty = tmp_path / "no-headers"
    empty.mkdir()
    env = {"PATH": f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}", "ONNXRUNTIME_INCLUDE_DIR": str(empty)}
    for var in ("CUDA_HOME", "CUDA_PATH"):
        env[var] = ""  # an empty value counts as unset for the toolkit lookup
    proc = run_check(tmp_path, "--dir", str(tmp_path / "prepared"), env=env, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"FAIL: CUDA major mismatch: nvcc {major - 1}.8" in summary, summary
    assert "holds no onnxruntime_c_api.h" in summary, summary
    rows = stage_rows(summary)
    assert list(rows) == STAGES and rows["env"].startswith("FAILED"), summary
    assert all(status.startswith("skipped: the env stage failed") for name, status in rows.items() if name != "env")
    assert not (tmp_path / "work" / "build.log").exists(), "nothing was built"


def test_prepare_headers(tmp_path):
    """--prepare DIR copies the ONNX Runtime headers and writes the manifest (no wheel: small)."""
    found = subprocess.run(
        [sys.executable, os.path.join(ROOT, "lily_ext", "_build", "ort_library.py"), "--no-fetch"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        pytest.skip(f"no ONNX Runtime headers on this machine without fetching: {found.stdout.strip()}")
    include = found.stdout.splitlines()[0]
    target = tmp_path / "prepared"
    proc = subprocess.run(
        ["bash", SCRIPT, "--prepare", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable, ONNXRUNTIME_INCLUDE_DIR=include),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "onnxruntime-include" / "onnxruntime_c_api.h").read_bytes() == open(
        os.path.join(include, "onnxruntime_c_api.h"), "rb"
    ).read()
    manifest = json.loads((target / "manifest.json").read_text())
    headers = manifest["onnxruntime_headers"]
    assert headers["dir"] == "onnxruntime-include" and headers["api_version"] >= 1 and len(headers["sha256"]) == 64
    assert manifest["wheels"] == [] and "ort_gpu" not in manifest
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    assert size < 5 << 20, f"the prepared folder must stay small: {size} bytes"
    assert not (tmp_path / ".gpu_parts").exists()
    assert 'carry ["' in proc.stdout, "prepare prints the device call"


def make_wheel(path):
    """A minimal pure-Python wheel (pip installs it offline)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("lily_demo_pkg/__init__.py", "VALUE = 42\n" + "# padding\n" * 200)
        z.writestr("lily_demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: lily-demo-pkg\nVersion: 1.0\n")
        z.writestr(
            "lily_demo_pkg-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("lily_demo_pkg-1.0.dist-info/RECORD", "")


def test_ort_gpu_parts_protocol(tmp_path):
    """The parts of a split wheel: skipped while some are missing, refused when one is corrupt,
    reassembled, checked and installed (--no-index) once all are there, not reinstalled after."""
    tools = load_script_module("gpu_check_tools")
    prepared, parts_dir, target = tmp_path / "prepared", tmp_path / "parts", tmp_path / "site"
    prepared.mkdir()
    parts_dir.mkdir()
    wheel = tmp_path / "lily_demo_pkg-1.0-py3-none-any.whl"
    make_wheel(wheel)
    parts = tools.split_file(str(wheel), str(parts_dir), 700)
    assert len(parts) >= 2 and all(p["size"] <= 700 for p in parts)
    assert sum(p["size"] for p in parts) == wheel.stat().st_size
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (prepared / "manifest.json").write_text(
        json.dumps(
            {
                "ort_gpu": {
                    "version": "1.0",
                    "wheel": wheel.name,
                    "sha256": digest,
                    "bytes": wheel.stat().st_size,
                    "parts_dir": str(parts_dir),
                    "parts": parts,
                }
            }
        )
    )

    def ort_gpu(*extra):
        return subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "scripts", "gpu_check_tools.py"),
                "ort-gpu",
                "--dir",
                str(prepared),
                "--parts-dir",
                str(parts_dir),
                "--target",
                str(target),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

    last = parts_dir / parts[-1]["name"]
    kept = last.read_bytes()
    last.unlink()
    proc = ort_gpu()
    assert proc.returncode == 77 and proc.stdout.strip().splitlines()[-1].startswith("skipped: "), proc.stdout
    assert f"{len(parts) - 1} of {len(parts)} parts" in proc.stdout
    last.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))
    proc = ort_gpu()
    assert proc.returncode == 1 and parts[-1]["name"] in proc.stdout, proc.stdout
    last.write_bytes(kept)
    assert ort_gpu("--verify-only").returncode == 0 and not target.exists()
    proc = ort_gpu()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "lily_demo_pkg" / "__init__.py").is_file()
    assert not (parts_dir / wheel.name).exists(), "the reassembled wheel is removed after the install"
    assert "already installed" in ort_gpu().stdout


def test_no_prepared_parts_is_a_skip(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "gpu_check_tools.py"),
            "ort-gpu",
            "--dir",
            str(tmp_path),
            "--parts-dir",
            str(tmp_path),
            "--target",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 77 and "skipped: no onnxruntime-gpu parts prepared" in proc.stdout


def test_sanitizer_cases_cover_every_mode_dtype_and_kernel_path():
    sanitize = load_script_module("gpu_sanitize")
    runs = list(sanitize.expand_cases())
    pairs = {(mode, dtype) for _, _, _, _, _, mode, dtype, _, _ in runs}
    assert pairs == {(m, d) for m in sanitize.ALL_MODES for d in sanitize.ALL_DTYPES}
    shapes = {(lead, E, r, out) for _, lead, E, r, out, *_ in runs}
    # the review's list: kron tensor-core vector / scalar, small-N split-K, batched cuBLAS + grouped backward
    assert {((300,), 4, 16, 136), ((65,), 3, 12, 70), ((7,), 4, 16, 24), ((3, 70), 2, 9, 300)} <= shapes
    kron = {(lead, dtype) for _, lead, _, _, _, mode, dtype, _, env in runs if mode == "token" and not env}
    assert {((300,), "float16"), ((300,), "bfloat16"), ((65,), "float16"), ((65,), "bfloat16")} <= kron
    assert any(masked for *_, masked, _ in runs) and any("LILY_CUDA_KRON" in env for *_, env in runs)
