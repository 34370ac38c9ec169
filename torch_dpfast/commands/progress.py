"""A one-line progress display: redrawn in place on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, epochs: int, stream=None):
        self.epochs, self.stream = epochs, stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.examples = 0

    def update(self, epoch: int, done: int, total: int, examples: int, loss: float, eps) -> None:
        """After a physical batch: ``done`` of ``total`` batches of ``epoch`` (0-based)."""
        self.examples += examples
        if not self.tty:
            return
        width = 24
        filled = round(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self._line(epoch, loss, eps)} [{bar}] {done}/{total}")
        self.stream.flush()

    def epoch_end(self, epoch: int, loss: float, eps, accuracy: float) -> None:
        line = f"{self._line(epoch, loss, eps)} | test accuracy {accuracy:.3f}"
        self.stream.write(("\r" + line + " " * 20 + "\n") if self.tty else line + "\n")
        self.stream.flush()

    def _line(self, epoch: int, loss: float, eps) -> str:
        rate = self.examples / max(time.perf_counter() - self.start, 1e-9)
        privacy = f"eps {eps:.2f}" if eps is not None else "non-private"
        return f"epoch {epoch + 1}/{self.epochs} | {rate:,.0f} ex/s | loss {loss:.4f} | {privacy}"
