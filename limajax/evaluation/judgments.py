"""Sample files in, judgment files out (DESIGN §3), and how two orders make one outcome.

A judgment file is append-only JSONL, one line per (prompt id, order) for pairwise judgments or
per (prompt id, sample) for ratings. Each line carries its cache key: the judge model, the
template's hash and the hashes of the prompt and the answers, so a rerun knows exactly which
judgments are done and never mixes in one that was asked differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from limajax.errors import UserError
from limajax.evaluation.verdicts import FIRST, SECOND
from limajax.files import append_jsonl, drop_torn_last_line, read_jsonl

# formats.py sits beside files.py (it imports only errors and files), so the evaluation can take
# the one GAIR-row rule from it without reaching up the dependency order.
from limajax.formats import check_conversations
from limajax.tokenizer import prompt_turns

ORDERS = ("AB", "BA")  # "AB": file A's answer shown first; "BA": shown second
# A pairwise verdict or a prompt's outcome, naming the files, never the position, the readable
# three first (stats counts them in this order); and their names in summaries:
VERDICTS = ("A", "tie", "B", "unparsed")
OUTCOME_NAMES = dict(zip(VERDICTS, ("a_wins", "ties", "b_wins", "unparsed"), strict=True))
# A pairwise line: its key, the fingerprint that must match for it to count as asked the same
# way, and the fields report reads (compare and compare --human write them all: pairwise_line).
PAIR_KEY = ("id", "order")
PAIR_FINGERPRINT = ("judge", "template", "prompt_sha", "a_sha", "b_sha")
PAIRWISE_FIELDS = (*PAIR_KEY, "verdict", "raw", *PAIR_FINGERPRINT, "a", "b")


def shown_first(seed: int, ident) -> str:
    """Which file's answer ("A" or "B") is shown first for this prompt when only one order is
    asked (compare --orders one; annotate's left side): drawn from (seed, id) alone, so it is
    the same however the files are ordered or subset, and neither file holds the first place
    (a judge's position preference, AlpacaEval's seeded order)."""
    return random.Random(f"{seed}:{ident}").choice(("A", "B"))


def one_order(seed: int, ident) -> str:
    """The order of `shown_first`: "AB" or "BA"."""
    return "AB" if shown_first(seed, ident) == "A" else "BA"


def pairwise_line(ident, order: str, fingerprint: dict, a: str, b: str, len_a: int, len_b: int,
                  position: str, raw, reasks=(), retries: int = 0, **extra) -> dict:
    """One line of a pairwise judgment file, from an LLM judge (compare; judge.run passes the
    last four) or a person (compare --human): the judge chose `position` (FIRST / SECOND shown,
    NEITHER, or "unparsed") with the answers in `order`; the line's verdict names the file."""
    if position in (FIRST, SECOND):
        position = position if order == "AB" else {FIRST: "B", SECOND: "A"}[position]
    return {"id": ident, "order": order, "verdict": position, "raw": raw, "reasks": list(reasks),
            **fingerprint, "a": a, "b": b, "len_a": len_a, "len_b": len_b, "retries": retries,
            **extra, "time": time.time()}


def judgment_rows(paths, fields: tuple[str, ...], key) -> Iterator[tuple[str, dict]]:
    """(where, row) for each line of the judgment files, each an object with `fields`; a line
    whose `key(row)` repeats an earlier line's is refused (a judgment is never counted twice)."""
    seen: dict = {}
    for path in paths:
        for where, _, row in read_jsonl(path):
            if not isinstance(row, dict) or any(f not in row for f in fields):
                raise UserError(f"{where}: not a judgment (expected the fields "
                                f"{', '.join(fields)})")
            if key(row) in seen:
                raise UserError(f"{where}: repeats the judgment of {seen[key(row)]}")
            seen[key(row)] = where
            yield where, row


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    sample: int
    conversations: tuple[str, ...]
    response: str
    where: str  # file:line, for messages

    @property
    def prompt(self) -> str:
        """The prompt as the judge sees it: the question, or the dialogue so far (multi-turn).
        A trailing assistant turn (a dev row's reference answer) is left out, as `sample`
        leaves it out of the model's prompt."""
        turns = prompt_turns(self.conversations)
        if len(turns) == 1:
            return turns[0]
        speakers = ("User", "Assistant")
        return "\n\n".join(f"{speakers[i % 2]}: {turn}" for i, turn in enumerate(turns))


class Samples(dict):
    """{id: Sample} (or {(id, sample): Sample}), and `failed`: how many rows were left out
    because they hold no answer (`sample --endpoint` wrote why the endpoint refused the
    prompt), so that no refusal is ever judged as if it were an answer."""

    failed: int = 0
    failed_ids: frozenset = frozenset()  # their ids: pair_samples counts them as announced


def read_samples(path: str, *, several_per_id: bool = False) -> Samples:
    """{id: Sample} from a `limajax sample` output file ({(id, sample): Sample} with
    several_per_id, for `rate` over `sample --num-samples 5`); failed rows are counted, not
    read."""
    samples = Samples()
    for where, _, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        if "failed" in row:
            samples.failed += 1
            samples.failed_ids = samples.failed_ids | {str(row.get("id"))}
            continue
        for field, kind in (("id", (str, int)), ("conversations", list), ("response", str)):
            if not isinstance(row.get(field), kind) or isinstance(row.get(field), bool):
                what = "a string or integer" if field == "id" else kind.__name__
                raise UserError(f"{where}: expected {field!r} ({what}) as `limajax sample` "
                                "writes it")
        check_conversations(row["conversations"], where)
        index = row.get("sample", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            raise UserError(f"{where}: 'sample' must be an integer")
        s = Sample(str(row["id"]), index, tuple(row["conversations"]), row["response"], where)
        key = (s.id, s.sample) if several_per_id else s.id
        if key in samples:
            what = f"id {s.id!r} sample {s.sample}" if several_per_id else f"id {s.id!r}"
            hint = "" if several_per_id else " (compare takes one answer per prompt)"
            raise UserError(f"{where}: {what} repeats {samples[key].where}{hint}")
        samples[key] = s
    if not samples:
        why = f" ({samples.failed} failed rows, which hold no answer)" if samples.failed else ""
        raise UserError(f"{path}: no samples{why}")
    if samples.failed:  # compare, annotate and rate never leave rows out silently
        print(f"notice: left out {samples.failed} failed rows of {path} (prompts the endpoint "
              "refused: they hold no answer; `limajax sample --endpoint ... --retry-failed` "
              "asks again)", file=sys.stderr)
    return samples


def pair_samples(a_path: str, b_path: str, *, common: bool = False
                 ) -> list[tuple[Sample, Sample]]:
    """The prompts both sample files answered (read_samples), in A's order. Ids in one file
    only are refused unless `common` (--common) makes leaving them out deliberate, and then
    named in a notice: a pair is never dropped without a word. Paired prompts must be the same."""
    a, b = read_samples(a_path), read_samples(b_path)
    pairs = [(sa, b[i]) for i, sa in a.items() if i in b]
    if not pairs:
        raise UserError(f"{a_path} and {b_path} have no prompt id in common (ids like "
                        f"{next(iter(a))!r} vs {next(iter(b))!r})")
    # An id whose row in the other file failed (an endpoint refused it) is announced by the
    # failed rows' notice, not here.
    only = [(path, [i for i in x if i not in y and i not in y.failed_ids])
            for path, x, y in ((a_path, a, b), (b_path, b, a))]
    if any(ids for _, ids in only):
        note = (f"{len(pairs)} prompt ids are in both files; " + "; ".join(
            f"{len(ids)} only in {path}{_few(ids)}" for path, ids in only if ids))
        if not common:
            raise UserError(f"{note}: pass --common to judge only the shared ones")
        print(f"notice: {note}; only the shared ones are used (--common)", file=sys.stderr)
    for sa, sb in pairs:
        if sa.conversations != sb.conversations:
            raise UserError(f"{sb.where}: id {sa.id!r} has another prompt than {sa.where}")
    return pairs


def _few(ids: list[str], most: int = 5) -> str:
    """The ids themselves when few, else the first of them."""
    shown = ", ".join(ids[:most]) + (", ..." if len(ids) > most else "")
    return f" ({shown})"


class JudgmentFile:
    """The judgments already in an output file, by key, and appending new ones.

    `key_fields` name the fields that identify one judgment ("id", "order" or "id", "sample");
    `fingerprint` fields must match for a line to count as the same judgment asked the same way.
    """

    def __init__(self, path: str, key_fields: tuple[str, ...], fingerprint: tuple[str, ...]):
        self.path, self.key_fields, self.fingerprint = path, key_fields, fingerprint
        self.done: dict[tuple, dict] = {}
        self.where: dict[tuple, str] = {}
        self.torn = drop_torn_last_line(path)
        if self.torn:
            print(f"notice: dropped the unfinished last line of {path} (a run was killed while "
                  "writing it)", file=sys.stderr)
        if Path(path).exists():
            for where, row in judgment_rows([path], key_fields + fingerprint, self.key):
                self.done[self.key(row)], self.where[self.key(row)] = row, where

    def key(self, row: dict) -> tuple:
        return tuple(str(row[f]) for f in self.key_fields)

    def check(self, key: tuple, expected: dict) -> bool:
        """True if `key` is already judged with exactly `expected`'s judge, template and hashes;
        a line judged another way is refused rather than silently mixed in."""
        row = self.done.get(key)
        if row is None:
            return False
        differs = [f for f in self.fingerprint if row[f] != expected[f]]
        if differs:
            which = dict(zip(self.key_fields, key, strict=True))
            raise UserError(f"{self.where[key]}: {which} was judged with another "
                            f"{', '.join(differs)}; write these judgments to another --output")
        return True

    def append(self, row: dict) -> None:
        append_jsonl(self.path, row)
        self.done[self.key(row)] = row


def combine(by_order: dict[str, str]) -> str:
    """One outcome per prompt from its judgments in both orders (FastChat MT-Bench's rule):
    A if A wins both, B if B wins both, a tie otherwise; a single order counts as it is; a
    verdict that could not be read makes the prompt `unparsed`, never a guess."""
    verdicts = list(by_order.values())
    if "unparsed" in verdicts:
        return "unparsed"
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return "tie"
