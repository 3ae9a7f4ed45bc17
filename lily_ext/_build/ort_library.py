"""Finds ONNX Runtime C API headers and builds liblily_ort.so with CMake; used by setup.py.

Standard library only (imports neither torch nor lily_ext), so setup.py loads it by path before
anything is built. ``python lily_ext/_build/ort_library.py`` prints where the headers are.

ONNX Runtime's Python wheels ship no C headers. They are looked for, in order:

1. ``$ONNXRUNTIME_INCLUDE_DIR`` (the directory holding ``onnxruntime_c_api.h``);
2. a system install: ``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``, ...;
3. the cache ``~/.cache/lily_ext/onnxruntime-headers/<version>/include`` (``$XDG_CACHE_HOME``
   is honoured), filled by step 4 of an earlier build;
4. Debian's ``libonnxruntime-dev`` package, fetched with the machine's own apt client and unpacked
   with ``dpkg -x`` into the cache (never installed): first from the suites apt is configured
   with, then, on an older Debian release that lacks the package (bookworm), from the release
   that has it (trixie: ONNX Runtime 1.21) on the same mirrors apt is configured with. That
   lookup uses a private apt state in a temporary directory: nothing under /etc/apt or
   /var/lib/apt changes. The C API is backward compatible: 1.21 headers serve newer runtimes.

When none works the package is built without the ORT library, and
``lily_ext.build_info()["onnxruntime_library_reason"]`` says why.

CUDA execution provider kernels go into the same library when a CUDA toolkit with nvcc is found
(setup.py passes the one it found): the csrc/cuda kernels for ``TORCH_CUDA_ARCH_LIST`` (default
9.0), cuBLAS from the toolkit or else from the nvidia pip wheels (their directories are passed to
CMake as ``LILY_CUDA_LIBRARY_HINTS``). When that part fails to build, the library is built again
without it (CPU EP only) and ``build_info()["onnxruntime_library_cuda_reason"]`` says why.

Environment: ``LILY_EXT_ORT=0`` skips the library, ``LILY_EXT_ORT=1`` makes its absence a build
error; ``LILY_EXT_ORT_FETCH=0`` skips the network step (4). ``LILY_EXT_CUDA=0`` leaves the CUDA
kernels out, ``LILY_EXT_CUDA=1`` makes their absence a build error.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    from . import toolkit
    from .atomic import atomic_directory
except ImportError:  # run as a script: python lily_ext/_build/ort_library.py
    import toolkit
    from atomic import atomic_directory

LIBRARY_NAME = "liblily_ort.so"  # CPU execution provider; needs nothing but libc / libstdc++
CUDA_LIBRARY_NAME = "liblily_ort_cuda.so"  # CPU and CUDA execution providers; needs cuBLAS
RECORD_NAME = "_ort_build.json"  # what the build did, read by lily_ext.build_info()
HEADER = "onnxruntime_c_api.h"
DEB_PACKAGE = "libonnxruntime-dev"
# Debian releases in order; the first that ships libonnxruntime-dev is trixie.
DEBIAN_RELEASES = ["buster", "bullseye", "bookworm", "trixie"]
FIRST_DEBIAN_WITH_ORT = "trixie"
SYSTEM_DIRS = ["/usr/include/onnxruntime", "/usr/local/include/onnxruntime", "/usr/include", "/usr/local/include"]


class Headers:
    """Where the headers are (``include_dir``, ``source``), or why none were found (``reason``)."""

    def __init__(self, include_dir=None, source=None, reason=None):
        self.include_dir, self.source, self.reason = include_dir, source, reason

    def __repr__(self):
        return f"Headers(include_dir={self.include_dir!r}, source={self.source!r}, reason={self.reason!r})"


def log(message):
    print(f"lily_ext: {message}", flush=True)


def has_header(directory):
    return bool(directory) and os.path.isfile(os.path.join(directory, HEADER))


def api_version(include_dir):
    """ORT_API_VERSION of a header set (21 for ONNX Runtime 1.21), or None."""
    try:
        with open(os.path.join(include_dir, HEADER), encoding="utf-8", errors="replace") as f:
            match = re.search(r"^#define ORT_API_VERSION (\d+)", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def cache_root():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lily_ext", "onnxruntime-headers")


def _version_key(name):
    return [int(p) if p.isdigit() else 0 for p in re.split(r"[.+~-]", name)]


def cached_headers():
    """Newest header set in the cache, or None."""
    found = [d for d in glob.glob(os.path.join(cache_root(), "*", "include")) if has_header(d)]
    found.sort(key=lambda d: _version_key(os.path.basename(os.path.dirname(d))))
    return found[-1] if found else None


def _run(cmd, cwd=None, timeout=300):
    """(returncode, combined output); a missing program or a timeout is a failure, not an exception."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return 1, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


