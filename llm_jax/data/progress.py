"""Progress and ETA for long preprocessing (reading and tokenizing corpora, training a tokenizer).

    progress = Progress("tokenizing train", total=len(text), unit="chars", log=log)
    for doc in docs:
        ...
        progress.update(len(doc))
    progress.close()

or `for doc in track(docs, "tokenizing train", log=log, size=len): ...`. A line is logged at most
every `every` seconds: `tokenizing train: 41% (1.2M/2.9M chars) | 12s | eta 17s`. Work that ends
before the first report logs nothing, so quick runs and tests stay quiet; work that reported
closes with a `done` line. Plain Python, no threads: any loop (data preparation too) can use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

EVERY = 10.0  # seconds between reports unless a caller says otherwise (tests set 0: every update)


def human(n: float) -> str:
    """1234 -> '1.2k', 5_300_000 -> '5.3M'; small numbers as integers."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """42 -> '42s', 150 -> '2m30s', 7300 -> '2h01m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts work done towards `total` (None: unknown, no percentage or ETA) and logs a line with
    the fraction, the elapsed time and an ETA (linear in the work left) every `every` seconds
    (default `EVERY`)."""

    def __init__(self, what: str, total: float | None = None, unit: str = "", log: Callable[[str], None] | None = print,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.what, self.total, self.unit = what, total, unit
        self.log, self.every, self.clock = log, EVERY if every is None else every, clock
        self.done = 0.0
        self.start = self.last = clock()
        self.reported = False

    def update(self, n: float = 1) -> None:
        """Adds `n` units of work done; logs if a report is due."""
        self.set(self.done + n)

    def set(self, done: float) -> None:
        """Sets the work done so far (e.g. parsed from a library's log); logs if a report is due."""
        self.done = done
        now = self.clock()
        if self.log is not None and now - self.last >= self.every:
            self.last, self.reported = now, True
            self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        """'what: 41% (1.2M/2.9M chars) | 12s | eta 17s' (no % or eta when the total is unknown)."""
        elapsed = (self.clock() if now is None else now) - self.start
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.what}: {human(self.done)}{unit} | {duration(elapsed)}"
        frac = min(self.done / self.total, 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        eta_text = duration(eta) if eta == eta else "?"
        return (
            f"{self.what}: {100 * frac:.0f}% ({human(self.done)}/{human(self.total)}{unit}) | {duration(elapsed)} | "
            f"eta {eta_text}"
        )

    def close(self) -> None:
        """Logs the closing line, if this work reported anything before."""
        if self.reported and self.log is not None:
            unit = f" {self.unit}" if self.unit else ""
            self.log(f"{self.what}: done, {human(self.done)}{unit} in {duration(self.clock() - self.start)}")


def track(items: Iterable[T], what: str, total: float | None = None, unit: str = "", log=print,
          every: float | None = None, size: Callable[[T], float] | None = None) -> Iterator[T]:  # fmt: skip
    """Yields `items`, counting each as `size(item)` units (1 by default) towards `total` (default:
    the sum of sizes of a list or tuple, else unknown)."""
    if total is None and isinstance(items, (list, tuple)):
        total = float(sum(size(x) for x in items)) if size else float(len(items))
    progress = Progress(what, total, unit, log, every)
    for item in items:
        yield item
        progress.update(size(item) if size else 1)
    progress.close()
