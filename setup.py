"""Builds lily_ext._C, the torch op library, with torch.utils.cpp_extension.

Environment:
  LILY_EXT_CUDA=0|1       force the CUDA kernels off / on (default: on when a CUDA
                          toolkit and a CUDA build of torch are both present, GPU or not)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default: the visible GPU's, else 9.0)
  CUDA_HOME               CUDA toolkit (default: resolved from the real nvcc on PATH)
  MAX_JOBS                parallel compile jobs (ninja)
  LILY_EXT_ORT=0|1        skip / require the ONNX Runtime custom-op library (default: built when
                          ORT C API headers are found or fetched, see lily_ext/_ort_build.py)
  ONNXRUNTIME_INCLUDE_DIR directory holding onnxruntime_c_api.h
LILY_EXT_CUDA and TORCH_CUDA_ARCH_LIST also govern the ONNX Runtime library's CUDA EP kernels.
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else "unknown"


# Headers the CUDA sources need beyond the runtime's: cuBLAS for the kernels,
# and what torch's ATen/cuda/CUDAContextLight.h includes for the binding.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def _nvidia_wheel_roots():
    """Folders of the nvidia-* pip wheels torch depends on (nvidia/cu13/..., nvidia/cublas/...)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []


def find_cuda_libraries(cuda_home):
    """(extra include dirs, library dir, link flag) for cuBLAS.

    A full toolkit has everything under cuda_home; a pip-assembled one (nvcc and the
    runtime only) lacks cuBLAS, which then comes from the nvidia wheels torch itself
    loads. Those ship only versioned libraries (libcublas.so.13), linked by file name;
    at run time the SONAME resolves to the copy torch has already loaded.
    """
    toolkit_inc = os.path.join(cuda_home, "include")
    wheel_dirs = [d for root in _nvidia_wheel_roots() for d in sorted(glob.glob(os.path.join(root, "*")))]
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
            raise SystemExit(f"lily_ext: {header} not found in {toolkit_inc} or the nvidia pip wheels (set CUDA_HOME)")
    lib_dirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")]
    lib_dirs += [os.path.join(d, "lib") for d in wheel_dirs]
    for d in lib_dirs:
        if os.path.exists(os.path.join(d, "libcublas.so")):
            return includes, d, "-lcublas"
        versioned = sorted(glob.glob(os.path.join(d, "libcublas.so.[0-9]*")), key=len)
        if versioned:
            return includes, d, "-l:" + os.path.basename(versioned[0])
    raise SystemExit("lily_ext: libcublas not found in the CUDA toolkit or the nvidia pip wheels (set CUDA_HOME)")


def cuda_plan():
    """(use_cuda, cuda_home, reason)."""
    import torch

    wanted = os.environ.get("LILY_EXT_CUDA", "").strip()
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"LILY_EXT_CUDA must be 0 or 1, got {wanted!r}")
    if wanted == "0":
        return False, None, "disabled by LILY_EXT_CUDA=0"
    cuda_home = find_cuda_home()
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME)"
    if problem and wanted == "1":
        raise SystemExit(f"LILY_EXT_CUDA=1 but {problem}")
    return problem is None, cuda_home, problem or "CUDA toolkit at " + cuda_home


def default_arch_list():
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def build_extensions():
    use_cuda, cuda_home, reason = cuda_plan()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    print(f"lily_ext: CUDA kernels {'on' if use_cuda else 'off'} ({reason})")
    # The torch build takes its GEMMs from ATen, so the portable cpu_gemm.cpp (for ORT) stays out.
    sources = ["csrc/lily/cpu_primitives.cpp"] + sorted(glob.glob("csrc/torch/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    macros = []
    extension = CppExtension
    extra = {"cxx": cxx_flags}
    link_args = ["-fopenmp"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
        archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ",").replace(";", ",")
        print(f"lily_ext: CUDA archs {archs} (TORCH_CUDA_ARCH_LIST)")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/torch/cuda/*.cpp"))
        macros += [("LILY_WITH_CUDA", None), ("LILY_CUDA_ARCHS", archs), ("LILY_NVCC_VERSION", nvcc_version(cuda_home))]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"]
        includes, lib_dir, lib_flag = find_cuda_libraries(cuda_home)
        for inc in includes:  # after the toolkit's own -I, so its runtime headers win
            extra["cxx"] += ["-isystem", inc]
            extra["nvcc"] += ["-isystem", inc]
        link_args += [f"-L{lib_dir}", lib_flag, f"-Wl,-rpath,{lib_dir}"]
        print(f"lily_ext: cuBLAS {lib_flag[2:]} from {lib_dir}")
        extension = CUDAExtension
    ext = extension(
        name="lily_ext._C",
        sources=sources,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=link_args,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def with_ort_library(build_ext_class):
    """build_ext that afterwards builds the ONNX Runtime custom-op library (CMakeLists.txt,
    liblily_ort.so) into the package, or records why it could not; see lily_ext/_ort_build.py
    (LILY_EXT_ORT, ONNXRUNTIME_INCLUDE_DIR, LILY_EXT_ORT_FETCH)."""
    spec = importlib.util.spec_from_file_location("_lily_ort_build", os.path.join(ROOT, "lily_ext", "_ort_build.py"))
    ort_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ort_build)  # by path: the package itself cannot be imported before it is built

    class BuildExtWithOrt(build_ext_class):
        def run(self):
            super().run()
            if self.inplace:
                package_dirs = [os.path.join(ROOT, "lily_ext")]
            else:  # editable installs also read the package from the source tree
                package_dirs = [os.path.join(self.build_lib, "lily_ext")]
                if getattr(self, "editable_mode", False):
                    package_dirs.append(os.path.join(ROOT, "lily_ext"))
            # the CUDA EP kernels use the toolkit the torch extension would (LILY_EXT_CUDA=0: none)
            ort_build.build(ROOT, os.path.join(os.path.abspath(self.build_temp), "ort"), package_dirs,
                            cuda_home=find_cuda_home())

    return BuildExtWithOrt


ext_modules, cmdclass = build_extensions()
cmdclass["build_ext"] = with_ort_library(cmdclass["build_ext"])
setup(ext_modules=ext_modules, cmdclass=cmdclass)
