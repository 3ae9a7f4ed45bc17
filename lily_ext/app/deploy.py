"""Export a fine-tuned classifier in the three ONNX forms, run each in ONNX Runtime, compare to PyTorch:
the largest logit difference on a few texts, and held-out accuracy / loss over a whole labelled set."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..calibration import DEFAULT_METHOD, DEFAULT_RIDGE, freeze_router
from ..export import FORMS, export_onnx
from ..model import LilyModel

DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def model_inputs(tokenizer, texts, max_length: int) -> dict:
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def for_form(
    model: LilyModel,
    form: str,
    calibration_batches,
    *,
    method: str = DEFAULT_METHOD,
    ridge: float = DEFAULT_RIDGE,
    tune_batches=None,
    tune_steps: int = 0,
    tune_lr: float = 1e-3,
    seed: int = 0,
) -> tuple[LilyModel, dict | None]:
    """The model to export for ``form``: merged needs static routing, so a copy is frozen first
    (``freeze_router`` with ``method``, then ``tune_steps`` of recovery fine-tuning on ``tune_batches``,
    its dropout drawn from ``seed`` whatever the caller's random state)."""
    config = model.configs[model.active_adapter]
    if form != "merged" or (config.routing == "static" and config.routing_A in (None, "static")):
        return model, None
    frozen = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        report = freeze_router(
            frozen,
            calibration_batches,
            method=method,
            ridge=ridge,
            tune_batches=tune_batches,
            tune_steps=tune_steps,
            tune_lr=tune_lr,
        )
    frozen.eval()
    return frozen, report


def session_for(form: str, path: Path):
    import onnxruntime

    if form == "custom":
        from ..ort import ort_session

        return ort_session(str(path))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_session(session, inputs: dict) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0]


def labelled_batches(tokenizer, pairs, label_ids: dict, max_length: int, batch_size: int = 64):
    """(inputs, labels) per batch of ``pairs`` ((text, label) tuples), labels as int64 arrays."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        yield model_inputs(tokenizer, [t for t, _ in chunk], max_length), np.array([label_ids[l] for _, l in chunk])


def _scores(logits: np.ndarray, labels: np.ndarray) -> tuple[int, float]:
    """(correct predictions, summed cross-entropy) of one batch, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return int((logits.argmax(-1) == labels).sum()), float(-log_probs[np.arange(len(labels)), labels].sum())


def held_out_scores(predict, tokenizer, pairs, label_ids: dict, max_length: int, batch_size: int = 64) -> dict:
    """Accuracy and mean cross-entropy of ``predict(inputs) -> logits [batch, labels]`` over every pair."""
    correct, loss, seen = 0, 0.0, 0
    for inputs, labels in labelled_batches(tokenizer, pairs, label_ids, max_length, batch_size):
        c, l = _scores(np.asarray(predict(inputs)), labels)
        correct, loss, seen = correct + c, loss + l, seen + len(labels)
    return {"accuracy": correct / max(seen, 1), "loss": loss / max(seen, 1), "examples": seen}


def ort_scores(session, tokenizer, pairs, label_ids: dict, max_length: int, batch_size: int = 64) -> dict:
    """Held-out accuracy and loss of an ONNX Runtime session (the exported model, as it will run)."""
    return held_out_scores(
        lambda inputs: run_session(session, inputs), tokenizer, pairs, label_ids, max_length, batch_size
    )


