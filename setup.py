"""Builds lily_ext._C, the torch op library, with torch.utils.cpp_extension.

Environment:
  LILY_EXT_CUDA=0|1       force the CUDA kernels off / on (default: on when a CUDA
                          toolkit and a CUDA build of torch are both present, GPU or not)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default: the visible GPU's, else 9.0)
  CUDA_HOME               CUDA toolkit (default: resolved from the real nvcc on PATH)
  MAX_JOBS                parallel compile jobs (ninja)
  LILY_EXT_ORT=0|1        skip / require the ONNX Runtime custom-op library (default: built when
                          ORT C API headers are found or fetched, see lily_ext/_build/ort_library.py)
  ONNXRUNTIME_INCLUDE_DIR directory holding onnxruntime_c_api.h
LILY_EXT_CUDA and TORCH_CUDA_ARCH_LIST also govern the ONNX Runtime library's CUDA EP kernels.
"""

import glob
import importlib
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_package():
    """lily_ext/_build (standard library only), loaded by path: the package itself cannot be
    imported before it is built."""
    directory = os.path.join(ROOT, "lily_ext", "_build")
    spec = importlib.util.spec_from_file_location(
        "_lily_ext_build", os.path.join(directory, "__init__.py"), submodule_search_locations=[directory]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{spec.name}.toolkit"), importlib.import_module(f"{spec.name}.ort_library")


toolkit, ort_library = _load_build_package()


def cuda_plan():
    """(use_cuda, cuda_home, reason)."""
    import torch

    wanted = os.environ.get("LILY_EXT_CUDA", "").strip()
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"LILY_EXT_CUDA must be 0 or 1, got {wanted!r}")
    if wanted == "0":
        return False, None, "disabled by LILY_EXT_CUDA=0"
    cuda_home = toolkit.find_cuda_home()
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
    # One CPU GEMM (cpu_gemm.cpp) for the torch op and the ORT op: thread-count independent results.
    sources = ["csrc/lily/cpu_gemm.cpp", "csrc/lily/cpu_primitives.cpp"] + sorted(glob.glob("csrc/torch/*.cpp"))
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
        macros += [
            ("LILY_WITH_CUDA", None),
            ("LILY_CUDA_ARCHS", archs),
            ("LILY_NVCC_VERSION", toolkit.nvcc_version(cuda_home)),
        ]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"]
        try:
            includes, lib_dir, lib_flag = toolkit.find_cuda_libraries(cuda_home)
        except RuntimeError as exc:
            raise SystemExit(f"lily_ext: {exc}") from exc
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
    liblily_ort.so) into the package, or records why it could not; see lily_ext/_build/ort_library.py
    (LILY_EXT_ORT, ONNXRUNTIME_INCLUDE_DIR, LILY_EXT_ORT_FETCH)."""

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
            ort_library.build(
                ROOT,
                os.path.join(os.path.abspath(self.build_temp), "ort"),
                package_dirs,
                cuda_home=toolkit.find_cuda_home(),
            )

    return BuildExtWithOrt


ext_modules, cmdclass = build_extensions()
cmdclass["build_ext"] = with_ort_library(cmdclass["build_ext"])
setup(ext_modules=ext_modules, cmdclass=cmdclass)
