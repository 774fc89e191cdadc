"""How far a long `sample` draw is, on stderr (torch-free, so it costs the command nothing to import).

Nothing for a draw's first PROGRESS_AFTER_S seconds, so a quick draw stays silent; then at most a line every
PROGRESS_EVERY_S, after a batch but the last or inside a batch (the samplers' ``on_step``): one batch of
256-px grids is 1,280 raster steps, minutes on a CPU, that printed nothing before (the scale audit).
"""

from __future__ import annotations

import sys
import time

PROGRESS_AFTER_S = 5.0  # silent before this
PROGRESS_EVERY_S = 10.0  # inside a batch, at most one line this often


class DrawProgress:
    """Progress of drawing n grids batch by batch: `batch(start, size)` before each batch, `step(i, count)` the
    samplers' on_step callback, `batch_done()` after each batch."""

    def __init__(self, n: int, command: str = "sample") -> None:
        self.n, self.command = n, command
        self.t0, self.last = time.perf_counter(), -float("inf")  # the first line may come as soon as PROGRESS_AFTER_S
        self.start, self.size = 0, n

    def batch(self, start: int, size: int) -> None:
        self.start, self.size = start, size

    def _late(self) -> float | None:
        """Seconds since the draw began, once past PROGRESS_AFTER_S (None before)."""
        seconds = time.perf_counter() - self.t0
        return seconds if seconds > PROGRESS_AFTER_S else None

    def _print(self, what: str, seconds: float, fraction: float) -> None:
        left = seconds * (1 - fraction) / fraction
        print(f"{self.command}: {what} drawn in {seconds:.0f} s, ~{left:.0f} s left", file=sys.stderr, flush=True)
        self.last = time.perf_counter()

    def step(self, i: int, count: int) -> None:
        """After step i of count inside the current batch (raster positions, or a masked prior's passes)."""
        seconds = self._late()
        if seconds is None or i >= count or time.perf_counter() - self.last < PROGRESS_EVERY_S:
            return  # the batch's end has its own line
        end = self.start + self.size
        grids = f"grids {self.start + 1:,}-{end:,} of {self.n:,}" if self.size < self.n else f"{self.n:,} grids"
        self._print(f"step {i:,} of {count:,} for {grids}", seconds, (self.start + self.size * i / count) / self.n)

    def batch_done(self) -> None:
        """After a batch but the last, at most a line every PROGRESS_EVERY_S (quick batches of a large --n printed
        hundreds of lines)."""
        done = self.start + self.size
        seconds = self._late()
        if seconds is not None and done < self.n and time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self._print(f"{done:,} of {self.n:,}", seconds, done / self.n)
