"""Export a fine-tuned classifier in the three ONNX forms, run each in ONNX Runtime, compare to PyTorch."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..calibration import freeze_router
from ..export import FORMS, export_onnx
from ..model import LilyModel

DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def model_inputs(tokenizer, texts, max_length: int) -> dict:
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def for_form(model: LilyModel, form: str, calibration_batches) -> tuple[LilyModel, dict | None]:
    """The model to export for ``form``: merged needs static routing, so a copy is frozen first."""
    if form != "merged" or model.configs[model.active_adapter].routing == "static":
        return model, None
    frozen = copy.deepcopy(model)
    return frozen, freeze_router(frozen, calibration_batches)


def session_for(form: str, path: Path):
    import onnxruntime

    if form == "custom":
        from ..ort import ort_session

        return ort_session(str(path))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_session(session, inputs: dict) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0]


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
) -> list[dict]:
    """One row per form: max |ORT - PyTorch| on ``check_texts`` (other shapes than the export
    example), median latency of one 1 x 16-token request, file size; or the reason it was skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = model_inputs(tokenizer, example_texts, max_length)
    check = model_inputs(tokenizer, check_texts, max_length)
    single = model_inputs(tokenizer, check_texts[:1], 16)
    rows = []
    for form in forms:
        row = {"form": form}
        try:
            target, report = for_form(model, form, calibration_batches)
            if report is not None:
                row["frozen_routing_relative_error"] = max(r["relative_error"] for r in report.values())
            path = out_dir / f"model_{form}.onnx"
            export_onnx(target, (), path, form=form, kwargs=example, dynamic_shapes=DYNAMIC)
            session = session_for(form, path)
            with torch.no_grad():
                expected = target(**check).logits.numpy()
            row["max_abs_diff"] = float(np.abs(run_session(session, check) - expected).max())
            row["latency_ms"] = latency_ms(session, single)
            row["file_bytes"] = path.stat().st_size
            row["path"] = str(path)
        except (ImportError, OSError, RuntimeError) as e:  # e.g. no ORT custom-op library in this build
            row["skipped"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def format_table(rows) -> str:
    lines = ["| form | max abs diff vs PyTorch | latency 1x16 ms | file MB | note |", "|---|---:|---:|---:|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['form']} | - | - | - | skipped: {row['skipped'].splitlines()[0][:100]} |")
            continue
        note = ""
        if "frozen_routing_relative_error" in row:
            note = f"router frozen on the training data (max per-layer deviation {row['frozen_routing_relative_error']:.3f})"
        lines.append(
            f"| {row['form']} | {row['max_abs_diff']:.2e} | {row['latency_ms']:.2f} | {row['file_bytes'] / 2**20:.1f} | {note} |"
        )
    return "\n".join(lines)
