"""lily_ext: fast, exportable Lily (Low-Rank Interconnected Adaptation across Layers) for PyTorch.

Layers, from the kernels up: ``ops`` (the ``lily::routed_mix`` op) -> ``layer`` / ``targets`` /
``checkpoint`` / ``model`` (adapters) -> ``optim``, ``calibration``, ``peft_interop``, ``hf`` ->
``export`` (ONNX) -> ``ort`` (ONNX Runtime). ``app`` is the command-line application; ``_build``
builds and loads the native libraries.
"""

from ._build import library as _library

_library.load()

from . import ops  # noqa: E402  (registers the fake kernels of torch.ops.lily)
from ._build.info import build_info  # noqa: E402
from .calibration import freeze_router, tune_static  # noqa: E402
from .checkpoint import AdapterLoadError  # noqa: E402
from .config import LilyConfig  # noqa: E402
from .export import export_causal_lm, export_onnx, register_torchscript_symbolic  # noqa: E402
from .layer import fused_layers, set_fused_layers  # noqa: E402
from .model import LilyModel, NonCausalRoutingWarning, get_lily_model, load_adapter  # noqa: E402
from .ort import ort_library_path, ort_session  # noqa: E402  (ONNX Runtime custom-op library)
from .peft_interop import from_peft, load_peft_adapter, patch_peft, unpatch_peft  # noqa: E402

register_torchscript_symbolic()


def __getattr__(name):
    if name == "LilyTrainer":  # imports transformers.Trainer: only on demand
        from .hf import LilyTrainer

        return LilyTrainer
    raise AttributeError(f"module 'lily_ext' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "LilyConfig",
    "LilyModel",
    "LilyTrainer",
    "NonCausalRoutingWarning",
    "build_info",
    "export_causal_lm",
    "export_onnx",
    "freeze_router",
    "from_peft",
    "fused_layers",
    "get_lily_model",
    "load_adapter",
    "load_peft_adapter",
    "ops",
    "ort_library_path",
    "ort_session",
    "patch_peft",
    "set_fused_layers",
    "tune_static",
    "unpatch_peft",
    "__version__",
]
