"""The thread in which a JSON store waits at its door (json/slots.py) for the holder to commit its offered record.

Why a kept thread: a writer that offers waits for every one of its saves (four writer processes: thousands a
second), and a thread started per wait cost each process about 0.4 s of CPU in a 2 s window on 2 cores (measured
with ``bench_peers.py --counters``), which the writers share with the work they wait for. The wait blocks in the
kernel (``F_OFD_SETLKW``) and cannot be interrupted: a wait that is given up (cancelled, timed out) goes on until
the door opens, which the holder does at the latest when it lets go of the store lock. A wait asked for while the
kept thread is still in such a wait gets a thread of its own (json/holding.py ``in_own_thread``'s way).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

__all__ = ["DoorWaiter"]


class DoorWaiter:
    """One store's door waits (see the module doc): :meth:`wait` returns a future resolved once the door opened."""

    def __init__(self, wait_door: Callable[[int], None]) -> None:
        self._wait_door = wait_door
        self._cond = threading.Condition()
        self._job: tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._busy = False
        self._thread: threading.Thread | None = None
        self._closed = False

    def wait(self, gen: int) -> asyncio.Future[None]:
        """Wait (in a thread) at the door of generation ``gen``; the future is resolved (or fails with the
        OSError) when it opened. Never blocks the caller."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._busy or self._closed:  # the kept thread still waits for an abandoned wait: one of its own
                threading.Thread(target=self._run_one, args=(gen, loop, future), daemon=True,
                                 name="storage-door-wait").start()
                return future
            self._busy = True
            self._job = (gen, loop, future)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True, name="storage-door")
                self._thread.start()
            else:
                self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    if not self._cond.wait(30.0) and self._job is None:
                        self._thread = None  # idle: end (the next wait starts a thread again)
                        return
                if self._job is None:
                    self._thread = None
                    return
                gen, loop, future = self._job
                self._job = None
            self._run_one(gen, loop, future)
            with self._cond:
                self._busy = False

    def _run_one(self, gen: int, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        error: BaseException | None = None
        try:
            self._wait_door(gen)
        except BaseException as exc:  # delivered to the waiting task
            error = exc
        try:
            loop.call_soon_threadsafe(_settle, future, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)
