"""lily_ext: fast, exportable Lily (Low-Rank Interconnected Adaptation across Layers) for PyTorch."""

from . import _library

_library.load()

from . import ops  # noqa: E402  (registers fake kernels and autograd for torch.ops.lily)
from ._build import build_info  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "__version__"]
