"""Causal LMs to production: lily_ext.export_causal_lm (a decoder with a KV cache, and causal routing's state)
and lily_ext.ort.generate (greedy decoding in ONNX Runtime) against transformers' generate in PyTorch.

Each export takes ~30-60 s on a busy 2-core machine: one case per form, routing and architecture is marked
slow; the unmarked ones cover every form, every routing and both architectures once.
"""

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from helpers import ROOT
from helpers.lily_models import left_padded, lily_lm
from helpers.models import tiny_bert

import lily_ext
import lily_ext.ort as lily_ort
from lily_ext import LilyConfig, get_lily_model

NEW_TOKENS = 4
LOGITS_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# the export example is batch 2, 3 new tokens after 2 past ones: other batch sizes and lengths here
PROMPTS = [((6, 3, 9), 21), ((5,), 31)]


def calibration_batches():
    return [
        {"input_ids": ids, "attention_mask": mask} for ids, mask in (left_padded((7, 4), 41), left_padded((6,), 43))
    ]


def check_folder_matches_pytorch(model, folder):
    """ort.generate tokens == model.generate(do_sample=False) tokens; first-step logits to 1e-4."""
    session = lily_ort.DecoderSession(folder)
    for lengths, seed in PROMPTS:
        ids, mask = left_padded(lengths, seed)
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS)
            logits = model(input_ids=ids, attention_mask=mask).logits
        got = lily_ort.generate(session, ids.numpy(), mask.numpy(), max_new_tokens=NEW_TOKENS)
        assert got.dtype == np.int64 and got.shape == (len(lengths), ids.shape[1] + NEW_TOKENS)
        np.testing.assert_array_equal(got, expected.numpy())
        first = session.start(ids.numpy(), mask.numpy())
        real = mask.numpy() == 1
        np.testing.assert_allclose(first[real], logits.numpy()[real], rtol=0, atol=LOGITS_ATOL)


def slow(*values):
    return pytest.param(*values, marks=pytest.mark.slow)


# (form, routing, arch): one unmarked case per form, per routing and per architecture
CASES = [
    ("custom", "causal", "llama"),
    ("custom", "token", "qwen2"),
    ("decomposed", "causal", "qwen2"),
    ("decomposed", "static", "llama"),
    ("merged", "static", "qwen2"),
    ("merged", "causal", "llama"),  # frozen with calibration batches
    slow("custom", "causal", "qwen2"),
    slow("custom", "token", "llama"),
    slow("custom", "static", "llama"),
    slow("custom", "static", "qwen2"),
    slow("decomposed", "causal", "llama"),
    slow("decomposed", "token", "llama"),
    slow("decomposed", "token", "qwen2"),
    slow("decomposed", "static", "qwen2"),
    slow("merged", "static", "llama"),
    slow("merged", "causal", "qwen2"),
]


@pytest.mark.ort
@pytest.mark.parametrize("form,routing,arch", CASES)
def test_ort_generate_equals_pytorch_generate(tmp_path, form, routing, arch):
    model = lily_lm(arch, routing)
    calibration = calibration_batches() if form == "merged" and routing != "static" else None
    folder = lily_ext.export_causal_lm(model, tmp_path / "out", form=form, calibration=calibration)
    reference = model
    if calibration is not None:  # the export freezes a copy; the reference is the same frozen copy
        reference = copy.deepcopy(model)
        lily_ext.freeze_router(reference, calibration)
        assert model.configs["default"].routing == routing  # the model passed in is left as it was
    check_folder_matches_pytorch(reference, folder)

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    layers = model.config.num_hidden_layers
    kv = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert inputs[: 3 + 2 * layers] == ["input_ids", "attention_mask", "position_ids", *kv]
    assert outputs[: 1 + 2 * layers] == ["logits"] + [n.replace("past_key_values", "present") for n in kv]
    record = json.loads((folder / "lily_decoder.json").read_text())
    stateful = routing == "causal" and form != "merged"
    assert len(record["state_layers"]) == (2 * layers if stateful else 0)
    state_names = [f"lily_state.{k}.{p}" for k in range(len(record["state_layers"])) for p in ("sum", "count")]
    assert inputs[3 + 2 * layers :] == state_names
    assert outputs[1 + 2 * layers :] == [n.replace("lily_state", "lily_present") for n in state_names]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert (
        dims["past_key_values.0.key"][0] == "batch_size" and dims["past_key_values.0.key"][2] == "past_sequence_length"
    )
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]

    routed_mix = [n for n in proto.graph.node if n.domain == "lily"]
    library = folder / "liblily_ort.so"
    genai = json.loads((folder / "genai_config.json").read_text())
    options = genai["model"]["decoder"]["session_options"]
    if form == "custom":
        assert library.is_file() and options["custom_ops_library"] == "liblily_ort.so"
        assert len(routed_mix) == (0 if routing == "causal" else 2 * layers)  # causal layers carry state: std ops
    else:
        assert not library.exists() and "custom_ops_library" not in options and not routed_mix
    assert genai["model"]["type"] == arch and genai["model"]["decoder"]["num_hidden_layers"] == layers
    assert genai["search"]["past_present_share_buffer"] is False


