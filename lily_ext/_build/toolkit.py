"""Finding the CUDA toolkit and cuBLAS, for the torch extension (setup.py) and the ONNX Runtime
library (ort_library.py) alike. Standard library only."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess

# Headers the CUDA sources need beyond the runtime's: cuBLAS for the kernels,
# and what torch's ATen/cuda/CUDAContextLight.h includes for the binding.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def _toolkit_of_nvcc(nvcc):
    """The toolkit an nvcc really belongs to; wrapper scripts are followed by asking nvcc itself."""
    try:
        dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
        text = dry.stdout + dry.stderr
    except (OSError, subprocess.SubprocessError):
        return None
    here = re.search(r"_HERE_=(\S+)", text)
    bin_dir = here.group(1) if here else os.path.dirname(os.path.realpath(nvcc))
    home = os.path.dirname(os.path.realpath(bin_dir))
    return home if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) else None


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the toolkit of the nvcc on PATH, else /usr/local/cuda*; None if none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = [_toolkit_of_nvcc(nvcc)] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def nvcc_version(cuda_home):
    """"13.0" for the toolkit's nvcc, or "unknown"."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def nvidia_wheel_dirs():
    """Folders of the nvidia-* pip wheels torch depends on (site-packages/nvidia/cu13, .../cublas)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [d for root in roots for d in sorted(glob.glob(os.path.join(root, "*")))]


def cublas_wheel_dirs():
    """The nvidia wheel folders that hold cuBLAS (include/cublas_v2.h or lib/libcublas.so*)."""
    return [d for d in nvidia_wheel_dirs()
            if os.path.isfile(os.path.join(d, "include", "cublas_v2.h")) or glob.glob(os.path.join(d, "lib", "libcublas.so*"))]


def find_cuda_libraries(cuda_home):
    """(extra include dirs, library dir, link flag) for cuBLAS; RuntimeError naming what is missing.

    A full toolkit has everything under cuda_home; a pip-assembled one (nvcc and the runtime only)
    lacks cuBLAS, which then comes from the nvidia wheels torch itself loads. Those ship only
    versioned libraries (libcublas.so.13), linked by file name; at run time the SONAME resolves to
    the copy torch has already loaded.
    """
    toolkit_inc = os.path.join(cuda_home, "include")
    wheel_dirs = nvidia_wheel_dirs()
    includes = []
    for header in CUDA_LIBRARY_HEADERS:
        if os.path.exists(os.path.join(toolkit_inc, header)):
            continue
        for d in wheel_dirs:
            inc = os.path.join(d, "include")
            if os.path.exists(os.path.join(inc, header)):
                if inc not in includes:
                    includes.append(inc)
                break
        else:
            raise RuntimeError(f"{header} not found in {toolkit_inc} or the nvidia pip wheels (set CUDA_HOME)")
    lib_dirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")]
    lib_dirs += [os.path.join(d, "lib") for d in wheel_dirs]
    for d in lib_dirs:
        if os.path.exists(os.path.join(d, "libcublas.so")):
            return includes, d, "-lcublas"
        versioned = sorted(glob.glob(os.path.join(d, "libcublas.so.[0-9]*")), key=len)
        if versioned:
            return includes, d, "-l:" + os.path.basename(versioned[0])
    raise RuntimeError("libcublas not found in the CUDA toolkit or the nvidia pip wheels (set CUDA_HOME)")
