"""Labelled text for the CLI: the demo's packaged data set, and user JSONL / CSV files."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

# The demo's categories: those of the ChatterBot English corpus with >= 100 distinct utterances.
DEMO_CATEGORIES = ("ai", "coding", "conversations", "emotion", "psychology", "trivia")
DEMO_PER_CATEGORY = 250


class DataError(ValueError):
    """A data file the user gave cannot be used (the message says why)."""


def demo_dataset() -> list[tuple[str, str]]:
    """(utterance, topic) pairs from the ChatterBot English corpus (package ``chatterbot-corpus``,
    BSD-3-Clause, github.com/gunthercox/chatterbot-corpus): each utterance of a topic file's
    conversations, labelled with that file's topic. Utterances that occur under more than one
    topic are dropped; each topic keeps at most DEMO_PER_CATEGORY, picked with a fixed seed."""
    import importlib.resources

    import yaml

    try:
        root = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    except ModuleNotFoundError:
        raise DataError(
            "the demo data set needs the package chatterbot-corpus: pip install -r requirements.txt"
        ) from None
    topics: dict[str, set] = {}
    for name in DEMO_CATEGORIES:
        document = yaml.safe_load((root / f"{name}.yml").read_text(encoding="utf-8"))
        topics[name] = {
            s.strip() for c in document.get("conversations", []) for s in c if isinstance(s, str) and s.strip()
        }
    seen = Counter(t for texts in topics.values() for t in texts)
    rng = random.Random(0)
    pairs = []
    for name in DEMO_CATEGORIES:
        texts = sorted(t for t in topics[name] if seen[t] == 1)
        rng.shuffle(texts)
        pairs += [(t, name) for t in texts[:DEMO_PER_CATEGORY]]
    return pairs


def read_labelled_file(path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    """(text, label) pairs from a JSONL (one object per line) or CSV (with a header) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file: {path}")
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"--data: {path.name} line {number} is not JSON ({e.msg})") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            rows = [(number, row) for number, row in enumerate(reader, 2)]
    else:
        raise DataError(f"--data: expected a .jsonl or .csv file, got {path.name}")
    pairs = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"--data: {path.name} line {number} is not an object")
        for field in (text_field, label_field):
            if field not in row:
                raise DataError(
                    f"--data: {path.name} line {number} has no field {field!r} (fields: {', '.join(map(str, row))})"
                )
        pairs.append((str(row[text_field]), str(row[label_field])))
    if len(pairs) < 2:
        raise DataError(f"--data: {path.name} holds {len(pairs)} example(s); need at least 2")
    return pairs


def split(pairs, eval_fraction: float, seed: int):
    """Stratified, seeded split into (train, held-out)."""
    by_label: dict[str, list] = {}
    for pair in pairs:
        by_label.setdefault(pair[1], []).append(pair)
    rng = random.Random(seed)
    train, held_out = [], []
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        cut = max(1, round(len(items) * eval_fraction)) if len(items) > 1 else 0
        held_out += items[:cut]
        train += items[cut:]
    rng.shuffle(train)
    return train, held_out
