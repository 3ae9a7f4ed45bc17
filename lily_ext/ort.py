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

__all__ = [
    "DecoderSession",
    "generate",
    "library_has_cuda",
    "library_record",
    "library_status",
    "ort_library_path",
    "ort_session",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "liblily_ort.so"
CUDA_LIBRARY_NAME = "liblily_ort_cuda.so"
DECODER_CONFIG = "lily_decoder.json"  # written by lily_ext.export_causal_lm beside model.onnx
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


# ---- decoders exported by lily_ext.export_causal_lm: greedy generation with the KV cache ----------------------


def _decoder_folder_session(folder: str, providers):
    """A session on ``folder/model.onnx``, with the folder's own copy of the custom-op library registered
    (the folder runs on a host with only onnxruntime), else the package's."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("lily_ext.ort.generate needs the onnxruntime package (pip install onnxruntime)") from exc
    model = os.path.join(folder, "model.onnx")
    if not os.path.isfile(model):
        raise FileNotFoundError(f"out_dir: {folder!r} has no model.onnx (write it with lily_ext.export_causal_lm)")
    record = {}
    config = os.path.join(folder, DECODER_CONFIG)
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            record = json.load(f)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    library = record.get("custom_ops_library")
    if library:
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
        local = os.path.join(folder, library)
        if "CUDAExecutionProvider" in names or not os.path.isfile(local):
            local = ort_library_path(cuda="CUDAExecutionProvider" in names)
        options.register_custom_ops_library(local)
    return ort.InferenceSession(model, sess_options=options, providers=providers)


class DecoderSession:
    """Runs a decoder folder written by ``lily_ext.export_causal_lm`` (or a session on its model.onnx)
    one step at a time: it builds every input (past keys / values, causal routing state, position ids)
    from the session's own input list, and carries the outputs of a step into the next as OrtValues
    (no copy of the KV cache through numpy).

    ``start(input_ids, attention_mask)`` -> the prefill's logits ``[batch, prompt, vocab]``;
    ``step(next_ids [batch])`` -> the logits ``[batch, 1, vocab]`` of one more token.
    """

    def __init__(self, out_dir_or_session, providers=None):
        if isinstance(out_dir_or_session, (str, os.PathLike)):
            self.session = _decoder_folder_session(os.fspath(out_dir_or_session), providers)
        else:
            self.session = out_dir_or_session
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in self.output_names:
            raise ValueError(
                "out_dir_or_session: not a decoder exported by lily_ext.export_causal_lm (needs an input "
                f"'input_ids' and an output 'logits'; inputs: {', '.join(self.inputs)})"
            )
        self.carried = {}  # output name -> input name it feeds at the next step
        for name in self.inputs:
            if name.startswith("past_key_values."):
                self.carried["present." + name[len("past_key_values.") :]] = name
            elif name.startswith("lily_state."):
                self.carried["lily_present." + name[len("lily_state.") :]] = name
        missing = sorted(set(self.carried) - set(self.output_names))
        if missing:
            raise ValueError(f"out_dir_or_session: the model has no outputs {', '.join(missing)} for its past inputs")

    @staticmethod
    def _numpy_type(type_name: str):
        import numpy as np

        return {
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(double)": np.float64,
            "tensor(int64)": np.int64,
            "tensor(int32)": np.int32,
        }[type_name]

    def _empty_past(self, name: str, batch: int):
        """Zeros for a past input: ``[batch, kv_heads, 0, head_size]`` for keys / values, ``[batch, ...]`` for states."""
        import numpy as np

        info = self.inputs[name]
        shape = []
        for axis, dim in enumerate(info.shape):
            if axis == 0:
                shape.append(batch)
            elif isinstance(dim, int):
                shape.append(dim)
            elif name.startswith("past_key_values.") and axis == 2:
                shape.append(0)
            else:
                raise ValueError(f"{name}: cannot size axis {axis} ({dim!r}) of the first step")
        return np.zeros(shape, dtype=self._numpy_type(info.type))

    def _run(self, feeds: dict):
        import numpy as np
        import onnxruntime as ort

        values = {
            k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
            for k, v in feeds.items()
        }
        outputs = dict(zip(self.output_names, self.session.run_with_ort_values(self.output_names, values)))
        self.past = {self.carried[k]: v for k, v in outputs.items() if k in self.carried}
        return outputs["logits"].numpy()

    def _position_ids(self, new: int):
        import numpy as np

        positions = np.cumsum(self.mask, axis=1) - 1
        positions[self.mask == 0] = 0  # as transformers' generate
        return positions[:, -new:].astype(self._numpy_type(self.inputs["position_ids"].type))

    def _feeds(self, ids):
        feeds = {"input_ids": ids.astype(self._numpy_type(self.inputs["input_ids"].type))}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = self.mask.astype(self._numpy_type(self.inputs["attention_mask"].type))
        if "position_ids" in self.inputs:
            feeds["position_ids"] = self._position_ids(ids.shape[1])
        return feeds

    def start(self, input_ids, attention_mask=None):
        import numpy as np

        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(
                f"input_ids: expected integer token ids [batch, prompt], got {ids.dtype} {list(ids.shape)}"
            )
        self.mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if self.mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask: expected the shape of input_ids {list(ids.shape)}, got {list(self.mask.shape)}"
            )
        feeds = self._feeds(ids)
        for name in self.carried.values():
            feeds[name] = self._empty_past(name, ids.shape[0])
        return self._run(feeds)

    def step(self, next_ids):
        import numpy as np

        ids = np.asarray(next_ids).reshape(-1, 1)
        self.mask = np.concatenate([self.mask, np.ones_like(ids, dtype=np.int64)], axis=1)
        feeds = self._feeds(ids)
        feeds.update(self.past)
        return self._run(feeds)


def generate(
    out_dir_or_session,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 32,
    eos_token_id=None,
    providers=None,
):
    """Greedy decoding in ONNX Runtime of a decoder exported by ``lily_ext.export_causal_lm``, with the
    KV cache (and causal routing's state) carried from step to step.

    ``out_dir_or_session``: the exported folder (its ``liblily_ort.so`` is registered for the custom
    form) or an ``onnxruntime.InferenceSession`` on its model.onnx. ``input_ids`` ``[batch, prompt]``,
    left-padded with ``attention_mask`` (0 = padding) for prompts of different lengths.
    ``eos_token_id`` (an int or a list): a sample that produced one gets the first eos as padding from
    then on, and decoding stops when every sample has (as transformers' ``generate`` with
    ``pad_token_id = eos``). ``providers`` default to the CPU execution provider.

    Returns numpy int64 ``[batch, prompt + new]``, ``new <= max_new_tokens``.
    """
    import numpy as np

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    runner = out_dir_or_session if isinstance(out_dir_or_session, DecoderSession) else None
    runner = runner or DecoderSession(out_dir_or_session, providers=providers)
    sequences = np.asarray(input_ids).astype(np.int64)
    if max_new_tokens == 0:
        return sequences
    eos = [] if eos_token_id is None else list(np.atleast_1d(np.asarray(eos_token_id, dtype=np.int64)))
    unfinished = np.ones(sequences.shape[0], dtype=bool)
    logits = runner.start(sequences, attention_mask)
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1).astype(np.int64)
        if eos:
            tokens = np.where(unfinished, tokens, eos[0])
            unfinished &= ~np.isin(tokens, eos)
        sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        logits = runner.step(tokens)
    return sequences
