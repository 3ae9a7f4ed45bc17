"""lily_ext: fast, exportable Lily (Low-Rank Interconnected Adaptation across Layers) for PyTorch."""

from . import _library

_library.load()

from . import ops  # noqa: E402  (registers fake kernels and autograd for torch.ops.lily)
from ._build import build_info  # noqa: E402
from .ort import ort_library_path, ort_session  # noqa: E402  (ONNX Runtime custom-op library)

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "ort_library_path", "ort_session", "__version__"]