@pytest.mark.ort
def test_custom_folder_runs_with_onnxruntime_only(tmp_path):
    """The folder carries its library: a process with onnxruntime but without lily_ext runs it."""
    model = lily_lm("llama", "token")
    folder = lily_ext.export_causal_lm(model, tmp_path / "out", form="custom")
    ids, mask = left_padded((5, 3), 51)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -1].numpy()
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    code = f"""
import sys, numpy as np, onnxruntime as ort
assert "lily_ext" not in sys.modules
o = ort.SessionOptions(); o.register_custom_ops_library({str(folder / "liblily_ort.so")!r})
s = ort.InferenceSession({str(folder / "model.onnx")!r}, o, providers=["CPUExecutionProvider"])
ids, mask = np.load({str(tmp_path / "ids.npy")!r}), np.load({str(tmp_path / "mask.npy")!r})
pos = np.maximum(np.cumsum(mask, 1) - 1, 0) * mask
feeds = {{"input_ids": ids, "attention_mask": mask, "position_ids": pos}}
for i in s.get_inputs():
    if i.name.startswith("past_key_values."):
        feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
np.save({str(tmp_path / "logits.npy")!r}, s.run(["logits"], feeds)[0][:, -1])
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.ort
def test_eos_stops_and_pads_finished_samples(tmp_path):
    model = lily_lm("llama", "token")
    folder = lily_ext.export_causal_lm(model, tmp_path / "out", form="decomposed")
    ids, mask = left_padded((6, 4), 61)
    free = lily_ort.generate(folder, ids.numpy(), mask.numpy(), max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])  # sample 0's second new token: it stops there
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6).numpy()
    got = lily_ort.generate(folder, ids.numpy(), mask.numpy(), max_new_tokens=6, eos_token_id=[eos, 96])
    np.testing.assert_array_equal(got, expected)
    assert (got[0, ids.shape[1] + 1 :] == eos).all()


def test_tokenizer_files_and_metadata(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)} | {"<unk>": 96}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="w0", eos_token="w1")
    model = lily_lm("qwen2", "static")
    model.generation_config.eos_token_id = 1
    folder = lily_ext.export_causal_lm(model, tmp_path / "out", form="merged", tokenizer=tokenizer)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["eos_token_id"] == 1 and genai["model"]["pad_token_id"] == 0
    record = json.loads((folder / "lily_decoder.json").read_text())
    assert record["form"] == "merged" and record["routing"] == "static" and record["state_layers"] == []
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


# ---- errors -----------------------------------------------------------------------------------------------


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    model = get_lily_model(tiny_bert(), LilyConfig(r=4, target_modules=["query"], routing="token"))
    with pytest.raises(TypeError, match="expected a causal language model.*BertForSequenceClassification"):
        lily_ext.export_causal_lm(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("routing", ["causal", "token"])
def test_merged_on_a_dynamic_router_needs_calibration(tmp_path, routing):
    model = lily_lm("llama", routing)
    with pytest.raises(ValueError, match=f"form 'merged'.*{routing!r} routing.*calibration="):
        lily_ext.export_causal_lm(model, tmp_path / "out", form="merged")
    assert not (tmp_path / "out").exists()


def test_an_existing_non_empty_out_dir_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"out_dir: {str(out)!r} exists and is not an empty directory"):
        lily_ext.export_causal_lm(lily_lm("llama", "static"), out, form="merged")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="form: expected one of"):
        lily_ext.export_causal_lm(lily_lm("llama", "static"), tmp_path / "other", form="fused")


def test_a_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="exporter failed"):
        lily_ext.export_causal_lm(lily_lm("llama", "static"), tmp_path / "out", form="merged")
    assert list(tmp_path.iterdir()) == []


def test_generate_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.onnx"):
        lily_ort.generate(tmp_path, np.ones((1, 3), np.int64))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lily_ort.generate(tmp_path, np.ones((1, 3), np.int64), max_new_tokens=-1)


def test_readme_documents_the_decoder_export():
    text = (ROOT / "README.md").read_text()
    assert "export_causal_lm" in text and "lily_ext.ort.generate" in text


def test_cli_parses_the_causal_lm_task():
    from lily_ext.app.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--task", "causal-lm", "--model", "m", "--data", "d.jsonl", "--out", "o"])
    assert args.task == "causal-lm" and args.routing is None  # cmd_train makes it causal for this task
    assert parser.parse_args(["train", "--model", "m", "--data", "d", "--out", "o"]).task == "classify"
    args = parser.parse_args(
        ["export", "--task", "causal-lm", "--model", "m", "--adapter", "a", "--form", "merged"] + ["--out", "f"]
    )
    assert args.task == "causal-lm" and args.form == "merged"
    args = parser.parse_args(["generate", "folder", "--prompt", "a", "--prompt", "b", "--max-new-tokens", "3"])
    assert args.folder == "folder" and args.prompt == ["a", "b"] and args.max_new_tokens == 3
