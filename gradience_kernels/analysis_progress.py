"""The dependency-free progress bar of ``analysis.analyze`` (stderr, TTY only)."""

from __future__ import annotations

import sys
import threading
import time


class _Progress:
    """A one-line progress bar on stderr (no dependency): on only when stderr is a TTY and
    ``progress`` is not False; with progress=None it appears once the run passes 0.5 s."""

    def __init__(self, total: int, label: str, progress: bool | None, stream=None):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        self.enabled = progress is not False and tty and total > 0
        self.delay = 0.0 if progress else 0.5
        self.total, self.label, self.done = total, label, 0
        self.t0 = time.perf_counter()
        self.last = -1.0
        self.shown = False
        self.width = 0
        self.lock = threading.Lock()  # advanced from the CPU worker pool

    def advance(self, n: int = 1, label: str | None = None) -> None:
        with self.lock:
            self.done = min(self.total, self.done + n)
            if label is not None:
                self.label = label
            if self.enabled:
                self._draw()

    def _draw(self) -> None:
        now = time.perf_counter()
        if now - self.t0 < self.delay or (now - self.last < 0.1 and self.done < self.total):
            return
        self.last = now
        width = 30
        filled = int(width * self.done / self.total)
        text = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                f"{self.done}/{self.total} {now - self.t0:5.1f}s")
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\n")
            self.stream.flush()
