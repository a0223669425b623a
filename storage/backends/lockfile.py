"""The cross-process lock of the JSON backend, taken on a sidecar file (never on a data file that gets replaced).

On POSIX we keep one descriptor of ``storage.lock`` open for the store's lifetime and ``flock`` it per commit: two
system calls, a few microseconds. filelock re-opens and re-checks the lock file on every acquire (about 130 us here,
measured: more than a group commit's own bookkeeping), so it is used only where ``fcntl`` does not exist (Windows),
where its semantics are the portable ones. Both are advisory locks on the same sidecar file, and every process of
this library on one platform uses the same kind, so they exclude each other.

``flock`` locks belong to the open file description: two stores on the same folder in one process exclude each
other too, as two processes do.

The lock file also carries a *change counter*: its first 8 bytes, memory-mapped, bumped by every commit (under the
lock, after the fsync). A reader compares it with the value it last saw, a memory read, instead of calling
``stat`` on the journal before every ``get`` (which was a third of a ``get``'s cost). Only when it moved does the
reader look at the journal.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

try:  # pragma: no cover - platform switch
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import filelock

__all__ = ["SidecarLock", "LockBusy"]


class LockBusy(Exception):
    """Raised by :meth:`SidecarLock.acquire` when the lock was not free within the timeout."""


class SidecarLock:
    """An exclusive, non-reentrant inter-process lock on ``path``.

    Not thread-safe by itself: the store serializes its use with an ``asyncio.Lock``; a blocking :meth:`acquire`
    may run in a worker thread while the event loop waits for it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._held = False
        self._counter: mmap.mmap | None = None
        self._fallback = filelock.FileLock(str(path), thread_local=False) if fcntl is None else None

    @property
    def held(self) -> bool:
        return self._held

    def _descriptor(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fd

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now; never blocks."""
        if self._fallback is not None:  # pragma: no cover - Windows
            try:
                self._fallback.acquire(timeout=0)
            except filelock.Timeout:
                return False
            self._held = True
            return True
        try:
            fcntl.flock(self._descriptor(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._held = True
        return True

    def acquire(self, timeout: float, cancel: threading.Event | None = None) -> None:
        """Wait up to ``timeout`` seconds for the lock (polling with a short, growing sleep), or raise LockBusy.

        ``cancel`` lets the event loop abandon a wait running in a worker thread: the thread stops within one poll.
        """
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while not self.try_acquire():
            if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                raise LockBusy(str(self.path))
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()
        else:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _mapped(self) -> mmap.mmap:
        if self._counter is None:
            fd = self._descriptor()
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)  # zeros; racing processes all extend to the same 8 zero bytes
            self._counter = mmap.mmap(fd, 8)
        return self._counter

    def read_counter(self) -> int:
        """The change counter (cheap: a read from shared memory)."""
        return int.from_bytes(self._mapped()[:8], "little")

    def bump_counter(self) -> int:
        """Advance the change counter; call while holding the lock, after the change is durable."""
        counter = self._mapped()
        value = (int.from_bytes(counter[:8], "little") + 1) & 0xFFFF_FFFF_FFFF_FFFF
        counter[:8] = value.to_bytes(8, "little")
        return value

    def close(self) -> None:
        self.release()
        if self._counter is not None:
            self._counter.close()
            self._counter = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
