"""A periodic progress line (count, rate, ETA) for long host-side loops: embedding a pool, preparing
shards, generating data. One line at most every ``every_s`` seconds plus a final one, so logs of
non-interactive jobs stay short (no carriage returns, unlike a terminal progress bar).

    with Progress("prepare queries", total=len(rows)) as p:
        for row in rows:
            ...
            p.update()      # or p.update(n) after a batch of n

Line: ``[elva_jax] prepare queries: 512/2000 (25.6%), 41.3 items/s, ETA 36 s``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress"]


def _fmt_s(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Counts done items and prints ``label: done/total (pct), rate unit/s, ETA`` every ``every_s``
    seconds (``total`` None: no percentage or ETA). ``log`` receives each line (default: stderr)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "items",
        every_s: float = 10.0,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.done = 0
        self.t0 = self._last = clock()
        self.lines: int = 0

    def line(self) -> str:
        dt = max(self.clock() - self.t0, 1e-9)
        rate = self.done / dt
        if self.total is None:
            return f"[elva_jax] {self.label}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s, {_fmt_s(dt)}"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = self.total - self.done
        eta = f"ETA {_fmt_s(left / rate)}" if rate > 0 and left > 0 else f"done in {_fmt_s(dt)}"
        return f"[elva_jax] {self.label}: {self.done}/{self.total} ({pct:.1f}%), {rate:.1f} {self.unit}/s, {eta}"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self.lines += 1
            self.log(self.line())

    def close(self) -> None:
        self.lines += 1
        self.log(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
