"""Fine-tuning a Hugging Face sequence classifier with Lily: shared by ``lily-ext train`` and ``demo``."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._build.atomic import atomic_directory
from ..checkpoint import write_adapter_files
from ..model import LilyModel, load_adapter
from ..optim import adamw

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "trainer_state.pt"
LABELS_NAME = "labels.json"
CLASSIFIER_HEADS = ("classifier", "score")


def load_base_classifier(model_dir, labels: list[str]):
    """Tokenizer and a sequence-classification model from a local Hugging Face directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: {model_dir} is not a Hugging Face model directory (no config.json)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            local_files_only=True,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return tokenizer, model.eval()


def classifier_heads(model: nn.Module) -> list[str]:
    return [name for name in CLASSIFIER_HEADS if isinstance(getattr(model, name, None), nn.Module)]


def encode(tokenizer, texts, max_length: int):
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def batches(pairs, tokenizer, label_ids: dict, batch_size: int, max_length: int):
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        inputs = encode(tokenizer, [t for t, _ in chunk], max_length)
        inputs["labels"] = torch.tensor([label_ids[l] for _, l in chunk])
        yield dict(inputs)


@torch.no_grad()
def evaluate(model, tokenizer, pairs, label_ids: dict, batch_size: int = 64, max_length: int = 64) -> dict:
    was_training = model.training
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    for batch in batches(pairs, tokenizer, label_ids, batch_size, max_length):
        out = model(**batch)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss += float(out.loss) * len(batch["labels"])
        seen += len(batch["labels"])
    model.train(was_training)
    return {"accuracy": correct / max(seen, 1), "loss": loss / max(seen, 1), "examples": seen}


@dataclass
class TrainState:
    step: int = 0
    losses: list = field(default_factory=list)


def save_training_checkpoint(
    out_dir, model: LilyModel, optimizer, state: TrainState, labels: list[str], extra: dict
) -> Path:
    """out_dir/checkpoint: the adapter, the optimizer and the step, written together atomically."""
    path = Path(out_dir) / CHECKPOINT_DIR
    with atomic_directory(path) as tmp:
        write_adapter_files(model, tmp)
        (tmp / LABELS_NAME).write_text(json.dumps(labels) + "\n")
        torch.save(
            {
                "step": state.step,
                "losses": state.losses,
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "extra": extra,
            },
            tmp / STATE_NAME,
        )
    return path


def resume_training(out_dir, base_model) -> tuple[LilyModel, dict, list[str]] | None:
    """The model and trainer state saved in out_dir/checkpoint, or None when there is none."""
    path = Path(out_dir) / CHECKPOINT_DIR
    if not (path / STATE_NAME).is_file():
        return None
    model = load_adapter(base_model, path, is_trainable=True)
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    labels = json.loads((path / LABELS_NAME).read_text())
    return model, state, labels


def distributed_accelerator():
    """An accelerate.Accelerator when launched on several processes (``accelerate launch``,
    ``torchrun``), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def train(
    model: LilyModel,
    tokenizer,
    train_pairs,
    label_ids: dict,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
    state: TrainState | None = None,
    optimizer=None,
    on_checkpoint=None,
    checkpoint_every: int = 0,
    progress: bool = True,
    accelerator=None,
) -> TrainState:
    """AdamW on the trainable parameters for ``steps`` steps (resuming from ``state``).

    With an ``accelerator`` (several processes), every process draws the same global batch of
    ``batch_size`` examples per process and trains on its own slice; gradients are averaged.
    Ctrl-C stops after the step in flight; ``on_checkpoint(state, optimizer)`` is then called so
    the caller can save a consistent checkpoint, and KeyboardInterrupt is raised again.
    """
    from tqdm.auto import tqdm

    state = state or TrainState()
    optimizer = optimizer or adamw([p for p in model.parameters() if p.requires_grad], lr=lr)
    runner = model
    rank, world = 0, 1
    if accelerator is not None:
        runner, optimizer = accelerator.prepare(model, optimizer)
        rank, world = accelerator.process_index, accelerator.num_processes
        progress = progress and accelerator.is_main_process
    model.train()
    rng = random.Random(seed + state.step)
    order: list = []
    bar = tqdm(total=steps, initial=min(state.step, steps), desc="training", unit="step", disable=not progress)
    try:
        while state.step < steps:
            if len(order) < batch_size * world:
                more = train_pairs[:]
                rng.shuffle(more)
                order += more
            chunk, order = order[: batch_size * world], order[batch_size * world :]
            batch = next(
                batches(
                    chunk[rank * batch_size : (rank + 1) * batch_size], tokenizer, label_ids, batch_size, max_length
                )
            )
            loss = runner(**batch).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training: the loss became {loss.item()} at step {state.step}; lower --lr")
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(state.losses[-20:]) / len(state.losses[-20:]):.3f}")
            bar.update(1)
            if on_checkpoint and checkpoint_every and state.step % checkpoint_every == 0:
                on_checkpoint(state, optimizer)
    except KeyboardInterrupt:
        bar.close()
        if on_checkpoint:
            on_checkpoint(state, optimizer)
        raise
    bar.close()
    model.eval()
    return state


def train_and_score(model, tokenizer, train_pairs, held_out, label_ids: dict, *, steps: int, seed: int) -> dict:
    """Trains with the demo's hyper-parameters (batch 16, lr 2e-3, 64 tokens), then scores the held-out
    pairs: ``{"accuracy", "loss", "seconds"}`` (seconds: the training alone). For the quality benchmarks."""
    started = time.perf_counter()
    train(
        model,
        tokenizer,
        train_pairs,
        label_ids,
        steps=steps,
        batch_size=16,
        lr=2e-3,
        max_length=64,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - started
    scores = evaluate(model, tokenizer, held_out, label_ids, max_length=64)
    return {"accuracy": scores["accuracy"], "loss": scores["loss"], "seconds": seconds}
