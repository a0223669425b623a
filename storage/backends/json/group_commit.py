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

**The lone writer** (``solo=True``). A leader task costs a task and two event-loop turns per commit, which is most
of a save's Python time when nobody else is writing. So a writer that finds no commit running, no queue, no sign
of concurrency and no other task committing since the loop's last turn commits *in its own task*: the same
``locked()`` and ``write`` with a group of one, no task, no loop turn. Group commit stays for concurrent writers:
a writer arriving while a commit runs, or from another task within the same loop turn as a lone commit, queues
and starts a leader as above, and marks the store *crowded*; while crowded every writer queues, until a leader
round finds a single writer again. Guarantees are the same: cancelled while waiting for the lock, nothing of
it is written; cancelled once its write started, the write completes (``write`` must not abandon it) and the
caller gets the cancellation. A lone writer saving in a tight loop gives the loop a turn at least every
:data:`SOLO_TURN_BUDGET` seconds (a bot's heartbeat shares it). :meth:`wait` waits for lone commits too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

__all__ = ["GroupCommit", "Failed"]

#: A lone writer committing in a tight loop (no await that suspends) gives the event loop a turn after this long.
SOLO_TURN_BUDGET = 0.002

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

    __slots__ = ("_after", "_after_due", "_crowded", "_idle", "_leader", "_locked", "_locked_for", "_queue", "_solo",
                 "_solo_running", "_turn_since", "_turn_task", "_write")

    def __init__(self, locked: Callable[[], AbstractAsyncContextManager[None]],
                 write: Callable[[list[T], list[R | Failed]], Awaitable[None]],
                 after: Callable[[], Awaitable[None]] | None = None, *, solo: bool = False,
                 after_due: Callable[[], bool] | None = None,
                 locked_for: Callable[[T], AbstractAsyncContextManager[None]] | None = None) -> None:
        self._locked = locked
        #: the lone writer's ``locked``, told what it will write (a JSON store offers it to the lock's holder
        #: while it waits, json/slots.py); None: ``locked``
        self._locked_for = locked_for
        self._write = write
        self._after = after
        #: ``after`` runs only when this says it has something to do (a lone save's ``await`` of a coroutine
        #: that found nothing to do cost about 1 us of it); None: always
        self._after_due = after_due
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._leader: asyncio.Task[None] | None = None
        self._solo = solo  # lone writers commit in their own task (see the module doc)
        self._solo_running = False
        self._crowded = False  # concurrent writers seen: queue until a round finds one writer again
        self._turn_task: asyncio.Task[Any] | None = None  # the task that committed alone since the last loop turn
        self._turn_since = 0.0
        self._idle: list[asyncio.Future[None]] = []  # wait() callers waiting for a lone commit to end

    async def submit(self, item: T) -> R:
        """Commit ``item`` (alone, or in the next round) and wait until it is durable; returns its outcome."""
        if self._solo and self._leader is None and not self._solo_running and not self._crowded:
            task = asyncio.current_task()
            if self._turn_task is None:
                self._turn_task, self._turn_since = task, time.perf_counter()
                asyncio.get_running_loop().call_soon(self._turned)
            elif self._turn_task is not task:
                return await self._queued(item)  # another task committed within this loop turn
            elif time.perf_counter() - self._turn_since > SOLO_TURN_BUDGET:
                await asyncio.sleep(0)  # committing back to back without a loop turn: let the loop run first
                return await self.submit(item)  # others may have started writing meanwhile
            # The lone writer's commit, in the caller's task (see the module doc); written out here rather than
            # in a method of its own: a coroutine less per lone save.
            self._solo_running = True
            outcomes: list[R | Failed] = []
            try:
                async with (self._locked() if self._locked_for is None else self._locked_for(item)):
                    await self._write([item], outcomes)
            finally:
                self.alone_done()
            if len(outcomes) != 1:
                raise RuntimeError(f"group commit: 1 write, {len(outcomes)} outcomes")
            outcome = outcomes[0]
            if isinstance(outcome, Failed):
                raise outcome.error
            if self._after is not None and (self._after_due is None or self._after_due()):
                await self._after()
            return outcome
        return await self._queued(item)

    def alone_now(self) -> bool:
        """For a caller that commits a lone write itself, synchronously (no ``await`` in it: the JSON store's put
        while its lease is on, json/store.py): True when the current task may commit alone right now (the
        conditions of :meth:`submit`'s lone path, the turn budget not spent); the caller then commits under the
        lock and calls :meth:`alone_done` after, whatever happened. False: :meth:`submit` instead."""
        if not self._solo or self._leader is not None or self._solo_running or self._crowded:
            return False
        task = asyncio.current_task()
        if self._turn_task is None:
            self._turn_task, self._turn_since = task, time.perf_counter()
            asyncio.get_running_loop().call_soon(self._turned)
        elif self._turn_task is not task or time.perf_counter() - self._turn_since > SOLO_TURN_BUDGET:
            return False  # another task committed this turn, or the loop is due a turn: submit() sees to both
        self._solo_running = True
        return True

    def alone_done(self) -> None:
        """The lone commit that :meth:`alone_now` allowed has ended."""
        self._solo_running = False
        if self._idle:
            idle, self._idle = self._idle, []
            for future in idle:
                if not future.done():
                    future.set_result(None)

    async def _queued(self, item: T) -> R:
        """Queue ``item`` for the leader's next round (starting a leader if none runs) and wait for its outcome."""
        if self._solo:
            self._crowded = True  # a commit is running, or another task committed within this loop turn
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._leader is None:
            self._leader = asyncio.create_task(self._lead())
        return await future

    def _turned(self) -> None:
        self._turn_task = None

    async def wait(self) -> None:
        """Wait until every queued write is settled (the leader and any lone commit have finished). Cancelling
        the caller does not cancel the commit."""
        while self._leader is not None or self._solo_running:
            if self._leader is not None:
                await asyncio.shield(self._leader)
            else:
                idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._idle.append(idle)
                await idle

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
                        if len(batch) <= 1 and not self._queue:
                            self._crowded = False  # one writer again: the next one may commit alone
                except BaseException as exc:  # lock timeout, I/O error: fail every writer of this round
                    if not batch:
                        batch, self._queue = self._queue, []
                    _fail(batch, outcomes, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                if self._after is not None and (self._after_due is None or self._after_due()):
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
