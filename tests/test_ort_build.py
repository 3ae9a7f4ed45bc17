"""The ORT library's build plumbing (lily_ext/_ort_build.py, lily_ext/ort.py) without network,
CMake or a real ONNX Runtime: header discovery order, the build record, the errors users see."""

import json
import os

import pytest

from lily_ext import _ort_build, ort


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No system headers, an empty cache, no network fetch, no env overrides."""
    monkeypatch.setattr(_ort_build, "SYSTEM_DIRS", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("ONNXRUNTIME_INCLUDE_DIR", "LILY_EXT_ORT", "LILY_EXT_ORT_FETCH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_ort_build, "fetch_debian_headers", lambda: (None, "fetch disabled in this test"))
    return tmp_path


def fake_headers(directory, api=21):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, _ort_build.HEADER), "w") as f:
        f.write(f"#pragma once\n#define ORT_API_VERSION {api}\n")
    return str(directory)


def test_env_dir_comes_first(isolated, monkeypatch):
    system = fake_headers(isolated / "system")
    monkeypatch.setattr(_ort_build, "SYSTEM_DIRS", [system])
    env = fake_headers(isolated / "env", api=17)
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", env)
    found = _ort_build.find_headers()
    assert found.include_dir == env and "ONNXRUNTIME_INCLUDE_DIR" in found.source
    assert _ort_build.api_version(env) == 17


def test_env_dir_without_header_is_reported_not_skipped(isolated, monkeypatch):
    monkeypatch.setenv("ONNXRUNTIME_INCLUDE_DIR", str(isolated))
    found = _ort_build.find_headers()
    assert found.include_dir is None and "holds no onnxruntime_c_api.h" in found.reason


def test_system_then_newest_cache(isolated, monkeypatch):
    root = _ort_build.cache_root()
    fake_headers(os.path.join(root, "1.17.0", "include"))
    newest = fake_headers(os.path.join(root, "1.21.0", "include"))
    assert _ort_build.find_headers().include_dir == newest
    system = fake_headers(isolated / "usr_include")
    monkeypatch.setattr(_ort_build, "SYSTEM_DIRS", [system])
    assert _ort_build.find_headers().source == f"system install {system}"


def test_nothing_found_says_why(isolated, monkeypatch):
    found = _ort_build.find_headers()
    assert found.include_dir is None and "fetch disabled in this test" in found.reason
    monkeypatch.setenv("LILY_EXT_ORT_FETCH", "0")
    assert "LILY_EXT_ORT_FETCH=0" in _ort_build.find_headers().reason


def test_build_without_headers_records_the_reason_and_removes_a_stale_library(isolated):
    package = isolated / "pkg"
    package.mkdir()
    (package / _ort_build.LIBRARY_NAME).write_bytes(b"old")
    record = _ort_build.build(str(isolated), str(isolated / "build"), [str(package)])
    assert record["library"] is None and "fetch disabled" in record["reason"]
    assert not (package / _ort_build.LIBRARY_NAME).exists()
    assert json.loads((package / _ort_build.RECORD_NAME).read_text()) == record


def test_build_switches(isolated, monkeypatch):
    monkeypatch.setenv("LILY_EXT_ORT", "0")
    record = _ort_build.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")])
    assert record["reason"] == "disabled by LILY_EXT_ORT=0 at build time"
    monkeypatch.setenv("LILY_EXT_ORT", "1")
    with pytest.raises(SystemExit, match="LILY_EXT_ORT=1 but ONNX Runtime library NOT built"):
        _ort_build.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")])
    monkeypatch.setenv("LILY_EXT_ORT", "yes")
    with pytest.raises(SystemExit, match="LILY_EXT_ORT must be 0 or 1"):
        _ort_build.build(str(isolated), str(isolated / "build"), [str(isolated / "pkg")])


def test_missing_library_error_carries_the_build_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.setattr(ort, "_RECORD", str(tmp_path / _ort_build.RECORD_NAME))
    path, reason = ort.library_status()
    assert path is None and "left no record" in reason
    (tmp_path / _ort_build.RECORD_NAME).write_text(json.dumps({"library": None, "reason": "no headers anywhere"}))
    with pytest.raises(FileNotFoundError, match="is not built: no headers anywhere"):
        ort.ort_library_path()
