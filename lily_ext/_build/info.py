"""What this installation was built with."""

import platform

import torch

from . import library as _library
from ..ort import CUDA_LIBRARY_NAME, library_has_cuda
from ..ort import library_record as _ort_library_record
from ..ort import library_status as _ort_library_status


def build_info() -> dict:
    """Torch version, compiled CUDA kernels and archs, compiler versions, library paths."""
    ort_library, ort_reason = _ort_library_status()
    ort_record = _ort_library_record()
    fields = dict(item.split("=", 1) for item in torch.ops.lily.build_info().split(";"))
    cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("lily::routed_mix", "CUDA")
    return {
        "lily_ext_library": _library.load(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx_compiler": fields.get("compiler") or None,
        "cuda_kernels": cuda_kernels,
        "cuda_archs": [a for a in fields.get("cuda_archs", "").split(",") if a] if cuda_kernels else [],
        "nvcc": fields.get("cuda_version") or None,
        "cuda_available": torch.cuda.is_available(),
        "onnxruntime_library": ort_library,  # liblily_ort.so, or None and the reason:
        "onnxruntime_library_reason": ort_reason,
        # liblily_ort_cuda.so (CUDA execution provider kernels) built, or why not
        "onnxruntime_library_cuda": library_has_cuda(),
        "onnxruntime_library_cuda_reason": None if library_has_cuda()
        else (ort_record.get("cuda_reason") or ort_reason or f"no {CUDA_LIBRARY_NAME} and no record of why"),
    }