def _os_release():
    fields = {}
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                fields[key] = value.strip('"')
    except OSError:
        pass
    return fields


def _configured_debian_mirrors(codename):
    """Archive URIs apt is configured with for the Debian release `codename` (not -security, -updates)."""
    code, out = _run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(TARGET_OF)"], timeout=60)
    if code != 0:
        return []
    mirrors = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == codename and parts[2] == "deb" and parts[0] not in mirrors:
            mirrors.append(parts[0])
    return mirrors


def _apt_download(workdir, extra_sources=None):
    """Runs `apt-get download libonnxruntime-dev` in workdir; with extra_sources, against a private
    apt state that holds the machine's sources plus those lines. Returns (.deb path or None, log)."""
    cmd = ["apt-get", "-q"]
    steps = []
    if extra_sources is not None:
        state = os.path.join(workdir, "apt")
        parts = os.path.join(state, "sources.list.d")
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
            os.makedirs(os.path.join(state, sub), exist_ok=True)
        # the machine's own sources, as configured, plus the extra lines
        for src in glob.glob("/etc/apt/sources.list.d/*.list") + glob.glob("/etc/apt/sources.list.d/*.sources"):
            shutil.copy(src, parts)
        if os.path.isfile("/etc/apt/sources.list"):
            shutil.copy("/etc/apt/sources.list", os.path.join(parts, "00-system.list"))
        if extra_sources:
            with open(os.path.join(parts, "zz-lily-ext.list"), "w", encoding="utf-8") as f:
                f.write("\n".join(extra_sources) + "\n")
        cmd += [
            "-o", f"Dir::Etc::SourceList={os.path.join(state, 'none.list')}",
            "-o", f"Dir::Etc::SourceParts={parts}",
            "-o", f"Dir::State::Lists={os.path.join(state, 'lists')}",
            "-o", f"Dir::Cache={os.path.join(state, 'cache')}",
            "-o", "Debug::NoLocking=1",
        ]
        if os.geteuid() == 0:
            cmd += ["-o", "APT::Sandbox::User=root"]  # the private dirs are not _apt's
        code, out = _run(cmd + ["update"], cwd=workdir)
        steps.append(f"`apt-get update` (private state) exit {code}: {_last_lines(out)}")
    code, out = _run(cmd + ["download", DEB_PACKAGE], cwd=workdir)
    steps.append(f"`apt-get download {DEB_PACKAGE}`{' (private state)' if extra_sources is not None else ''} "
                 f"exit {code}: {_last_lines(out)}")
    debs = glob.glob(os.path.join(workdir, f"{DEB_PACKAGE}_*.deb"))
    return (debs[0] if code == 0 and debs else None), "; ".join(steps)


def _last_lines(text, count=2):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "no output"


