"""The dialogue formats people's data comes in, read into LIMA's turns (user first, alternating
user and assistant), with one reader for `data prepare` and `sample --prompts`.

    gair      {"conversations": ["user", "assistant", ...], "source": ...}   GAIR/lima
    alpaca    {"instruction", "input", "output"} (+ LLaMA-Factory's "history": [[user, asst]])
    sharegpt  {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}
    openai    {"messages": [{"role": "user" | "assistant" | "system", "content": ...}]}

A file is JSON Lines or one JSON array (Alpaca's alpaca_data.json, most ShareGPT dumps); either
way every row is named by its file and line. The format is detected per row and a file must
keep to one. LIMA has no system turn: a system message is put before the first user turn's
text, exactly as `serve` does with a chat request (`system_first`), so a model is trained on
what it is later asked. The same dialogue thus gives the same turns, and token ids, in every
format.

This module sits beside files.py at the bottom of the dependency order (it imports only errors
and files) because three layers check a GAIR row: data prepare, sample and the evaluation, and
the evaluation imports only errors and files (plus the tokenizer's prompt rule): one rule,
`check_conversations`, that none of them has to reach up for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from limajax.errors import UserError
from limajax.files import read_jsonl

FORMATS = ("gair", "alpaca", "sharegpt", "openai")
TEMPLATES = ("lima", "alpaca")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
OPENAI_ROLES = ("user", "assistant", "system")
FIELDS = {  # the fields a format's row is made of (the others pass through to `sample`'s rows)
    "gair": ("conversations",), "sharegpt": ("conversations",), "openai": ("messages",),
    "alpaca": ("instruction", "input", "output", "history"),
}
EXPECTED = ('GAIR {"conversations": [strings]}, Alpaca {"instruction", "input", "output"}, '
            'ShareGPT {"conversations": [{"from", "value"}]} or OpenAI {"messages": [{"role", '
            '"content"}]}')

# Stanford Alpaca's prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), for
# `--template alpaca`; FastChat's "alpaca" template repeats the Instruction/Response headers for
# later turns of a dialogue, and so does this one.
ALPACA_PREAMBLE = {
    False: "Below is an instruction that describes a task. Write a response that appropriately "
           "completes the request.",
    True: "Below is an instruction that describes a task, paired with an input that provides "
          "further context. Write a response that appropriately completes the request.",
}


def check_conversations(obj: Any, where: str, field: str = "conversations") -> list[str]:
    """A GAIR dialogue: a non-empty list of strings. The one rule for data prepare, sample's
    prompts and the evaluation's sample files (design review §3 row 7)."""
    if not isinstance(obj, list):
        raise UserError(f'{where}: "{field}" must be a list of strings, got '
                        f"{type(obj).__name__}")
    if not obj:
        raise UserError(f'{where}: empty dialogue ("{field}" is [])')
    for k, turn in enumerate(obj):
        if not isinstance(turn, str):
            raise UserError(f"{where}: turn {k} is {type(turn).__name__}, expected a string")
    return obj


def system_first(messages: Sequence[tuple[str, str]], where: str) -> list[str]:
    """(role, text) pairs -> LIMA's turns: system texts joined before the first user turn's
    text (LIMA has no system turn; `serve` builds its prompts by this rule), the others
    alternating user, assistant, ... from the user's."""
    system = "\n\n".join(text for role, text in messages if role == "system")
    turns = [(role, text) for role, text in messages if role != "system"]
    for k, (role, _) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise UserError(f"{where}: turns must alternate user, assistant, ... from the "
                            f"user's; turn {k} is {role!r}")
    texts = [text for _, text in turns]
    if not texts:
        raise UserError(f"{where}: no user or assistant turn")
    if system:
        texts[0] = f"{system}\n\n{texts[0]}"
    return texts


