"""A journal fsync in a worker thread while the event loop's thread works out the rest of the same commit.

Why: a batch's inline commit (a 1,000-member ``put_many`` or ``batch_update_members`` at 100k members) was
append + fdatasync (about 1 ms here) and *then* the apply, whose planning (which puts replace what, the size
change: Tables.plan, 0.3-0.4 ms) only reads. The fdatasync releases the GIL, so that planning can run during it:
the commit is as durable as before and visible at the same point (nothing is published or applied before the
fsync returned), just shorter (benchmarks/bench_batch.py, benchmarks/README.md).

The GIL decides the shape. A worker that ran ``pwrite`` + ``fdatasync`` would need the GIL between the two calls
while the loop's thread holds it for the planning (up to the 5 ms switch interval): its fsync would start only
after the planning. So the caller writes, and the worker runs the fdatasync alone; the caller waits until the
worker is about to call it (an :class:`threading.Event`, which releases the GIL) before it takes the GIL back.

The commit stays synchronous, as the inline commit it shortens: the caller blocks until the fsync is done, its
``OSError`` raised in the caller, exactly as an inline ``fdatasync`` would raise it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ...fsutil import sync_fd

__all__ = ["SyncThread"]

log = logging.getLogger("storage.json")

T = TypeVar("T")


class SyncThread:
    """One store's fsync worker (a thread started on first use, ended by :meth:`close`)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        #: seconds the last :meth:`sync_during`'s fsync itself took (not the hand-over: starting the thread on
        #: first use took milliseconds on a loaded machine, which the store's inline estimates must not learn)
        self.last_sync = 0.0

    def sync_during(self, fd: int, work: Callable[[], T]) -> T | None:
        """``fdatasync(fd)`` in the worker while this thread runs ``work`` (which must only read what the fsync
        does not change); ``work``'s result once both are done. None when ``work`` raised (logged: the record is
        durable, and the caller then does the work the plain way), or when there is no worker (then the fsync ran
        here, first)."""
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-fsync")
            started = threading.Event()
            future = self._pool.submit(_sync_started, started, fd)
        except RuntimeError:  # no thread can be started (or the store is closing): the fsync the usual way
            began = time.perf_counter()
            sync_fd(fd)
            self.last_sync = time.perf_counter() - began
            return None
        result: T | None = None
        try:
            started.wait()
            result = work()
        except Exception:
            log.exception("planning a commit during its fsync failed; it is applied the usual way")
        finally:
            self.last_sync = future.result()  # the fsync's OSError, if any; never leave before the fsync is done
        return result

    def close(self) -> None:
        """End the worker (idle: every :meth:`sync_during` waits for its fsync)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


def _sync_started(started: threading.Event, fd: int) -> float:
    """In the worker: say it is running, then fsync (the GIL is released for the caller from here); how long the
    fsync took."""
    started.set()
    began = time.perf_counter()
    sync_fd(fd)
    return time.perf_counter() - began
