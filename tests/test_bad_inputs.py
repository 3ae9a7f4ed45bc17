"""A catalogue of bad inputs walked through every public entry point: each gets a clear, specific
error (or, for NaN / inf, the documented IEEE behaviour), never a crash or a silent wrong answer."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TESTS_DIR
from helpers.models import tiny_bert, tiny_llama
from helpers.models import token_batch as tiny_bert_ids
from onnx import TensorProto, helper

import lily_ext
from lily_ext import AdapterLoadError, LilyConfig, get_lily_model
from lily_ext.calibration import tune_static
from lily_ext.export import export_onnx
from lily_ext.ops import routed_mix

E, R, OUT = 3, 4, 5


def op_inputs(mode="batch", lead=(2, 6)):
    g = torch.Generator().manual_seed(0)
    router = torch.randn(E, generator=g) if mode == "static" else torch.randn(E, R, generator=g)
    return torch.randn(*lead, R, generator=g), router, torch.randn(E, R, OUT, generator=g)


_SCRATCH = tempfile.TemporaryDirectory()  # removed when the test process exits


def saved_adapter(damage=None, **config):
    """A saved adapter of a tiny Llama in a fresh directory, optionally damaged."""
    import json

    path = Path(tempfile.mkdtemp(dir=_SCRATCH.name)) / "adapter"
    get_lily_model(tiny_llama(), LilyConfig(r=4, target_modules=["q_proj"], **config)).save_adapter(path)
    if damage == "truncate":
        data = (path / "adapter.safetensors").read_bytes()
        (path / "adapter.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "newer":
        record = json.loads((path / "lily_config.json").read_text())
        record["format_version"] = 3  # newer than this lily_ext reads (FORMAT_VERSION 2)
        (path / "lily_config.json").write_text(json.dumps(record))
    return path


def _bert_adapter(routing="sequence"):
    return get_lily_model(tiny_bert(), LilyConfig(r=2, target_modules=["query"], routing=routing))


def _bert_batch():
    ids = tiny_bert_ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _frozen_bert(method):
    model = _bert_adapter()
    lily_ext.freeze_router(model, [_bert_batch()], method=method)
    return model


def saved_peft_adapter():
    import peft

    path = Path(tempfile.mkdtemp(dir=_SCRATCH.name))
    peft.get_peft_model(tiny_llama(), peft.LilyConfig(r=4, target_modules=["q_proj"])).save_pretrained(path)
    return path


# (entry point, description, call, expected exception, message pattern)
CATALOGUE = [
    (
        "ops",
        "hidden r mismatch",
        lambda: routed_mix(torch.randn(2, R + 1), *op_inputs()[1:]),
        ValueError,
        r"hidden: last dim must equal bank's r",
    ),
    (
        "ops",
        "bank rank",
        lambda: routed_mix(op_inputs()[0], op_inputs()[1], torch.randn(R, OUT)),
        ValueError,
        r"bank: expected a 3-D tensor",
    ),
    (
        "ops",
        "mixed dtypes",
        lambda: routed_mix(op_inputs()[0].double(), *op_inputs()[1:]),
        ValueError,
        r"router: dtype torch.float32 differs",
    ),
    (
        "ops",
        "mixed devices",
        lambda: routed_mix(*op_inputs()[:2], op_inputs()[2].to("meta")),
        ValueError,
        r"bank: on device meta",
    ),
    (
        "ops",
        "mask shape",
        lambda: routed_mix(*op_inputs("sequence"), mode="sequence", mask=torch.ones(2, 7)),
        ValueError,
        r"mask: expected shape \[2, 6\]",
    ),
    ("ops", "unknown mode", lambda: routed_mix(*op_inputs(), mode="expert"), ValueError, r"mode: expected one of"),
    (
        "ops",
        "causal mask shape",
        lambda: routed_mix(*op_inputs("causal"), mode="causal", mask=torch.ones(2, 7)),
        ValueError,
        r"mask: expected shape \[2, 6\]",
    ),
    ("LilyConfig", "r <= 0", lambda: LilyConfig(r=0), ValueError, r"LilyConfig.r"),
    ("LilyConfig", "num_B < 2", lambda: LilyConfig(num_B=1), ValueError, r"LilyConfig.num_B"),
    ("LilyConfig", "unknown routing", lambda: LilyConfig(routing="moe"), ValueError, r"LilyConfig.routing"),
    (
        "LilyConfig",
        "unknown field",
        lambda: LilyConfig.from_dict({"r": 4, "alpha": 8}),
        ValueError,
        r"LilyConfig: unknown field 'alpha'",
    ),
    (
        "get_lily_model",
        "no match",
        lambda: get_lily_model(tiny_llama(), LilyConfig(target_modules=["nope"])),
        ValueError,
        r"matches no module",
    ),
    (
        "get_lily_model",
        "not a Linear",
        lambda: get_lily_model(tiny_llama(), LilyConfig(target_modules=["act_fn"])),
        ValueError,
        r"Lily adapts only torch.nn.Linear",
    ),
    (
        "get_lily_model",
        "not a config",
        lambda: get_lily_model(tiny_llama(), {"r": 4}),
        TypeError,
        r"config: expected a lily_ext.LilyConfig",
    ),
    (
        "load_adapter",
        "not a directory",
        lambda: lily_ext.load_adapter(tiny_llama(), "/nonexistent/adapter"),
        AdapterLoadError,
        r"is not an adapter directory",
    ),
    (
        "load_adapter",
        "truncated safetensors",
        lambda: lily_ext.load_adapter(tiny_llama(), saved_adapter("truncate")),
        AdapterLoadError,
        r"truncated or corrupted",
    ),
    (
        "load_adapter",
        "newer format version",
        lambda: lily_ext.load_adapter(tiny_llama(), saved_adapter("newer")),
        AdapterLoadError,
        r"written by a newer lily_ext",
    ),
    (
        "load_adapter",
        "another base model",
        lambda: lily_ext.load_adapter(tiny_llama(hidden=32), saved_adapter()),
        AdapterLoadError,
        r"weight shape \[32, 32\], the adapter expects \[64, 64\]",
    ),
    (
        "load_adapter",
        "another architecture",
        lambda: lily_ext.load_adapter(tiny_bert(), saved_adapter()),
        AdapterLoadError,
        r"does not fit this base model",
    ),
    (
        "load_peft_adapter",
        "another base model",
        lambda: lily_ext.load_peft_adapter(tiny_llama(hidden=32), saved_peft_adapter()),
        AdapterLoadError,
        r"has shape \[4, 64\], expected \[4, 32\]",
    ),
    (
        "save_peft_adapter",
        "routing PEFT lacks",
        lambda: get_lily_model(
            tiny_llama(), LilyConfig(r=4, target_modules=["q_proj"], routing="token")
        ).save_peft_adapter(Path(_SCRATCH.name) / "never"),
        ValueError,
        r"PEFT's Lily has batch routing only",
    ),
    (
        "load_peft_adapter",
        "not a PEFT directory",
        lambda: lily_ext.load_peft_adapter(tiny_llama(), "/nonexistent"),
        AdapterLoadError,
        r"adapter_config.json: missing",
    ),
    (
        "export_onnx",
        "unknown form",
        lambda: export_onnx(get_lily_model(tiny_bert(), LilyConfig(r=2, target_modules=["query"])), (), form="fused"),
        ValueError,
        r"form: expected one of",
    ),
    (
        "export_onnx",
        "merged without static routing",
        lambda: export_onnx(get_lily_model(tiny_bert(), LilyConfig(r=2, target_modules=["query"])), (), form="merged"),
        ValueError,
        r"freeze_router",
    ),
    (
        "freeze_router",
        "not a LilyModel",
        lambda: lily_ext.freeze_router(tiny_bert(), [()]),
        TypeError,
        r"model: expected a lily_ext.LilyModel",
    ),
    (
        "freeze_router",
        "unknown method",
        lambda: lily_ext.freeze_router(_bert_adapter(), [_bert_batch()], method="median"),
        ValueError,
        r"method: expected one of 'mean', 'optimal_weights', 'optimal_bc', got 'median'",
    ),
    (
        "freeze_router",
        "empty calibration",
        lambda: lily_ext.freeze_router(_bert_adapter(), []),
        ValueError,
        r"batches: need at least one calibration batch",
    ),
    (
        "freeze_router",
        "static adapter",
        lambda: lily_ext.freeze_router(_bert_adapter("static"), [_bert_batch()]),
        ValueError,
        r"already uses static routing",
    ),
    (
        "freeze_router",
        "tuning without labelled batches",
        lambda: lily_ext.freeze_router(_bert_adapter(), [_bert_batch()], tune_steps=5),
        ValueError,
        r"tune_batches: tune_steps > 0 needs",
    ),
    (
        "tune_static",
        "dynamic adapter",
        lambda: tune_static(_bert_adapter(), [_bert_batch()], 5),
        ValueError,
        r"uses 'sequence' routing; freeze it first",
    ),
    (
        "save_adapter",
        "adapter frozen to its own combined banks",
        lambda: _frozen_bert("optimal_bc").save_adapter(Path(tempfile.mkdtemp(dir=_SCRATCH.name)) / "a"),
        ValueError,
        r"own combined bank \(freeze_router method='optimal_bc'\), which checkpoint format version 1 cannot hold",
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[f"{c[0]}: {c[1]}" for c in CATALOGUE])
def test_catalogue(case):
    _, _, call, error, pattern = case
    with pytest.raises(error, match=pattern):
        call()


# ---- NaN / inf: defined behaviour ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, poisoned_rows",
    [("batch", "all"), ("token", "one"), ("sequence", "sample"), ("static", "one"), ("causal", "later")],
)
def test_nan_propagates_as_documented(mode, poisoned_rows):
    """NaN in one row of hidden: batch mode spreads it to every row (the shared mean, as in PEFT's
    formula), sequence mode to that sample's rows, causal mode to that row and the sample's later
    rows (the running mean), token and static modes keep it in that row."""
    hidden, router, bank = op_inputs(mode, lead=(3, 4))
    hidden[1, 2, 0] = float("nan")
    out = routed_mix(hidden, router, bank, mode=mode)
    bad = torch.isnan(out).any(-1)
    expected = {
        "all": torch.ones(3, 4, dtype=torch.bool),
        "sample": torch.zeros(3, 4, dtype=torch.bool),
        "one": torch.zeros(3, 4, dtype=torch.bool),
        "later": torch.zeros(3, 4, dtype=torch.bool),
    }[poisoned_rows]
    if poisoned_rows == "later":
        expected[1, 2:] = True
    if poisoned_rows == "sample":
        expected[1] = True
    if poisoned_rows == "one":
        expected[1, 2] = True
    assert torch.equal(bad, expected)


def test_inf_in_bank_gives_inf_or_nan_never_a_crash():
    hidden, router, bank = op_inputs()
    bank[0, 0, 0] = float("inf")
    out = routed_mix(hidden, router, bank)
    assert not torch.isfinite(out[..., 0]).all() and torch.isfinite(out[..., 1:]).all()


# ---- the CLI and the ONNX Runtime op ---------------------------------------------------------------


def test_cli_bad_input_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lily_ext.app.cli",
            "export",
            "--model",
            str(tmp_path),
            "--adapter",
            str(tmp_path),
            "--form",
            "custom",
            "--out",
            str(tmp_path / "x.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lily-ext export: error: --adapter:")


@pytest.mark.ort
def test_ort_op_with_disagreeing_inputs_raises_an_ort_error():
    import onnxruntime

    nodes = [helper.make_node("RoutedMix", ["hidden", "router", "bank"], ["delta"], domain="lily", mode="batch")]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", R]),
            helper.make_tensor_value_info("router", TensorProto.FLOAT, [E, R]),
            helper.make_tensor_value_info("bank", TensorProto.FLOAT, [E, R + 1, OUT]),
        ],
        [helper.make_tensor_value_info("delta", TensorProto.FLOAT, ["n", OUT])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("lily", 1)], ir_version=10
    )
    session = lily_ext.ort_session(model.SerializeToString())
    feeds = {
        "hidden": np.ones((2, R), np.float32),
        "router": np.ones((E, R), np.float32),
        "bank": np.ones((E, R + 1, OUT), np.float32),
    }
    with pytest.raises(
        onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument, match=r"hidden: last dim must equal bank's r = 5"
    ):
        session.run(None, feeds)
    feeds["bank"] = np.ones((E, R, OUT), np.float32)
    with pytest.raises(
        onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument, match="dimensions"
    ):  # ORT's own check
        session.run(None, feeds)


# ---- a writer killed mid-save ---------------------------------------------------------------------


def test_killed_writer_leaves_the_previous_adapter_intact(tmp_path):
    target = tmp_path / "adapter"
    script = textwrap.dedent(f"""
        import sys, time, torch, safetensors.torch
        import lily_ext
        from helpers.models import tiny_llama
        model = lily_ext.get_lily_model(tiny_llama(), lily_ext.LilyConfig(r=4, target_modules=["q_proj"], init_weights=False))
        if sys.argv[1] == "first":
            model.save_adapter({str(target)!r})
            sys.exit(0)
        real = safetensors.torch.save_file
        def slow(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(100)  # half-written
            open({str(tmp_path / "started")!r}, "w").close()
            time.sleep(60)
        safetensors.torch.save_file = slow
        model.save_adapter({str(target)!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", script, "first"], check=True, timeout=300, env=env)
    before = {p: (target / p).read_bytes() for p in os.listdir(target)}
    proc = subprocess.Popen([sys.executable, "-c", script, "second"], env=env)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "started").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "started").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before
    lily_ext.load_adapter(tiny_llama(), target)
