"""The ORT library's build plumbing (lily_ext/ort_library.py, lily_ext/ort.py) without network,
CMake or a real ONNX Runtime: header discovery order, the build record, the errors users see."""

import json
import os

import pytest

from lily_ext import ort
from lily_ext._build import ort_library, toolkit


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No system headers, an empty cache, no network fetch, no env overrides."""
    monkeypatch.setattr(ort_library, "SYSTEM_DIRS", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("ONNXRUNTIME_INCLUDE_DIR", "LILY_EXT_ORT", "LILY_EXT_ORT_FETCH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ort_library, "fetch_debian_headers", lambda: (None, "fetch disabled in this test"))
    return tmp_path


def fake_headers(directory, api=21):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ort_library.HEADER), "w") as f:
        f.write(f"#pragma once\n#define ORT_API_VERSION {api}\n")
    return str(directory)


def test_env_dir_comes_first(isolated, monkeypatch):
    system = fake_headers(isolated / "system")
    monkeypatch.setattr(ort_library, "SYSTEM_DIRS", [system])
    env = fake_headers(isolated / "env", api=17)
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", env)
    found = ort_library.find_headers()
    assert found.include_dir == env and "ONNXRUNTIME_INCLUDE_DIR" in found.source
    assert ort_library.api_version(env) == 17


def test_env_dir_without_header_is_reported_not_skipped(isolated, monkeypatch):
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", str(isolated))
    found = ort_library.find_headers()
    assert found.include_dir is None and "holds no onnxruntime_c_api.h" in found.reason


def test_system_then_newest_cache(isolated, monkeypatch):
    root = ort_library.cache_root()
    fake_headers(os.path.join(root, "1.17.0", "include"))
    newest = fake_headers(os.path.join(root, "1.21.0", "include"))
    assert ort_library.find_headers().include_dir == newest
    system = fake_headers(isolated / "usr_include")
    monkeypatch.setattr(ort_library, "SYSTEM_DIRS", [system])
    assert ort_library.find_headers().source == f"system install {system}"


def test_nothing_found_says_why(isolated, monkeypatch):
    found = ort_library.find_headers()
    assert found.include_dir is None and "fetch disabled in this test" in found.reason
    monkeypatch.setenv("LILY_EXT_ORT_FETCH", "0")
    assert "LILY_EXT_ORT_FETCH=0" in ort_library.find_headers().reason


def test_build_without_headers_records_the_reason_and_removes_a_stale_library(isolated):
    package = isolated / "pkg"
    package.mkdir()
    (package / ort_library.LIBRARY_NAME).write_bytes(b"old")
    record = ort_library.build(str(isolated), str(isolated / "build"), [str(package)])
    assert record["library"] is None and "fetch disabled" in record["reason"]
    assert not (package / ort_library.LIBRARY_NAME).exists()
    assert json.loads((package / ort_library.RECORD_NAME).read_text()) == record


def test_build_switches(isolated, monkeypatch):
    monkeypatch.setenv("LILY_EXT_ORT", "0")
    record = ort_library.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")])
    assert record["reason"] == "disabled by LILY_EXT_ORT=0 at build time"
    monkeypatch.setenv("LILY_EXT_ORT", "1")
    with pytest.raises(SystemExit, match="LILY_EXT_ORT=1 but ONNX Runtime library NOT built"):
        ort_library.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")])
    monkeypatch.setenv("LILY_EXT_ORT", "yes")
    with pytest.raises(SystemExit, match="LILY_EXT_ORT must be 0 or 1"):
        ort_library.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")])


def test_missing_library_error_carries_the_build_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(ort, "_RECORD", str(tmp_path / ort_library.RECORD_NAME))
    path, reason = ort.library_status()
    assert path is None and "left no record" in reason
    (tmp_path / ort_library.RECORD_NAME).write_text(json.dumps({"library": None, "reason": "no headers anywhere"}))
    with pytest.raises(FileNotFoundError, match="is not built: no headers anywhere"):
        ort.ort_library_path()


# ---- the CUDA execution provider part ----


def test_cmake_cuda_archs():
    assert ort_library.cmake_cuda_archs("") == "90"
    assert ort_library.cmake_cuda_archs("9.0") == "90"
    assert ort_library.cmake_cuda_archs("8.0;8.6 9.0a+PTX,8.0") == "80;86;90a"
    with pytest.raises(ValueError, match="cannot read 'Ampere'"):
        ort_library.cmake_cuda_archs("8.0;Ampere")


def fake_toolkit(root):
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    with open(os.path.join(root, "bin", "nvcc"), "w") as f:
        f.write("#!/bin/sh\n")
    return str(root)


def test_cuda_plan(isolated, monkeypatch):
    for var in ("LILY_EXT_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(toolkit, "cublas_wheel_dirs", lambda: ["/wheels/cu13"])
    home = fake_toolkit(isolated / "cuda")
    args, why_not = ort_library.cuda_plan(home)
    assert why_not is None
    assert "-DLILY_ORT_CUDA=ON" in args and "-DCMAKE_CUDA_ARCHITECTURES=90" in args
    assert f"-DCMAKE_CUDA_COMPILER={os.path.join(home, 'bin', 'nvcc')}" in args
    assert "-DLILY_CUDA_LIBRARY_HINTS=/wheels/cu13" in args
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;90" in ort_library.cuda_plan(home)[0]
    off = ["-DLILY_ORT_CUDA=OFF"]
    assert ort_library.cuda_plan(None) == (off, "no CUDA toolkit with nvcc found (CUDA_HOME unset)")
    assert "nvcc missing" in ort_library.cuda_plan(str(isolated))[1]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    assert "cannot read 'Hopper'" in ort_library.cuda_plan(home)[1]
    monkeypatch.setenv("LILY_EXT_CUDA", "0")
    assert ort_library.cuda_plan(home) == (off, "disabled by LILY_EXT_CUDA=0 at build time")


@pytest.fixture
def fake_cmake(isolated, monkeypatch):
    """Header discovery finds fake headers; cmake_build records its calls and fails CUDA builds when told."""
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", fake_headers(isolated / "headers"))
    monkeypatch.delenv("LILY_EXT_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(toolkit, "cublas_wheel_dirs", lambda: [])
    calls, state = [], {"cuda_fails": False}

    def cmake_build(source_dir, build_dir, include_dir, extra_args=()):
        calls.append((build_dir, list(extra_args)))
        if state["cuda_fails"] and "-DLILY_ORT_CUDA=ON" in extra_args:
            raise RuntimeError("nvcc exploded")
        os.makedirs(build_dir, exist_ok=True)
        names = [ort_library.LIBRARY_NAME] + (
            [ort_library.CUDA_LIBRARY_NAME] if "-DLILY_ORT_CUDA=ON" in extra_args else []
        )
        for name in names:
            with open(os.path.join(build_dir, name), "wb") as f:
                f.write(b"\x7fELF")
        return build_dir

    monkeypatch.setattr(ort_library, "cmake_build", cmake_build)
    return calls, state


def test_build_records_cuda_kernels(isolated, fake_cmake):
    calls, _ = fake_cmake
    record = ort_library.build(
        str(isolated), str(isolated / "build"), [str(isolated / "pkg")], cuda_home=fake_toolkit(isolated / "cuda")
    )
    assert record["library"] == ort_library.LIBRARY_NAME
    assert record["cuda"] is True and record["cuda_reason"] is None and record["cuda_archs"] == "90"
    assert len(calls) == 1 and "-DLILY_ORT_CUDA=ON" in calls[0][1]
    assert (isolated / "pkg" / ort_library.LIBRARY_NAME).exists() and (
        isolated / "pkg" / ort_library.CUDA_LIBRARY_NAME
    ).exists()


def test_build_falls_back_to_cpu_only_when_the_cuda_part_fails(isolated, fake_cmake):
    calls, state = fake_cmake
    state["cuda_fails"] = True
    record = ort_library.build(
        str(isolated), str(isolated / "build"), [str(isolated / "pkg")], cuda_home=fake_toolkit(isolated / "cuda")
    )
    assert record["library"] == ort_library.LIBRARY_NAME and record["reason"] is None
    assert record["cuda"] is False and "building the CUDA kernels failed: nvcc exploded" in record["cuda_reason"]
    assert [args for _, args in calls] == [calls[0][1], ["-DLILY_ORT_CUDA=OFF"]]
    assert calls[1][0] != calls[0][0], "the CPU-only retry configures a fresh build directory"
    assert (isolated / "pkg" / ort_library.LIBRARY_NAME).exists()
    assert not (isolated / "pkg" / ort_library.CUDA_LIBRARY_NAME).exists()


def test_build_without_cuda(isolated, fake_cmake, monkeypatch):
    calls, _ = fake_cmake
    record = ort_library.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")], cuda_home=None)
    assert record["cuda"] is False and "no CUDA toolkit" in record["cuda_reason"]
    monkeypatch.setenv("LILY_EXT_CUDA", "0")
    record = ort_library.build(
        str(isolated), str(isolated / "build"), [str(isolated / "pkg")], cuda_home=fake_toolkit(isolated / "cuda")
    )
    assert record["cuda"] is False and record["cuda_reason"] == "disabled by LILY_EXT_CUDA=0 at build time"
    assert all(args == ["-DLILY_ORT_CUDA=OFF"] for _, args in calls)


def test_build_with_cuda_required(isolated, fake_cmake, monkeypatch):
    _, state = fake_cmake
    monkeypatch.setenv("LILY_EXT_CUDA", "1")
    with pytest.raises(SystemExit, match="LILY_EXT_CUDA=1 but liblily_ort.so cannot have CUDA kernels"):
        ort_library.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")], cuda_home=None)
    state["cuda_fails"] = True
    with pytest.raises(SystemExit, match="LILY_EXT_CUDA=1 but liblily_ort.so's building the CUDA kernels failed"):
        ort_library.build(
            str(isolated), str(isolated / "build"), [str(isolated / "pkg")], cuda_home=fake_toolkit(isolated / "cuda")
        )


def test_library_record_and_cuda_flag(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(ort, "_RECORD", str(tmp_path / ort_library.RECORD_NAME))
    assert ort.library_record() == {} and ort.library_has_cuda() is False
    (tmp_path / ort_library.RECORD_NAME).write_text(json.dumps({"library": "liblily_ort.so", "cuda": True}))
    assert ort.library_has_cuda() is False, "no library file: no CUDA kernels either"
    (tmp_path / ort_library.LIBRARY_NAME).write_bytes(b"\x7fELF")
    assert ort.library_has_cuda() is False, "the CPU library alone has no CUDA kernels"
    (tmp_path / ort_library.CUDA_LIBRARY_NAME).write_bytes(b"\x7fELF")
    assert ort.library_has_cuda() is True
    assert ort.ort_library_path(cuda=True).endswith(ort_library.CUDA_LIBRARY_NAME)
    assert ort.ort_library_path().endswith(ort_library.LIBRARY_NAME)
