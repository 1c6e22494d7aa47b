"""Reading a judge's free-text answer: which position won a pairwise question (LIMA §4.1), or
which grade an answer got (§4.3's Fail / Pass / Excellent, §5's 1-6 helpfulness scale).

Judges do not answer in one fixed form. GPT-4 writes "Answer A is significantly better.",
FastChat-style prompts get "[[B]]", small models answer "A" or reason first and give the
verdict last. Every form below is searched for; the verdict that occurs last in the text wins
(the conclusion follows the reasoning, as FastChat and Arena-Hard also take the last match).
Nothing is guessed: text with no recognisable verdict is None, and the caller asks again.
"""

from __future__ import annotations

import re

# Positions, as the judge saw them: "A" is the answer shown first.
FIRST, SECOND, NEITHER = "A", "B", "tie"

_FLAGS = re.IGNORECASE

_PAIRWISE = [
    # [[A]] / [[B]] / [[C]] (FastChat's tie) / [[tie]] / [[neither]]
    (re.compile(r"\[\[\s*(A|B|C|tie|neither)\s*\]\]", _FLAGS), None),
    # "Answer A is significantly better", "Response B was clearly better", "A is better"
    (re.compile(r"\b(?:(?:answer|response|option|output)\s+)?\b([AB])\s+(?:is|was)\s+"
                r"(?:\w+\s+){0,2}?better\b", _FLAGS), None),
    # "Neither is significantly better", "neither answer is better", "it's a tie", "equally good"
    (re.compile(r"\bneither\b(?:\s+\w+){0,3}?\s+(?:is|was)\s+(?:\w+\s+){0,2}?better\b"
                r"|\b(?:it'?s|it\s+is)\s+a\s+tie\b|\bequally\s+good\b", _FLAGS), NEITHER),
    # "Verdict: A", "Final answer: Answer B", "Choice: neither"
    (re.compile(r"\b(?:final\s+)?(?:verdict|answer|choice|decision)\s*[:=]\s*[*_\"']*\s*"
                r"(?:answer\s+|response\s+)?(A|B|C|tie|neither)\b", _FLAGS), None),
]

# The whole answer is one bare word: "A", "B.", "**Answer B**", "Neither", "tie".
_BARE = re.compile(r"^[\s*_\"'(\[]*(?:answer\s+|response\s+)?(A|B|C|tie|neither)[\s*_\"'.)\]!]*$",
                   _FLAGS)


def _position(word: str) -> str:
    word = word.lower()
    return {"a": FIRST, "b": SECOND}.get(word, NEITHER)  # c / tie / neither


def parse_pairwise(text: str) -> str | None:
    """"A" (the answer shown first won), "B" (the second), "tie", or None if no verdict is found."""
    if not isinstance(text, str):
        return None
    bare = _BARE.match(text)
    if bare:
        return _position(bare.group(1))
    found = []  # (end position in the text, verdict)
    for pattern, fixed in _PAIRWISE:
        for m in pattern.finditer(text):
            found.append((m.end(), fixed or _position(m.group(1))))
    return max(found)[1] if found else None


GRADES = ("Fail", "Pass", "Excellent")  # LIMA §4.3
_GRADE = re.compile(r"\b(fail|pass|excellent)\b", _FLAGS)
_SCALE_LAST_LINE = re.compile(r"^[\s*_#\[(]*(?:rating|score)?\s*[:=]?\s*[\[(*]*\s*([1-6])"
                              r"\s*(?:/\s*6)?[\s*_\]).]*$", _FLAGS)
_SCALE_ANYWHERE = re.compile(r"\[\[\s*([1-6])\s*\]\]|\b(?:rating|score)\s*[:=]?\s*\**\s*([1-6])\b",
                             _FLAGS)


def parse_grade(text: str) -> str | None:
    """Fail / Pass / Excellent: the last of those words in the answer, or None."""
    found = _GRADE.findall(text or "")
    return found[-1].capitalize() if found else None


def parse_scale(text: str) -> int | None:
    """A 1-6 helpfulness rating (LIMA §5): the number alone on the last line (the rubric asks for
    reasons first, then the number), else the last "[[n]]" or "Rating: n"; or None."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    if lines:
        m = _SCALE_LAST_LINE.match(lines[-1])
        if m:
            return int(m.group(1))
    found = [int(a or b) for a, b in _SCALE_ANYWHERE.findall(text or "")]
    return found[-1] if found else None
