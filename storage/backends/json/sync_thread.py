"""A worker thread that works out the rest of a commit while the event loop's thread waits for its fsync.

Why: a batch's inline commit (a 1,000-member ``put_many`` or ``batch_update_members`` at 100k members) was
append + fdatasync (about 1 ms here) and *then* the apply, whose planning (which puts replace what, the size
change: Tables.plan, 0.3-0.4 ms) only reads. The fdatasync releases the GIL, so that planning can run meanwhile:
the commit is as durable as before and visible at the same point (nothing is published or applied before the
fsync returned), just shorter (benchmarks/bench_batch.py, benchmarks/README.md).

The fsync stays on the caller's thread, and the planning is only *offered* to the worker: on a loaded machine a
woken thread may wait milliseconds for a CPU, and a commit must not wait for it. Whoever gets to the planning
first takes it (a lock): the worker, while the fsync runs, or nobody, and the caller then plans after the fsync as
it always did. (A worker running the fsync instead, the caller planning, was slower under load: the caller waited
for the worker to be scheduled before the fsync even started.) The offer is made between the write and the
fsync: made before the write, the worker would take the GIL during the ``pwrite`` and the fsync would start only
after the planning.

A batch whose append goes to a worker thread instead (a slow disk: json/store.py ``_may_inline``) makes the same
offer from that thread, during its fsync there (``JsonBackend._timed_sync``): the loop, waiting for the append,
used to plan or apply the batch only after it (1.1-1.9 ms at 100k members under load).

Where the commit can start the record's writeback itself (Linux ``sync_file_range``: fsutil.start_writeback), it
plans on its own thread between that start and the fsync instead, and makes no offer (json/store.py
``_timed_sync``): the planning then overlaps the disk's writing without waiting for a second thread to be
scheduled, which a loaded machine did not do for most batches. This thread is the way elsewhere.

One risk is left: a worker that took the offer and is then descheduled by a CPU-starved machine holds the GIL,
and the caller, its fsync done, waits for it (1-5 ms at a load of 8 on 2 cores, the fsync modelled as a 1 ms
sleep). So a commit that waited longer than the worker's work saved stops the offers for the next
:data:`PAUSE_AFTER_LOSS` commits (they plan after their fsync, as before), then offers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from ...fsutil import sync_fd

__all__ = ["SyncThread"]

log = logging.getLogger("storage.json")

T = TypeVar("T")

_OFFERED, _TAKEN, _WITHDRAWN = 0, 1, 2
#: A commit that waited for the worker this much longer than the worker's work took pauses the offers...
LOSS = 0.0002
#: ... for this many commits.
PAUSE_AFTER_LOSS = 32


class SyncThread:
    """One store's worker (a thread started on first use, ended by :meth:`close`)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        #: seconds the last :meth:`sync_during`'s fsync took (what the store's inline estimates learn)
        self.last_sync = 0.0
        self._paused = 0  # commits left that make no offer (see the module doc)

    def sync_during(self, fd: int, work: Callable[[], T]) -> T | None:
        """``fdatasync(fd)`` on this thread, ``work`` offered to the worker meanwhile (it must only read what the
        commit does not change before it returns). ``work``'s result when the worker did it; None when it did
        not get to it before the fsync was done, or ``work`` raised (logged): the caller then does that work
        itself. Raises the fsync's ``OSError``; either way the worker is no longer running ``work`` on return."""
        offer = _Offer(work)
        offered = not self._paused
        if not offered:
            self._paused -= 1
        judged = self._pool is not None  # not the first offer: its submit starts the thread
        offered_at = time.perf_counter()
        if offered:
            try:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-fsync")
                self._pool.submit(offer.run)
            except RuntimeError:  # no thread can be started (or the store is closing): no offer
                offered = False
        began = time.perf_counter()
        try:
            sync_fd(fd)
        finally:
            self.last_sync = time.perf_counter() - began
            if offered:
                offer.withdraw()
                # what the caller spent beyond its own fsync, against the CPU time the worker spent for it
                if judged and time.perf_counter() - offered_at - self.last_sync - offer.spent > LOSS:
                    self._paused = PAUSE_AFTER_LOSS
        return offer.result

    def close(self) -> None:
        """End the worker (idle: :meth:`sync_during` returns only once it is done with its offer)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)


class _Offer(Generic[T]):
    """Work that the worker runs if it starts before the offer is withdrawn."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._lock = threading.Lock()
        self._state = _OFFERED
        self._done = threading.Event()
        self.result: T | None = None
        #: the worker's CPU seconds on the work (what the caller would have spent; not the time it was descheduled)
        self.spent = 0.0

    def run(self) -> None:
        """In the worker."""
        with self._lock:
            if self._state != _OFFERED:
                return
            self._state = _TAKEN
        began = time.thread_time()
        try:
            self.result = self._work()
        except Exception:
            log.exception("planning a commit during its fsync failed; it is applied the usual way")
        finally:
            self.spent = time.thread_time() - began
            self._done.set()

    def withdraw(self) -> None:
        """No start from now on; if the worker started, wait until it is done."""
        with self._lock:
            if self._state == _OFFERED:
                self._state = _WITHDRAWN
                return
        self._done.wait()