def _unpack_to_cache(deb):
    """Unpacks the headers of a libonnxruntime-dev .deb into the cache; returns the include dir."""
    version = os.path.basename(deb).split("_")[1].split("+")[0].split("-")[0]
    target = os.path.join(cache_root(), version)
    include = os.path.join(target, "include")
    with tempfile.TemporaryDirectory() as tmp:
        code, out = _run(["dpkg", "-x", deb, tmp])
        if code != 0:
            raise RuntimeError(f"dpkg -x {deb} failed: {out.strip()}")
        found = glob.glob(os.path.join(tmp, "usr", "include", "**", HEADER), recursive=True)
        if not found:
            raise RuntimeError(f"{os.path.basename(deb)} holds no {HEADER}")
        if has_header(include):  # a concurrent build got there first
            return include
        with atomic_directory(target) as staging:  # an interrupted unpack leaves no half-written cache
            os.chmod(staging, 0o755)
            shutil.copytree(os.path.dirname(found[0]), os.path.join(staging, "include"))
            for doc in glob.glob(os.path.join(tmp, "usr", "share", "doc", DEB_PACKAGE, "copyright")):
                shutil.copy(doc, staging)  # the headers' licence travels with them
            with open(os.path.join(staging, "SOURCE"), "w", encoding="utf-8") as f:
                f.write(f"Debian package {os.path.basename(deb)}, unpacked with dpkg -x\n")
    return include


def _newer_debian_sources():
    """apt lines for the first Debian release that ships the package, on the mirrors apt is
    configured with, when this machine runs an older Debian; ([], "") otherwise."""
    osr = _os_release()
    codename = osr.get("VERSION_CODENAME", "")
    if osr.get("ID") != "debian" or codename not in DEBIAN_RELEASES:
        return [], ""
    if DEBIAN_RELEASES.index(codename) >= DEBIAN_RELEASES.index(FIRST_DEBIAN_WITH_ORT):
        return [], ""
    mirrors = _configured_debian_mirrors(codename)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"[signed-by={keyring}] " if os.path.isfile(keyring) else ""
    lines = [f"deb {signed}{m} {FIRST_DEBIAN_WITH_ORT} main" for m in mirrors]
    return lines, f" plus Debian {FIRST_DEBIAN_WITH_ORT} on the configured mirror(s) {', '.join(mirrors)}" if lines else ""


def fetch_debian_headers():
    """Step 4. Returns (include_dir, source) or (None, reason)."""
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        return None, "no apt-get/dpkg on this machine to fetch Debian's libonnxruntime-dev"
    attempts = []
    with tempfile.TemporaryDirectory() as work:
        deb, steps = _apt_download(work)  # the package lists apt already has
        attempts.append(steps)
        if deb:
            return _unpack_to_cache(deb), f"Debian {os.path.basename(deb)} (apt-get download, the machine's apt lists)"
    # Fresh lists of the machine's own sources (and of a newer Debian release when this one lacks
    # the package), in a private apt state.
    extra, where = _newer_debian_sources()
    with tempfile.TemporaryDirectory() as work:
        deb, steps = _apt_download(work, extra)
        attempts.append(steps)
        if deb:
            return _unpack_to_cache(deb), (
                f"Debian {os.path.basename(deb)} (apt-get download with a private apt state: the machine's "
                f"sources{where})"
            )
    return None, f"apt could not download {DEB_PACKAGE}: " + "; ".join(attempts)


