"""Per-token decode latency of exported decoders in ONNX Runtime (CPU EP), per form, plus export time and
folder size (BENCHMARKS.md, "Decoders in ONNX Runtime").

    lily-ext bench decode_ort [--quick] [--layers 4] [--hidden 512] [--threads 1]

A Llama-shaped model (random weights) with Lily r=16, num_B=3 on q_proj / v_proj; forms: base (the
model without adapter), merged (the token-routed adapter frozen on calibration batches), custom and
decomposed with token routing (lily.RoutedMix nodes vs standard ops) and with causal routing (its
state in standard ops in both). Each: prefill a 32-token prompt, then one-token steps (KV cache and
state fed back as OrtValues, DecoderSession) at batch 1 and 8, the forms taking their steps in turn
(load from other processes falls on all of them alike).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path


def _model(layers: int, hidden: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def _lily(base, routing: str):
    import torch

    from ... import LilyConfig, get_lily_model

    model = get_lily_model(
        base, LilyConfig(r=16, num_B=3, target_modules=["q_proj", "v_proj"], routing=routing, init_weights=False)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _session(folder: Path, threads: int):
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    record = json.loads((folder / "lily_decoder.json").read_text())
    if record.get("custom_ops_library"):
        options.register_custom_ops_library(str(folder / record["custom_ops_library"]))
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _interleaved_decode_ms(sessions: dict, batch: int, prompt: int, steps: int, vocab: int) -> dict:
    """Per form: the median ms of one decode step, and the median over steps of (this form's step - base's
    step in the same round). The forms take their steps in turn, so load from other processes falls on all
    of them alike and the paired difference (the adapter's cost) keeps little of it."""
    import numpy as np

    from ...ort import DecoderSession

    ids = np.random.default_rng(0).integers(1, vocab, (batch, prompt))
    runners, logits = {}, {}
    for name, session in sessions.items():
        runners[name] = DecoderSession(session)
        logits[name] = runners[name].start(ids)
    times = {name: [] for name in sessions}
    for _ in range(steps):
        for name, runner in runners.items():
            nxt = logits[name][:, -1].argmax(-1)
            t0 = time.perf_counter()
            logits[name] = runner.step(nxt)
            times[name].append((time.perf_counter() - t0) * 1e3)
    base = times["base"][1:]
    return {
        name: (statistics.median(t[1:]), statistics.median(a - b for a, b in zip(t[1:], base)))
        for name, t in times.items()
    }


def main(argv=None):
    import torch

    from ...export import export_causal_lm

    parser = argparse.ArgumentParser(prog="lily-ext bench decode_ort", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer decode steps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    args = parser.parse_args(argv)
    steps = 12 if args.quick else 60
    torch.set_num_threads(max(1, args.threads))
    base = _model(args.layers, args.hidden)
    vocab = base.config.vocab_size
    calibration = [{"input_ids": torch.randint(1, vocab, (4, 32))} for _ in range(2)]
    variants = {
        "base": lambda: (base, "merged", None),
        "merged (token, frozen)": lambda: (_lily(copy_of(base), "token"), "merged", calibration),
        "custom (token)": lambda: (_lily(copy_of(base), "token"), "custom", None),
        "decomposed (token)": lambda: (_lily(copy_of(base), "token"), "decomposed", None),
        "custom (causal)": lambda: (_lily(copy_of(base), "causal"), "custom", None),
        "decomposed (causal)": lambda: (_lily(copy_of(base), "causal"), "decomposed", None),
    }
    exported, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, make) in enumerate(variants.items()):
            model, form, calib = make()
            folder = Path(tmp) / f"m{i}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                export_causal_lm(model, folder, form=form, calibration=calib)
                export_s = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            exported[name] = (export_s, size)
            sessions[name] = _session(folder, args.threads)
            print(f"  exported {name}: {export_s:.1f} s, {size / 2**20:.1f} MB", flush=True)
        latency = {b: _interleaved_decode_ms(sessions, b, 32, steps, vocab) for b in (1, 8)}
    print(
        f"\nLlama-shaped, {args.layers} layers, hidden {args.hidden}, vocab {vocab}; Lily r=16 num_B=3 on q/v "
        f"({2 * args.layers} layers); ORT {args.threads} thread(s), CPU EP; prompt 32, {steps - 1} steps per form "
        "taken in turn; adapter cost: the median over steps of (form - base) in the same round\n"
    )
    print("| form | ms/token b=1 | adapter cost b=1 | ms/token b=8 | adapter cost b=8 | export s | folder MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (export_s, size) in exported.items():
        (l1, c1), (l8, c8) = latency[1][name], latency[8][name]
        base_1, base_8 = latency[1]["base"][0], latency[8]["base"][0]
        print(
            f"| {name} | {l1:.3f} | {c1:+.3f} ms ({100 * c1 / base_1:+.1f}%) | {l8:.3f} | "
            f"{c8:+.3f} ms ({100 * c8 / base_8:+.1f}%) | {export_s:.1f} | {size / 2**20:.1f} |"
        )
    for b in (1, 8):
        custom, decomposed = latency[b]["custom (token)"][1], latency[b]["decomposed (token)"][1]
        ratio = f"{custom / decomposed:.2f}" if decomposed > 0 else "n/a (decomposed costs nothing measurable)"
        print(f"batch {b}: custom's adapter cost / decomposed's (token routing): {ratio}")


def copy_of(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
