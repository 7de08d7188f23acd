"""Progress lines for long work: counts, rate and ETA, one line per step on stderr.

A plain line per step (not a redrawn bar) because workers run under docker compose, where logs
are line-oriented; tqdm would add a dependency for what is ten lines here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """Report `done/total` with rate and ETA, at most every `every_s` seconds plus at the end."""

    def __init__(
        self, total: int, desc: str, *, every_s: float = 2.0, stream: TextIO | None = None
    ) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._last = -1.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or self._last < 0 or now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = "?" if remaining == float("inf") else f"{remaining:.0f}s"
        print(
            f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%) "
            f"{rate:.1f}/s elapsed {elapsed:.0f}s ETA {eta}",
            file=self.stream,
            flush=True,
        )


def track(items: Iterable[T], total: int, desc: str, *, every_s: float = 2.0) -> Iterator[T]:
    """Yield from `items`, printing progress lines as they are consumed."""
    bar = Progress(total, desc, every_s=every_s)
    for item in items:
        yield item
        bar.update()
