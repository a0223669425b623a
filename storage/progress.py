"""Progress reporting for the long walks (backup, verify, restore, copy), kept out of the library's logic.

The library calls a :class:`Progress` (default: :class:`NullProgress`, which does nothing) with phases and counts;
the command line passes a :class:`TerminalProgress`, which draws a bar when stderr is a terminal and prints a plain
line every few seconds otherwise (a log file or CI output should not fill with carriage returns). Keeping this a
tiny interface means a bot can pass its own object, e.g. to post progress to a Discord channel.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "NullProgress", "TerminalProgress"]


class Progress:
    """What the library reports: ``phase(name, total)`` starts a step of ``total`` records, ``advance(n)`` moves."""

    def phase(self, name: str, total: int | None) -> None:
        """A new step begins; ``total`` is how many records it walks (``None`` when unknown)."""

    def advance(self, n: int = 1) -> None:
        """``n`` more records of the current step are done."""

    def done(self) -> None:
        """The whole operation finished (successfully or not)."""


class NullProgress(Progress):
    """Reports nothing: the default for library calls."""


class TerminalProgress(Progress):
    """A bar on a TTY (redrawn at most 10 times a second), otherwise one plain line every ``interval`` seconds."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None = None, *, interval: float = 5.0, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if not self.tty else 0.1
        self._name = ""
        self._total: int | None = None
        self._n = 0
        self._started = 0.0
        self._last = 0.0
        self._open = False

    def phase(self, name: str, total: int | None) -> None:
        self._finish_line()
        self._name, self._total, self._n = name, total, 0
        self._started = self._last = time.monotonic()
        self._open = True
        if not self.tty:
            size = f" ({total} records)" if total is not None else ""
            self.stream.write(f"{name}{size}...\n")
            self.stream.flush()
        else:
            self._draw(time.monotonic())

    def advance(self, n: int = 1) -> None:
        self._n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def done(self) -> None:
        self._finish_line()

    def _rate(self, now: float) -> float:
        elapsed = now - self._started
        return self._n / elapsed if elapsed > 0 else 0.0

    def _draw(self, now: float) -> None:
        total, n = self._total, self._n
        if self.tty:
            if total:
                filled = min(self.WIDTH, self.WIDTH * n // total)
                bar = "#" * filled + "-" * (self.WIDTH - filled)
                text = f"\r{self._name:<24} [{bar}] {100 * n // total:3d}% {n}/{total} {self._rate(now):,.0f}/s"
            else:
                text = f"\r{self._name:<24} {n} {self._rate(now):,.0f}/s"
            self.stream.write(text + "\x1b[K")
        else:
            of = f"/{total}" if total is not None else ""
            self.stream.write(f"  {self._name}: {n}{of} records, {self._rate(now):,.0f}/s\n")
        self.stream.flush()

    def _finish_line(self) -> None:
        if not self._open:
            return
        self._open = False
        now = time.monotonic()
        if self.tty:
            self._draw(now)
            self.stream.write("\n")
        else:
            self.stream.write(f"  {self._name}: {self._n} records in {now - self._started:.1f}s\n")
        self.stream.flush()
