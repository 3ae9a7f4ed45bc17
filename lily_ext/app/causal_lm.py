"""``lily-ext train / export --task causal-lm`` and ``lily-ext generate``: Lily on a causal language model,
its decoder export (lily_ext.export_causal_lm) and greedy generation from the folder in ONNX Runtime."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch

from .._build.atomic import atomic_directory
from ..checkpoint import write_adapter_files
from ..model import load_adapter
from ..optim import adamw
from .data import DataError
from .training import CHECKPOINT_DIR, LABELS_NAME, STATE_NAME, TrainState

TASK = "causal-lm"


def read_texts(path, text_field: str, flag: str = "--data") -> list[str]:
    """The ``text_field`` of every object of a JSONL file (or every row of a CSV with a header)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag}: no such file: {path}")
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{flag}: {path.name} line {number} is not JSON ({e.msg})") from None
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(enumerate(csv.DictReader(f), 2))
    else:
        raise DataError(f"{flag}: expected a .jsonl or .csv file, got {path.name}")
    texts = []
    for number, row in rows:
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(f"{flag}: {path.name} line {number} has no field {text_field!r}")
        if str(row[text_field]).strip():
            texts.append(str(row[text_field]))
    if not texts:
        raise DataError(f"{flag}: {path.name} holds no text in field {text_field!r}")
    return texts


def load_causal_lm(model_dir):
    """Tokenizer (with a pad token, left padding) and causal LM from a local Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: {model_dir} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    return tokenizer, model.eval()


def lm_batch(tokenizer, texts, max_length: int) -> dict:
    """input_ids / attention_mask / labels (padding masked with -100: no loss on it)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


@torch.no_grad()
def perplexity(model, tokenizer, texts, max_length: int, batch_size: int = 16) -> float:
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = lm_batch(tokenizer, texts[i : i + batch_size], max_length)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    model.train(was_training)
    return math.exp(total / max(tokens, 1))


def save_checkpoint(out_dir, model, optimizer, state: TrainState, extra: dict) -> Path:
    path = Path(out_dir) / CHECKPOINT_DIR
    with atomic_directory(path) as tmp:
        write_adapter_files(model, tmp)
        (tmp / LABELS_NAME).write_text("[]\n")  # no labels: a language model
        torch.save(
            {"step": state.step, "losses": state.losses, "optimizer": optimizer.state_dict(), "extra": extra},
            tmp / STATE_NAME,
        )
    return path


def train_lm(args, config_for) -> int:
    from tqdm.auto import tqdm

    from .. import get_lily_model

    torch.manual_seed(args.seed)
    texts = read_texts(args.data, args.text_field)
    rng = random.Random(args.seed)
    order = texts[:]
    rng.shuffle(order)
    cut = max(1, round(len(order) * args.eval_split)) if len(order) > 1 and args.eval_split > 0 else 0
    held_out, train_texts = order[:cut], order[cut:]
    tokenizer, base = load_causal_lm(args.model)
    out = Path(args.out)
    checkpoint_dir = out / CHECKPOINT_DIR
    if (checkpoint_dir / STATE_NAME).is_file():
        model = load_adapter(base, checkpoint_dir, is_trainable=True)
        saved = torch.load(checkpoint_dir / STATE_NAME, map_location="cpu", weights_only=False)
        state = TrainState(step=saved["step"], losses=saved["losses"])
        print(f"resuming from {checkpoint_dir} at step {state.step}")
    else:
        model, saved, state = get_lily_model(base, config_for(base)), None, TrainState()
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    model.print_trainable_parameters()
    extra = {"args": {k: v for k, v in vars(args).items() if k != "func"}}

    def checkpoint():
        path = save_checkpoint(out, model, optimizer, state, extra)
        print(f"checkpoint: {path} (step {state.step})", file=sys.stderr)

    model.train()
    batches: list = []
    bar = tqdm(total=args.steps, initial=min(state.step, args.steps), desc="training", unit="step")
    rng = random.Random(args.seed + state.step)
    try:
        while state.step < args.steps:
            if len(batches) < args.batch_size:
                more = train_texts[:]
                rng.shuffle(more)
                batches += more
            chunk, batches = batches[: args.batch_size], batches[args.batch_size :]
            loss = model(**lm_batch(tokenizer, chunk, args.max_length)).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training: the loss became {loss.item()} at step {state.step}; lower --lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(state.losses[-20:]) / len(state.losses[-20:]):.3f}")
            bar.update(1)
            if args.save_every and state.step % args.save_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        print("interrupted: the checkpoint above is consistent; run the same command to resume", file=sys.stderr)
        return 130
    bar.close()
    if not args.save_every or state.step % args.save_every:
        checkpoint()
    if held_out:
        print(
            f"held-out perplexity: {perplexity(model, tokenizer, held_out, args.max_length):.3f} ({len(held_out)} texts)"
        )
    return 0


def export_lm(args) -> int:
    from ..export import export_causal_lm

    adapter = Path(args.adapter)
    if not (adapter / "lily_config.json").is_file():
        raise DataError(f"--adapter: {adapter} is not a lily_ext adapter (no lily_config.json)")
    tokenizer, base = load_causal_lm(args.model)
    model = load_adapter(base, adapter)
    config = model.configs[model.active_adapter]
    routing = config.routing if config.routing_A in (None, "static") else config.routing_A
    if args.form == "merged" and (config.routing != "static" or routing != "static") and not args.calibrate:
        raise DataError(
            f"--form merged: this adapter uses {routing!r} routing; give --calibrate FILE (texts to freeze the router on)"
        )
    calibration = None
    if args.calibrate:
        texts = read_texts(args.calibrate, args.text_field, "--calibrate")
        calibration = []
        for i in range(0, len(texts), 16):
            batch = lm_batch(tokenizer, texts[i : i + 16], args.max_length)
            calibration.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    folder = export_causal_lm(model, args.out, form=args.form, calibration=calibration, tokenizer=tokenizer)
    size = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
    print(f"wrote {folder} ({size:,} bytes, form {args.form}); run it with: lily-ext generate {folder} --prompt ...")
    return 0


def generate_cmd(args) -> int:
    from transformers import AutoTokenizer

    from ..ort import DECODER_CONFIG, generate

    folder = Path(args.folder)
    if not (folder / DECODER_CONFIG).is_file():
        raise DataError(f"{folder}: not a folder written by lily-ext export --task causal-lm (no {DECODER_CONFIG})")
    record = json.loads((folder / DECODER_CONFIG).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    enc = tokenizer(list(args.prompt), padding=True, return_tensors="np")
    tokens = generate(
        folder,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=args.max_new_tokens,
        eos_token_id=record.get("eos_token_id"),
    )
    for prompt, row in zip(args.prompt, tokens):
        new = tokenizer.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True)
        print(prompt + new)
    return 0