def find_headers(fetch=None):
    """Steps 1-4 of the module docstring."""
    env = os.environ.get("ONNXRUNTIME_INCLUDE_DIR", "").strip()
    if env:
        if has_header(env):
            return Headers(env, f"ONNXRUNTIME_INCLUDE_DIR={env}")
        return Headers(reason=f"ONNXRUNTIME_INCLUDE_DIR={env} holds no {HEADER}")
    for directory in SYSTEM_DIRS:
        if has_header(directory):
            return Headers(directory, f"system install {directory}")
    cached = cached_headers()
    if cached:
        return Headers(cached, f"cache {cached}")
    if fetch is None:
        fetch = os.environ.get("LILY_EXT_ORT_FETCH", "1").strip() != "0"
    if not fetch:
        return Headers(reason=f"no {HEADER} found (ONNXRUNTIME_INCLUDE_DIR unset, none in {SYSTEM_DIRS} or "
                       f"{cache_root()}) and fetching is off (LILY_EXT_ORT_FETCH=0)")
    try:
        include_dir, note = fetch_debian_headers()
    except (OSError, RuntimeError) as exc:
        include_dir, note = None, f"fetching {DEB_PACKAGE} failed: {exc}"
    if include_dir:
        return Headers(include_dir, f"{note}, cached in {os.path.dirname(include_dir)}")
    return Headers(reason=f"no {HEADER} found (ONNXRUNTIME_INCLUDE_DIR unset, none in {SYSTEM_DIRS} or "
                   f"{cache_root()}); {note}")