def detect(obj: Any) -> str | None:
    """The format a row is written in, or None when it fits none."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "openai"
    if "conversations" in obj:
        conv = obj["conversations"]
        return "sharegpt" if isinstance(conv, list) and conv and isinstance(conv[0], dict) \
            else "gair"
    if "instruction" in obj:  # "output" may be missing in a prompts file (AlpacaEval's has it)
        return "alpaca"
    return None


def _text(obj: dict, key: str, where: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise UserError(f'{where}: {what} needs "{key}" as a string, got '
                        f"{type(value).__name__ if key in obj else 'nothing'}")
    return value


def _gair(obj: dict, where: str) -> tuple[list[str], str]:
    return list(check_conversations(obj["conversations"], where)), ""


def _roles(obj: dict, where: str, field: str, role_key: str, text_key: str,
           roles: dict[str, str]) -> list[str]:
    items = obj[field]
    if not isinstance(items, list) or not items:
        raise UserError(f'{where}: "{field}" must be a non-empty list')
    pairs = []
    for k, item in enumerate(items):
        if not isinstance(item, dict) or item.get(role_key) not in roles:
            got = item.get(role_key) if isinstance(item, dict) else type(item).__name__
            raise UserError(f'{where}: {field}[{k}] needs "{role_key}" one of '
                            f"{', '.join(roles)}, got {got!r}")
        if not isinstance(item.get(text_key), str):
            raise UserError(f'{where}: {field}[{k}] needs "{text_key}" as a string')
        pairs.append((roles[item[role_key]], item[text_key]))
    return system_first(pairs, where)


def _sharegpt(obj: dict, where: str) -> tuple[list[str], str]:
    return _roles(obj, where, "conversations", "from", "value", SHAREGPT_ROLES), ""


def _openai(obj: dict, where: str) -> tuple[list[str], str]:
    return _roles(obj, where, "messages", "role", "content", {r: r for r in OPENAI_ROLES}), ""


def _alpaca(obj: dict, where: str) -> tuple[list[str], str]:
    """The earlier exchanges (LLaMA-Factory's "history"), the instruction, the output; the
    input is returned apart, for the template to place."""
    instruction = _text(obj, "instruction", where, "an Alpaca row")
    # A prompt needs no output; a training row without one is dropped as GAIR's are (gair.py).
    output = [_text(obj, "output", where, "an Alpaca row")] if "output" in obj else []
    input_ = _text(obj, "input", where, "an Alpaca row") if "input" in obj else ""
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p)
            for p in history):
        raise UserError(f'{where}: "history" must be a list of [user, assistant] string pairs')
    return [t for pair in history for t in pair] + [instruction, *output], input_


PARSERS = {"gair": _gair, "alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}


def templated(turns: Sequence[str], template: str, input_: str = "") -> list[str]:
    """Each user turn as the template asks. "lima" (LIMA §3's dialogue format, the default):
    the text as it is, an Alpaca input after its instruction following a blank line (Stanford
    Alpaca's prompt also sets it off by a blank line, under "### Input:"). "alpaca": Stanford
    Alpaca's prompt around the instruction; the turns still end in LIMA's EOT."""
    last_user = len(turns) - 1 - (len(turns) + 1) % 2  # the instruction an input belongs to
    out = []
    for k, turn in enumerate(turns):
        extra = input_ if k == last_user else ""
        if k % 2 == 1:
            out.append(turn)
        elif template == "lima":
            out.append(f"{turn}\n\n{extra}" if extra else turn)
        else:
            head = ALPACA_PREAMBLE[bool(extra)] + "\n\n" if k == 0 else ""
            block = f"\n\n### Input:\n{extra}" if extra else ""
            out.append(f"{head}### Instruction:\n{turn}{block}\n\n### Response:")
    return out


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """One row of a file, as LIMA's turns."""

    turns: tuple[str, ...]
    source: str  # the row's "source" ("unknown" without one): LIMA §5's subsets
    format: str
    where: str  # "file:line"
    lineno: int
    row: dict  # the row as written, for the fields `sample` passes through


def read_rows(path: str | Path, data: bytes | None = None) -> Iterator[tuple[str, int, Any]]:
    """(where, line, value) per row of a JSONL file or of one JSON array (each element named by
    the line it starts on)."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        data = path.read_bytes()
    if not data.lstrip().startswith(b"["):
        yield from read_jsonl(path, data)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    decoder, at = json.JSONDecoder(), text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        line = text.count("\n", 0, at) + 1
        if at < len(text) and text[at] == "]":
            return
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                            ) from None
        yield f"{path}:{line}", line, value


def read_dialogues(path: str | Path, fmt: str | None = None, template: str = "lima",
                   data: bytes | None = None) -> list[Dialogue]:
    """Every row of a file as a Dialogue. `fmt` insists on a format; None detects it from the
    first row and holds every later row to it. A row that fits no format, or not the file's,
    is a UserError naming the file and line."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if template not in TEMPLATES:
        raise UserError(f"--template {template}: expected one of {', '.join(TEMPLATES)}")
    out, first = [], None
    for where, lineno, obj in read_rows(path, data):
        found = detect(obj)
        if fmt is not None and found not in (fmt, None):
            raise UserError(f"{where}: this row is {found}, but --format {fmt} was given")
        if fmt is None and first is not None and found not in (first[0], None):
            raise UserError(f"{where}: this row is {found}, the file's rows are {first[0]} "
                            f"(from line {first[1]}): one format per file")
        # A row of no format in a file of one: that format's own message says what is missing.
        name = fmt or found or (first[0] if first else None)
        if name is None:
            got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{where}: fits none of the formats ({got}); expected {EXPECTED}")
        first = first or (name, lineno)
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if name != "alpaca" and FIELDS[name][0] not in obj:
            raise UserError(f'{where}: no "{FIELDS[name][0]}" field ({name} rows)')
        turns, input_ = PARSERS[name](obj, where)
        source = obj.get("source", "unknown")
        if not isinstance(source, str):
            raise UserError(f'{where}: "source" must be a string')
        out.append(Dialogue(tuple(templated(turns, template, input_)), source, name, where,
                            lineno, obj))
    return out
