"""People as judges (LIMA §4.1): `limajax annotate` writes one self-contained HTML sheet, and
`compare --human` turns the labels it exports into judgment lines like an LLM judge's."""

from __future__ import annotations

import json
from importlib import resources

from limajax.errors import UserError
from limajax.evaluation.judgments import (
    PAIR_FINGERPRINT,
    PAIR_KEY,
    JudgmentFile,
    one_order,
    pair_samples,
    pairwise_line,
    sha256,
    shown_first,
)
from limajax.evaluation.verdicts import FIRST, NEITHER, SECOND
from limajax.files import read_json, staged_file


def _items(a_path, b_path, seed, common) -> list[dict]:
    """The sheet's items: the prompts both files answered (pair_samples), each with the side
    its A answer is shown on."""
    items = []
    for sa, sb in pair_samples(a_path, b_path, common=common):
        left = shown_first(seed, sa.id)
        shown = (sa, sb) if left == "A" else (sb, sa)
        items.append({"id": sa.id, "prompt": sa.prompt, "left": left,
                      "left_text": shown[0].response, "right_text": shown[1].response,
                      "prompt_sha": sha256(sa.prompt), "a_sha": sha256(sa.response),
                      "b_sha": sha256(sb.response)})
    return items


def sheet_template() -> str:
    return resources.files("limajax.evaluation").joinpath("templates/sheet.html").read_text()


def annotate(a_path: str, b_path: str, output: str, *, seed: int = 0, common: bool = False
             ) -> int:
    """Write the sheet for every prompt both files answered (ids in one file only are refused
    unless `common`); returns the number of items."""
    items = _items(a_path, b_path, seed, common)
    page = sheet_template()
    data = {"a": a_path, "b": b_path, "seed": seed, "items": items}
    # The sheet's identity: its items and its wording; the browser keeps work under it.
    data["sheet"] = sha256(json.dumps(data, sort_keys=True) + page)[:16]
    # "</" inside a <script> block would end it early; "<\/" is the same JSON string.
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    with staged_file(output) as f:
        f.write(page.replace("/*SHEET*/", blob, 1))
    return len(items)


def labels_to_judgments(labels_path: str, a_path: str, b_path: str, output: str, *,
                        common: bool = False) -> int:
    """Append one judgment per labelled item (order "AB" when A's answer was on the left),
    checking the labels belong to these sample files (ids in one file only are refused unless
    `common`); returns how many were new."""
    labels = read_json(labels_path)
    for field in ("sheet", "seed", "labels"):
        if field not in labels:
            raise UserError(f"{labels_path}: no {field!r}; expected the JSON the sheet exports")
    items = {it["id"]: it for it in _items(a_path, b_path, labels["seed"], common)}
    template = sha256(sheet_template())
    out = JudgmentFile(output, PAIR_KEY, PAIR_FINGERPRINT)
    new = 0
    for k, label in enumerate(labels["labels"]):
        where = f"{labels_path}: label {k + 1}"
        ident, choice, left = label.get("id"), label.get("choice"), label.get("left")
        if ident not in items:
            raise UserError(f"{where}: id {ident!r} is not a prompt both {a_path} and {b_path} "
                            "answered")
        item = items[ident]
        if left != item["left"]:
            raise UserError(f"{where}: id {ident!r} was shown with {left} on the left, but seed "
                            f"{labels['seed']} puts {item['left']} there: a sheet of other files?")
        if (label.get("a_sha"), label.get("b_sha")) != (item["a_sha"], item["b_sha"]):
            raise UserError(f"{where}: id {ident!r} was labelled on other answers than those in "
                            f"{a_path} and {b_path} now")
        if choice not in ("left", "right", "neither"):
            raise UserError(f"{where}: choice {choice!r}; expected left, right or neither")
        order = one_order(labels["seed"], ident)  # the order the sheet showed (checked above)
        fingerprint = {"judge": "human", "template": template, "prompt_sha": item["prompt_sha"],
                       "a_sha": item["a_sha"], "b_sha": item["b_sha"]}
        if out.check((ident, order), fingerprint):
            continue
        shown = len(item["left_text"]), len(item["right_text"])
        len_a, len_b = shown if order == "AB" else shown[::-1]
        position = {"left": FIRST, "right": SECOND, "neither": NEITHER}[choice]
        out.append(pairwise_line(ident, order, fingerprint, a_path, b_path, len_a, len_b,
                                 position, choice, sheet=labels["sheet"]))
        new += 1
    return new