def torch_scores(model, tokenizer, pairs, label_ids: dict, max_length: int, batch_size: int = 64) -> dict:
    """The same for a PyTorch model (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return held_out_scores(
                lambda inputs: model(**inputs).logits.float().numpy(),
                tokenizer,
                pairs,
                label_ids,
                max_length,
                batch_size,
            )
    finally:
        model.train(was_training)


def latency_ms(session, inputs: dict, repeats: int = 30) -> float:
    run_session(session, inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_session(session, inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def export_and_check(
    model: LilyModel,
    tokenizer,
    out_dir,
    example_texts,
    check_texts,
    calibration_batches,
    max_length: int = 64,
    forms=FORMS,
    *,
    eval_pairs=None,
    label_ids: dict | None = None,
    method: str = DEFAULT_METHOD,
    tune_batches=None,
    tune_steps: int = 0,
    tune_lr: float = 1e-3,
) -> list[dict]:
    """One row per form: max |ORT - PyTorch| on ``check_texts`` (other shapes than the export
    example), median latency of one 1 x 16-token request, file size; with ``eval_pairs`` (labelled
    (text, label) pairs) and ``label_ids``, the accuracy and mean cross-entropy of the form run in
    ONNX Runtime over all of them (``accuracy``, ``loss``) and of the PyTorch model it was exported
    from (``accuracy_pytorch``, ``loss_pytorch``); or the reason the form was skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = model_inputs(tokenizer, example_texts, max_length)
    check = model_inputs(tokenizer, check_texts, max_length)
    single = model_inputs(tokenizer, check_texts[:1], 16)
    rows = []
    pytorch_scores: dict[int, dict] = {}
    for form in forms:
        row = {"form": form}
        try:
            target, report = for_form(
                model,
                form,
                calibration_batches,
                method=method,
                tune_batches=tune_batches,
                tune_steps=tune_steps,
                tune_lr=tune_lr,
            )
            if report is not None:
                row["freeze_method"] = report.method
                row["frozen_routing_relative_error"] = max(r["relative_error"] for r in report.values())
                row["frozen_routing_relative_error_mean"] = max(r["relative_error_mean"] for r in report.values())
                row["tune_steps"] = len(report.tune_losses)
            path = out_dir / f"model_{form}.onnx"
            export_onnx(target, (), path, form=form, kwargs=example, dynamic_shapes=DYNAMIC)
            session = session_for(form, path)
            with torch.no_grad():
                expected = target(**check).logits.numpy()
            row["max_abs_diff"] = float(np.abs(run_session(session, check) - expected).max())
            if eval_pairs:
                scores = ort_scores(session, tokenizer, eval_pairs, label_ids, max_length)
                if id(target) not in pytorch_scores:
                    pytorch_scores[id(target)] = torch_scores(target, tokenizer, eval_pairs, label_ids, max_length)
                reference = pytorch_scores[id(target)]
                row.update(accuracy=scores["accuracy"], loss=scores["loss"], examples=scores["examples"])
                row.update(accuracy_pytorch=reference["accuracy"], loss_pytorch=reference["loss"])
            row["latency_ms"] = latency_ms(session, single)
            row["file_bytes"] = path.stat().st_size
            row["path"] = str(path)
        except (ImportError, OSError, RuntimeError) as e:  # e.g. no ORT custom-op library in this build
            row["skipped"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def format_table(rows, reference: dict | None = None) -> str:
    """The rows of ``export_and_check`` as a Markdown table; ``reference`` (``label``, ``accuracy``,
    ``loss``: the PyTorch model as trained) is its first row, and each form's accuracy is compared to it."""
    with_scores = any("accuracy" in row for row in rows)
    head = "| form | max abs diff vs PyTorch | latency 1x16 ms | file MB | note |"
    rule = "|---|---:|---:|---:|---|"
    if with_scores:
        head = "| form | held-out accuracy (ORT) | loss | vs as trained | " + head[len("| form | ") :]
        rule = "|---|---:|---:|---:|" + rule[len("|---|") :]
    lines = [head, rule]
    if reference is not None and with_scores:
        lines.append(
            f"| {reference['label']} | {reference['accuracy']:.3f} | {reference['loss']:.3f} | - | - | - | - | "
            f"(PyTorch, {reference.get('examples', '?')} held-out examples) |"
        )
    for row in rows:
        if "skipped" in row:
            dashes = " - | - | - |" if with_scores else ""
            lines.append(f"| {row['form']} |{dashes} - | - | - | skipped: {row['skipped'].splitlines()[0][:100]} |")
            continue
        note = ""
        if "frozen_routing_relative_error" in row:
            note = (
                f"router frozen ({row['freeze_method']}) on the training data: max per-layer deviation "
                f"{row['frozen_routing_relative_error']:.3f} (mean weights: {row['frozen_routing_relative_error_mean']:.3f})"
            )
            if row.get("tune_steps"):
                note += f", then {row['tune_steps']} tuning steps"
        scores = ""
        if with_scores:
            if "accuracy" in row:
                delta = "-"
                if reference is not None:
                    delta = f"{100 * (row['accuracy'] - reference['accuracy']):+.1f} points"
                scores = f" {row['accuracy']:.3f} | {row['loss']:.3f} | {delta} |"
            else:
                scores = " - | - | - |"
        lines.append(
            f"| {row['form']} |{scores} {row['max_abs_diff']:.2e} | {row['latency_ms']:.2f} | "
            f"{row['file_bytes'] / 2**20:.1f} | {note} |"
        )
    return "\n".join(lines)
