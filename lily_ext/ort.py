"""ONNX Runtime support: the custom-op library that runs ``lily.RoutedMix`` nodes.

``liblily_ort.so`` (built by ``pip install`` when ONNX Runtime C API headers are found, see
``lily_ext/_build/ort_library.py``) registers domain ``lily``, op ``RoutedMix`` (opset 1) for the CPU
execution provider. When built with CUDA (``library_has_cuda()``), ``liblily_ort_cuda.so``
registers it for the CPU and the CUDA execution provider (``ort_library_path(cuda=True)``;
``ort_session`` picks it when the providers include CUDA). Inputs ``hidden [..., r]``,
``router [E, r]`` (``theta [E]`` for mode
``static``), ``bank [E, r, out]``, optional ``mask`` (modes ``sequence``, ``causal``; shape
``hidden.shape[:-1]``, any bool/int/float type, nonzero counts); attributes ``scaling`` (float,
default 1.0) and ``mode`` (string, default ``"batch"``); output ``delta [..., out]`` with hidden's
type (float32, float64, float16, bfloat16; half precision is computed in float32). The CUDA kernels
run ORT's compute stream and are the ones the torch op uses on CUDA (forward only; E <= 256).

The libraries link neither torch nor Python nor ONNX Runtime: any process with onnxruntime can
register one by path (``SessionOptions.register_custom_ops_library(ort_library_path())``); the
CPU one needs nothing else, the CUDA one also needs cuBLAS.
"""

from __future__ import annotations

import json
import os

__all__ = ["ort_library_path", "ort_session", "library_status", "library_record", "library_has_cuda"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "liblily_ort.so"
CUDA_LIBRARY_NAME = "liblily_ort_cuda.so"
_RECORD = os.path.join(_PACKAGE_DIR, "_ort_build.json")  # written by the build (lily_ext/_build/ort_library.py)


def library_record() -> dict:
    """What the build recorded about the library (lily_ext/_build/ort_library.py): ``library``, ``reason``,
    ``headers``, ``api_version``, ``cuda`` (CUDA execution provider kernels compiled in),
    ``cuda_reason`` (why not), ``cuda_archs``; {} when there is no record."""
    try:
        with open(_RECORD, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def library_status() -> tuple[str | None, str | None]:
    """``(path, None)`` when the library is built, else ``(None, why it is missing)``."""
    path = os.path.join(_PACKAGE_DIR, LIBRARY_NAME)
    if os.path.isfile(path):
        return path, None
    reason = library_record().get("reason")
    return None, reason or (
        f"{LIBRARY_NAME} is not in {_PACKAGE_DIR} and the build left no record of why "
        "(was the package built by this version of setup.py?)"
    )


def library_has_cuda() -> bool:
    """Whether ``liblily_ort_cuda.so`` (CUDA execution provider kernels) was built."""
    return bool(library_record().get("cuda")) and os.path.isfile(os.path.join(_PACKAGE_DIR, CUDA_LIBRARY_NAME))


def ort_library_path(cuda: bool = False) -> str:
    """Path of ``liblily_ort.so`` (CPU EP), or with ``cuda=True`` of ``liblily_ort_cuda.so`` (CPU
    and CUDA EPs); raises ``FileNotFoundError`` saying why when it was not built."""
    if cuda:
        if not library_has_cuda():
            why = library_record().get("cuda_reason") or library_status()[1] or "the build recorded no reason"
            raise FileNotFoundError(f"lily_ext's ONNX Runtime library has no CUDA kernels ({CUDA_LIBRARY_NAME}): {why}")
        return os.path.join(_PACKAGE_DIR, CUDA_LIBRARY_NAME)
    path, reason = library_status()
    if path is None:
        raise FileNotFoundError(
            f"lily_ext's ONNX Runtime library ({LIBRARY_NAME}) is not built: {reason}. Rebuild with "
            "`pip install --no-build-isolation -e .` once ONNX Runtime C API headers are available "
            "(set ONNXRUNTIME_INCLUDE_DIR, or let the build fetch Debian's libonnxruntime-dev)."
        )
    return path


def ort_session(path_or_bytes, providers=None, **session_options):
    """An ``onnxruntime.InferenceSession`` with lily_ext's custom-op library registered.

    ``path_or_bytes``: a model path or serialized ModelProto bytes. ``providers`` defaults to
    ``["CPUExecutionProvider"]``; with ``"CUDAExecutionProvider"`` among them the CUDA library is
    registered. Every other keyword sets that attribute of
    ``onnxruntime.SessionOptions`` (``intra_op_num_threads=1``, ``graph_optimization_level=...``).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("ort_session needs the onnxruntime package (pip install onnxruntime)") from exc
    options = ort.SessionOptions()
    settable = sorted(k for k in dir(type(options)) if isinstance(getattr(type(options), k, None), property))
    for key, value in session_options.items():
        if key not in settable:
            raise TypeError(
                f"ort_session: unknown session option {key!r}; onnxruntime.SessionOptions has: {', '.join(settable)}"
            )
        setattr(options, key, value)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    options.register_custom_ops_library(ort_library_path(cuda="CUDAExecutionProvider" in names))
    return ort.InferenceSession(path_or_bytes, sess_options=options, providers=providers)