def cmake_cuda_archs(arch_list):
    """``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0", "8.6 9.0a+PTX") as ``CMAKE_CUDA_ARCHITECTURES`` ("80;90",
    "86;90a"; each with its PTX); "" gives the default 90. ValueError for what it cannot read."""
    archs = []
    for item in re.split(r"[;,\s]+", arch_list.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.(\d)([a-z]?)(\+PTX)?", item, re.I)
        if match is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: cannot read {item!r} (expected e.g. 8.0, 9.0a, 8.6+PTX)")
        arch = match.group(1) + match.group(2) + match.group(3).lower()
        if arch not in archs:
            archs.append(arch)
    return ";".join(archs) or "90"


def cuda_plan(cuda_home):
    """CMake arguments for the CUDA EP kernels: (args, None) to build them, or (args turning them
    off, why). ``cuda_home``: the toolkit setup.py found (None: none)."""
    off = ["-DLILY_ORT_CUDA=OFF"]
    if os.environ.get("LILY_EXT_CUDA", "").strip() == "0":
        return off, "disabled by LILY_EXT_CUDA=0 at build time"
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not os.path.isfile(nvcc):
        return off, f"no CUDA toolkit with nvcc found ({'CUDA_HOME unset' if not cuda_home else nvcc + ' missing'})"
    try:
        archs = cmake_cuda_archs(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    except ValueError as exc:
        return off, str(exc)
    args = ["-DLILY_ORT_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={cuda_home}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
    hints = toolkit.cublas_wheel_dirs()
    if hints:
        args.append("-DLILY_CUDA_LIBRARY_HINTS=" + ";".join(hints))
    return args, None


def cmake_build(source_dir, build_dir, include_dir, extra_args=()):
    """Configures and builds the CMake project; returns the build directory (it holds LIBRARY_NAME
    and, with CUDA, CUDA_LIBRARY_NAME)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found on PATH (pip install cmake)")
    configure = [cmake, "-S", source_dir, "-B", build_dir, f"-DONNXRUNTIME_INCLUDE_DIR={include_dir}",
                 "-DCMAKE_BUILD_TYPE=Release", *extra_args]
    cache = os.path.join(build_dir, "CMakeCache.txt")
    if shutil.which("ninja") and not os.path.exists(cache):
        configure += ["-G", "Ninja"]
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    for cmd in (configure, [cmake, "--build", build_dir, "--parallel", jobs]):
        log(" ".join(cmd))
        code, out = _run(cmd, timeout=1800)
        if code != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{out[-4000:]}")
    if not os.path.isfile(os.path.join(build_dir, LIBRARY_NAME)):
        raise RuntimeError(f"the CMake build produced no {LIBRARY_NAME} in {build_dir}")
    return build_dir


def _build_with_cuda(source_dir, build_dir, include_dir, cuda_home, record):
    """cmake_build with the CUDA EP kernels when possible, else without; fills record["cuda*"]."""
    cuda_args, why_not = cuda_plan(cuda_home)
    required = os.environ.get("LILY_EXT_CUDA", "").strip() == "1"
    if why_not is None:
        try:
            built = cmake_build(source_dir, build_dir, include_dir, cuda_args)
            record["cuda"] = True
            record["cuda_archs"] = next(a.split("=", 1)[1] for a in cuda_args if a.startswith("-DCMAKE_CUDA_ARCHITECTURES="))
            log(f"{LIBRARY_NAME}: CUDA execution provider kernels built (archs {record['cuda_archs']})")
            return built
        except RuntimeError as exc:
            why_not = f"building the CUDA kernels failed: {exc}"
            if required:
                raise SystemExit(f"LILY_EXT_CUDA=1 but {LIBRARY_NAME}'s {why_not}") from exc
            log(f"{LIBRARY_NAME}: {why_not[:2000]}\nlily_ext: building {LIBRARY_NAME} again without CUDA")
            build_dir += "-cpu"  # a clean configure, untouched by the failed CUDA one
    elif required and "LILY_EXT_CUDA=0" not in why_not:
        raise SystemExit(f"LILY_EXT_CUDA=1 but {LIBRARY_NAME} cannot have CUDA kernels: {why_not}")
    record["cuda_reason"] = why_not
    log(f"{LIBRARY_NAME}: CPU execution provider only ({why_not[:300]})")
    return cmake_build(source_dir, build_dir, include_dir, ["-DLILY_ORT_CUDA=OFF"])


def build(source_dir, build_dir, package_dirs, cuda_home=None):
    """Builds liblily_ort.so into every directory of package_dirs (or records why not).

    ``cuda_home``: the CUDA toolkit to build the CUDA EP kernels with (None: none found).
    Returns the record written next to it as RECORD_NAME: {"library", "reason", "headers",
    "api_version", "cuda", "cuda_reason", "cuda_archs"}.
    """
    wanted = os.environ.get("LILY_EXT_ORT", "").strip()
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"LILY_EXT_ORT must be 0 or 1, got {wanted!r}")
    record = {"library": None, "reason": None, "headers": None, "api_version": None, "cuda": False,
              "cuda_reason": None, "cuda_archs": None}
    if wanted == "0":
        record["reason"] = "disabled by LILY_EXT_ORT=0 at build time"
    else:
        headers = find_headers()
        if headers.include_dir is None:
            record["reason"] = headers.reason
        else:
            record["headers"] = headers.source
            record["api_version"] = api_version(headers.include_dir)
            log(f"ONNX Runtime headers: {headers.source} (C API {record['api_version']})")
            try:
                built = _build_with_cuda(source_dir, build_dir, headers.include_dir, cuda_home, record)
                record["library"] = LIBRARY_NAME
            except RuntimeError as exc:
                record["reason"] = f"building {LIBRARY_NAME} failed: {exc}"
                record["cuda"] = False
    if record["library"] is None:
        message = f"ONNX Runtime library NOT built: {record['reason']}"
        if wanted == "1":
            raise SystemExit(f"LILY_EXT_ORT=1 but {message}")
        log(message)
    for directory in package_dirs:
        os.makedirs(directory, exist_ok=True)
        for name, wanted_here in ((LIBRARY_NAME, record["library"]), (CUDA_LIBRARY_NAME, record["library"] and record["cuda"])):
            target = os.path.join(directory, name)
            if wanted_here:
                shutil.copy2(os.path.join(built, name), target)
                log(f"{name} -> {directory}")
            elif os.path.exists(target):
                os.remove(target)  # never leave an older build behind a record saying "not built"
        with open(os.path.join(directory, RECORD_NAME), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    found = find_headers(fetch="--no-fetch" not in sys.argv)
    print(found.include_dir or f"not found: {found.reason}")
    if found.include_dir:
        print(f"source: {found.source}; C API version {api_version(found.include_dir)}")
    sys.exit(0 if found.include_dir else 1)
