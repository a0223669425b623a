"""Heavy work off the event loop: a bot's gateway heartbeat and command replies share the loop with its storage.

Backups, restores and copies walk every record (encode, hash, compress); done inline, a large collection held the
loop for long enough to miss a heartbeat. They instead hand the work to a worker thread in chunks: the loop only
collects a chunk and awaits the thread, and a thread running Python code gives the GIL back every switch interval,
so the loop keeps ticking (the stalls are measured by benchmarks/bench_backup.py).
"""

from __future__ import annotations

import math
import time
from asyncio.events import _get_running_loop as _running_loop  # the C accessor: no exception when there is none
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from .cancellation import run_in_thread

__all__ = ["off_loop", "chunks", "CHUNK_RECORDS", "Pacer", "PACED"]

T = TypeVar("T")
#: Records handed to a worker thread at a time: collecting them on the loop costs a few ms at most.
CHUNK_RECORDS = 2000


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread. If the caller is cancelled, this waits for the thread to finish before
    re-raising: whatever the thread writes to (a backup file, a digest) is never closed or released under it."""
    return await run_in_thread(fn, *args)


async def chunks(items: AsyncIterable[T], size: int = CHUNK_RECORDS) -> AsyncIterator[list[T]]:
    """The items of ``items`` in lists of ``size`` (the last one shorter)."""
    chunk: list[T] = []
    async for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Pacer:
    """Pauses a worker thread now and then, so that the event loop gets the GIL.

    Why a thread running Python is not enough: CPython asks the thread holding the GIL to hand it over only after a
    waiting thread saw no hand-over for a switch interval (5 ms), and any release and retake counts as one. A worker
    that alternates short C calls with system calls (``open``, ``pread``, ``write``, a pool's ``fsync`` finishing),
    or two workers busy at once, hand the GIL over all the time, but to each other or back to themselves: the
    waiting event loop thread is never granted a switch request and gets the GIL only when the OS happens to run it
    in the instant it is free (the ``status`` count's loop waited 50-110 ms at a time, ``bench_stalls.py
    --holders`` finding the counting thread at its ``pread``; benchmarks/README.md "GIL convoy"). A real sleep
    leaves the GIL free long enough for the loop to take it.

    One pacer per piece of work in one thread; call :meth:`tick` between small steps (a file, a group of records):
    it costs one clock read, and sleeps :attr:`PAUSE` once :attr:`WORK` has passed since the last pause. The work
    itself is unchanged, only spread out (about 13% longer at most)."""

    __slots__ = ("_since", "_work")

    #: Seconds of work between pauses, and the pause.
    WORK = 0.002
    PAUSE = 0.0003

    def __init__(self) -> None:
        self._since = time.perf_counter()
        self._work = self.WORK if PACED.get() else math.inf

    def tick(self) -> None:
        """A pause, once :attr:`WORK` has passed since the last one; never on an event loop's own thread (a helper
        shared by a worker and the loop, as a backup file's reader is, must not put the loop itself to sleep)."""
        if time.perf_counter() - self._since >= self._work:
            if _running_loop() is None:
                time.sleep(self.PAUSE)
            self._since = time.perf_counter()


#: Whether the pacers made in this context pause. A child process of ours (storage/child.py) runs the same readers
#: with no event loop to let in: there a pause only costs time (a sleeping thread on a busy host gives its core
#: away: 0.3 ms pauses every 2 ms made a thread's work 40% longer in wall time at load 5).
PACED: ContextVar[bool] = ContextVar("storage_paced", default=True)
