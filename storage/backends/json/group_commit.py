"""Group commit: concurrent writers share one lock round and one fsync.

Why: a durable write costs an fsync, and an fsync costs about the same for one line as for a thousand. So writers
do not write: they queue what they want written and wait. The first writer to find no commit running starts a
*leader* task; the leader takes the lock, takes everything queued meanwhile, hands it to one ``write`` call (one
``write()`` and one fsync per file for the whole group), resolves every waiter, and goes round again while more
arrived during that commit. With nothing left queued it ends; there is no background task while the store is idle.

Guarantees, for every backend that uses it:

* **Order.** Writes are handed to ``write`` in the order they were submitted, and a round starts only after the
  previous one has finished, so a later write always sees the earlier ones.
* **Nothing acknowledged that is not durable.** A waiter is resolved only after ``write`` returned. If the round
  fails (the lock timed out, the write raised), every waiter of that round gets that same exception, except one
  whose own input was rejected (a :class:`Failed` outcome), which keeps its own error. Later rounds start afresh.
* **Cancellation.** A caller cancelled while its write is still queued is dropped from the group (nothing of it is
  written); one cancelled after its round started is written all the same, just not waited for.
* **Shutdown.** :meth:`GroupCommit.wait` returns once the leader has finished (everything queued is settled).
  A ``BaseException`` (the leader cancelled, ``KeyboardInterrupt``) fails the round's waiters and ends the leader.

How the bytes reach the disk (inline or in a thread, one file or several) is ``write``'s business, not this
class's: the lock and the write function are the caller's, so the same loop serves the document journal
(:mod:`.json_files`) and the message log (:mod:`.json_messages`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

__all__ = ["GroupCommit", "Failed"]

T = TypeVar("T")  # what a writer submits
R = TypeVar("R")  # what it gets back once its write is durable


class Failed:
    """The outcome of one writer whose own input was rejected: that caller gets ``error``, the group commits on."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class GroupCommit(Generic[T, R]):
    """The queue and the leader loop of one store's group commit (see the module doc).

    ``locked()`` is held for each round. ``write(items, outcomes)`` commits a round's items durably and appends one
    outcome per item to ``outcomes``, in order: the caller's result, or :class:`Failed` to reject that item alone
    (appended as soon as known, so that it stands even if the write then raises). ``after()``, if given, runs
    after each round that did not fail, outside the lock (housekeeping such as compaction).
    """

    __slots__ = ("_after", "_leader", "_locked", "_queue", "_write")

    def __init__(self, locked: Callable[[], AbstractAsyncContextManager[None]],
                 write: Callable[[list[T], list[R | Failed]], Awaitable[None]],
                 after: Callable[[], Awaitable[None]] | None = None) -> None:
        self._locked = locked
        self._write = write
        self._after = after
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._leader: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next round and wait until it is durable; returns its outcome."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._leader is None:
            self._leader = asyncio.create_task(self._lead())
        return await future

    async def wait(self) -> None:
        """Wait until every queued write is settled (the leader has finished). Cancelling the caller does not
        cancel the commit."""
        if self._leader is not None:
            await asyncio.shield(self._leader)

    async def _lead(self) -> None:
        """Commit rounds until nothing is queued (started by the first writer to find no leader)."""
        try:
            while self._queue:
                batch: list[tuple[T, asyncio.Future[R]]] = []
                outcomes: list[R | Failed] = []
                try:
                    async with self._locked():
                        # everyone who queued while we waited for the lock; a done future: its caller was cancelled
                        batch = [entry for entry in self._queue if not entry[1].done()]
                        self._queue = []
                        if batch:
                            await self._write([item for item, _future in batch], outcomes)
                            if len(outcomes) != len(batch):
                                raise RuntimeError(f"group commit: {len(batch)} writes, {len(outcomes)} outcomes")
                            _resolve(batch, outcomes)  # still under the lock: durable is acknowledged, whatever follows
                except BaseException as exc:  # lock timeout, I/O error: fail every writer of this round
                    if not batch:
                        batch, self._queue = self._queue, []
                    _fail(batch, outcomes, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                if self._after is not None:
                    await self._after()
        finally:
            self._leader = None


def _resolve(batch: list[tuple[T, asyncio.Future[R]]], outcomes: list[R | Failed]) -> None:
    for (_item, future), outcome in zip(batch, outcomes):
        if future.done():
            continue  # cancelled after its round started
        if isinstance(outcome, Failed):
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome)


def _fail(batch: list[tuple[T, asyncio.Future[R]]], outcomes: list[R | Failed], exc: BaseException) -> None:
    """Fail every waiter of a failed round with ``exc``, except those already rejected on their own."""
    known = len(outcomes)
    for index, (_item, future) in enumerate(batch):
        if not future.done():
            own = outcomes[index] if index < known else None
            future.set_exception(own.error if isinstance(own, Failed) else exc)
