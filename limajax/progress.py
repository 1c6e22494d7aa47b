"""Progress on long commands: a tqdm bar on a terminal, plain lines elsewhere.

A log file or a pipe would fill with a bar's carriage-return frames, so when stderr is not a
terminal the same progress is a line at every quarter of the work (newcomer trial: convert,
export, score and data prepare were silent for minutes at 65B).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def progress(items: Sequence[T], *, desc: str, unit: str) -> Iterator[T]:
    """`items`, reporting how far along they are on stderr as `bar` does (nothing for a single
    item)."""
    if len(items) <= 1:
        yield from items
        return
    with bar(total=len(items), desc=desc, unit=unit) as counter:
        for item in items:
            yield item
            counter.update()


class _Lines:
    """A bar's `update` / `set_postfix_str` as a line at every quarter of the work."""

    def __init__(self, total: int, initial: int, desc: str, unit: str):
        self.total, self.n, self.desc = total, initial, desc
        self.units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")
        self.postfix, self.start = "", time.perf_counter()
        self.marks = {total * q // 4 for q in (1, 2, 3, 4)} - {0}

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if any(before < m <= self.n for m in self.marks):
            extra = f", {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total} {self.units}, "
                  f"{time.perf_counter() - self.start:.1f} s{extra}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(*, total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True):
    """A counter for work that finishes out of order (answers, judgments): a tqdm bar on a
    terminal, quarter lines elsewhere, nothing when not `enabled`."""
    from tqdm import tqdm

    if not enabled or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                    dynamic_ncols=True)
    return _Lines(total, initial, desc, unit)
