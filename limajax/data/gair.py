"""GAIR's LIMA files (`{"conversations": [...], "source": ...}` per line), read and checked, and
the subsets LIMA §5's ablations train on."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from limajax.errors import UserError
from limajax.files import read_jsonl

SPLITS = ("train", "dev", "test")
SAMPLE_DATA = Path(__file__).parents[1] / "sample_data"  # the embedded dialogues, GAIR's schema
# Trained on the sample dialogues by limajax.demo.train_tokenizer (512 pieces, LLaMA's shape):
# a run on the sample data needs no tokenizer of its own.
SAMPLE_TOKENIZER = SAMPLE_DATA / "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class Row:
    """One dialogue: user and assistant turns alternating, user first."""

    id: str  # "<file's split>-<line number>", so a row can be found in the input again
    conversations: tuple[str, ...]
    source: str


def read_gair_file(path: Path, split: str) -> tuple[list[Row], dict]:
    """Read and check one GAIR JSONL file; a bad line is a UserError naming file and line."""
    data = path.read_bytes()
    rows, dropped_turns, skipped = [], 0, 0
    for where, lineno, obj in read_jsonl(path, data):
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "conversations" not in obj:
            raise UserError(f'{where}: no "conversations" field')
        turns, source = obj["conversations"], obj.get("source", "unknown")
        if not isinstance(turns, list):
            raise UserError(f'{where}: "conversations" must be a list of strings')
        if not turns:
            raise UserError(f'{where}: empty dialogue ("conversations" is [])')
        for k, turn in enumerate(turns):
            if not isinstance(turn, str):
                raise UserError(f"{where}: turn {k} is {type(turn).__name__}, expected a string")
        if not isinstance(source, str):
            raise UserError(f'{where}: "source" must be a string')
        if split == "train" and len(turns) % 2 == 1:
            # Some of GAIR's training rows end with a user turn that has no answer: nothing to
            # learn from it, so it goes (as open-instruct does), counted rather than fatal.
            turns, dropped_turns = turns[:-1], dropped_turns + 1
            if not turns:
                skipped += 1
                continue
        rows.append(Row(f"{split}-{lineno:05d}", tuple(turns), source))
    report = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    if split == "train":
        report |= {"trailing_user_turns_dropped": dropped_turns, "rows_without_answer": skipped}
    return rows, report


def read_gair_dir(input_dir: str | Path) -> tuple[dict[str, list[Row]], dict]:
    """GAIR's train.jsonl and, when present, test.jsonl and dev.jsonl, checked."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: no such directory (expected GAIR's train.jsonl in it)")
    if not (input_dir / "train.jsonl").is_file():
        raise UserError(f"{input_dir}: no train.jsonl (GAIR's files: train.jsonl, test.jsonl)")
    splits, inputs = {}, {}
    for split in SPLITS:
        path = input_dir / f"{split}.jsonl"
        if path.is_file():
            splits[split], inputs[path.name] = read_gair_file(path, split)
    if not splits["train"]:
        raise UserError(f"{input_dir / 'train.jsonl'}: no dialogues")
    return splits, {"inputs": inputs}


# --- subsets for LIMA §5's ablations --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Which rows go where. The dev rows are drawn first, so subsets share one dev set."""

    dev_from_train: int = 0  # hold out this many seeded training rows as the dev split
    seed: int = 0
    sample: int | None = None  # keep a seeded sample of this many training rows (§5 quantity)
    sources: tuple[str, ...] | None = None  # keep only these training sources (§5 diversity)


def select(splits: dict[str, list[Row]], options: PrepareOptions) -> tuple[dict, dict]:
    """Apply dev hold-out, source filter and sample to the training rows; report what was done."""
    splits, train = dict(splits), splits["train"]
    if options.dev_from_train:
        if "dev" in splits:
            raise UserError("the input has dev.jsonl and --dev-from-train was given: choose one")
        if not 0 < options.dev_from_train < len(train):
            raise UserError(
                f"--dev-from-train {options.dev_from_train}: must be between 1 and "
                f"{len(train) - 1} (there are {len(train)} training dialogues)"
            )
        order = np.random.default_rng(options.seed).permutation(len(train))
        held = set(order[: options.dev_from_train].tolist())
        splits["dev"] = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if options.sources is not None:
        counts = Counter(r.source for r in train)
        missing = sorted(set(options.sources) - set(counts))
        if missing:
            present = ", ".join(f"{s} ({n})" for s, n in sorted(counts.items()))
            raise UserError(
                f"--sources: no training rows from {', '.join(missing)}; present: {present}"
            )
        train = [r for r in train if r.source in options.sources]
    if options.sample is not None:
        if not 0 < options.sample <= len(train):
            raise UserError(f"--sample {options.sample}: must be between 1 and {len(train)}")
        rng = np.random.default_rng([options.seed, 1])
        keep = rng.choice(len(train), options.sample, replace=False)
        train = [train[i] for i in sorted(keep.tolist())]
    splits["train"] = train
    report = {
        "options": dataclasses.asdict(options),
        "examples": {split: len(rows) for split, rows in splits.items()},
    }
    return splits, report
