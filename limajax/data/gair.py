"""The training and test files, in GAIR's schema (`{"conversations": [...], "source": ...}` per
line) or any format of limajax/formats.py, read into GAIR's rows and checked; and the subsets
LIMA §5's ablations train on."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from limajax.errors import UserError
from limajax.formats import read_dialogues

SPLITS = ("train", "dev", "test")
SAMPLE_DATA = Path(__file__).parents[1] / "sample_data"  # the embedded dialogues, GAIR's schema
# Trained on the sample dialogues by limajax.demo.train_tokenizer (512 pieces, LLaMA's shape):
# a run on the sample data needs no tokenizer of its own.
SAMPLE_TOKENIZER = SAMPLE_DATA / "tokenizer.model"
# GAIR's train.jsonl marks LIMA §6's 30 multi-turn dialogues with this source. A copy that lost
# its sources ("unknown", like LLaMA-Factory's lima.json and the fixture made from it) still
# shows them: they are its only rows of more than one exchange, and get this source back.
MULTI_TURN = "multi_turn"


@dataclasses.dataclass(frozen=True)
class Row:
    """One dialogue: user and assistant turns alternating, user first."""

    id: str  # "<file's split>-<line number>", so a row can be found in the input again
    conversations: tuple[str, ...]
    source: str


def read_gair_file(path: Path, split: str, fmt: str | None = None,
                   template: str = "lima") -> tuple[list[Row], dict]:
    """Read and check one input file (GAIR's schema or another of formats.FORMATS); a bad line
    is a UserError naming file and line."""
    data = path.read_bytes()
    rows, dropped_turns, skipped, inferred = [], 0, 0, 0
    dialogues = read_dialogues(path, fmt, template, data)
    for d in dialogues:
        turns, source = d.turns, d.source
        if split == "train" and len(turns) % 2 == 1:
            # Some of GAIR's training rows end with a user turn that has no answer: nothing to
            # learn from it, so it goes (as open-instruct does), counted rather than fatal.
            turns, dropped_turns = turns[:-1], dropped_turns + 1
            if not turns:
                skipped += 1
                continue
        # GAIR's schema only: in ShareGPT or OpenAI dumps many dialogues are multi-turn.
        if split == "train" and d.format == "gair" and source == "unknown" and len(turns) > 2:
            source, inferred = MULTI_TURN, inferred + 1
        rows.append(Row(f"{split}-{d.lineno:05d}", tuple(turns), source))
    report = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest(), "split": split,
              "format": dialogues[0].format if dialogues else fmt}
    if split == "train":
        report |= {"trailing_user_turns_dropped": dropped_turns, "rows_without_answer": skipped,
                   "multi_turn_sources_inferred": inferred}
    return rows, report


def input_files(input_path: Path) -> dict[str, Path]:
    """{split: file}: a directory's train/dev/test .jsonl or .json files, or one file as the
    training split (Alpaca's alpaca_data.json)."""
    if input_path.is_file():
        return {"train": input_path}
    if not input_path.is_dir():
        raise UserError(f"{input_path}: no such file or directory (expected GAIR's train.jsonl "
                        "in a directory, or one training file)")
    found = {}
    for split in SPLITS:
        paths = [p for p in (input_path / f"{split}.jsonl", input_path / f"{split}.json")
                 if p.is_file()]
        if len(paths) > 1:
            raise UserError(f"{input_path}: both {paths[0].name} and {paths[1].name}; keep one")
        if paths:
            found[split] = paths[0]
    if "train" not in found:
        raise UserError(f"{input_path}: no train.jsonl (GAIR's files: train.jsonl, test.jsonl)")
    return found


def read_gair_dir(input_path: str | Path, fmt: str | None = None,
                  template: str = "lima") -> tuple[dict[str, list[Row]], dict]:
    """The training file and, when present, the test and dev files, checked."""
    splits, inputs = {}, {}
    for split, path in input_files(Path(input_path)).items():
        splits[split], inputs[path.name] = read_gair_file(path, split, fmt, template)
    if not splits["train"]:
        raise UserError(f"{input_files(Path(input_path))['train']}: no dialogues")
    return splits, {"inputs": inputs}


# --- subsets for LIMA §5's ablations --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Which rows go where. The dev rows are drawn first, so subsets share one dev set."""

    dev_from_train: int = 0  # hold out this many seeded training rows as the dev split
    seed: int = 0
    sample: int | None = None  # keep a seeded sample of this many training rows (§5 quantity)
    # Keep only these training sources (§5 diversity); "-NAME" leaves NAME out instead, e.g.
    # "-multi_turn" trains without LIMA §6's 30 dialogues.
    sources: tuple[str, ...] | None = None
    format: str | None = None  # the input's format (formats.FORMATS); None: detected per file
    template: str = "lima"  # user turns as LIMA's dialogue format has them, or Alpaca's prompt


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
        drop = {s[1:] for s in options.sources if s.startswith("-")}
        keep = {s for s in options.sources if not s.startswith("-")} or set(counts) - drop
        missing = sorted((keep | drop) - set(counts))
        if missing:
            present = ", ".join(f"{s} ({n})" for s, n in sorted(counts.items()))
            raise UserError(
                f"--sources: no training rows from {', '.join(missing)}; present: {present}"
            )
        train = [r for r in train if r.source in keep - drop]
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
