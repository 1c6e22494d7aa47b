"""Progress on long commands: a tqdm bar on a terminal, plain lines elsewhere.

A log file or a pipe would fill with a bar's carriage-return frames, so when stderr is not a
terminal the same progress is a line at every quarter of the work (newcomer trial: convert,
export, score and data prepare were silent for minutes at 65B).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int, desc: str, unit: str) -> Iterator[T]:
    """`items`, reporting how far along they are on stderr (nothing for a single item)."""
    if total <= 1:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    start, marks = time.perf_counter(), {total * q // 4 for q in (1, 2, 3, 4)}
    units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")
    for done, item in enumerate(items, 1):
        yield item
        if done in marks:
            print(f"{desc}: {done}/{total} {units}, {time.perf_counter() - start:.1f} s",
                  file=sys.stderr, flush=True)
