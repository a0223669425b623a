"""How a JSON store holds its folder: its mutex, the cross-process file lock, the lease between commits, and the
catch-up with what other processes committed, done (or, for a commit of puts, deferred) on every acquisition.

Why it is one concept: every writer of the folder, in this process or another, goes through the same sequence.
The store's mutex (json/mutex.py) lets one coroutine at a time hold the file lock (json/lock.py); taking that
lock is uncontended in the usual case (no thread hop) and otherwise a dedicated thread blocks in ``flock`` and is
woken by the kernel; once held, the process catches up with the journal (json/tables.py), resolves a restore's or
a forget's intent a crashed process left, and only then may it write. A commit in a run of commits keeps the
lock between them (json/lease.py), and a commit of puts that took the lock far behind may leave its catch-up
until after its own record is durable (:meth:`LockHolding._defer_catch_up`, json/store.py ``_commit_deferred``).

:class:`LockHolding` is a mixin of :class:`~storage.backends.json.store.JsonBackend`, which sets the attributes
declared below in its ``__init__``; the commit path that runs while the lock is held stays in json/store.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

from ... import cancellation
from ...errors import LockTimeoutError, StorageIOError
from . import forget_files as json_forget
from . import restore as json_restore
from .door_waiter import DoorWaiter
from .journal import Journal, encode_record
from .lease import Lease
from .lock import LockBusy, SidecarLock
from .mutex import Mutex
from .slots import CLAIMED, COMMITTED, EMPTY, FAILED, OFFERED, Slots
from .tables import Tables

__all__ = ["LockHolding", "STEP_BACK", "DEFER_BYTES", "in_own_thread"]

log = logging.getLogger("storage.json")

#: A store whose lease ended with a writer waiting leaves the free lock to the waiters for up to this long
#: (json/lock.py ``wait_free``'s ``behind``; it returns as soon as another has taken it, within 0.1-0.3 ms
#: usually). 5 ms was too short beside a full test suite (load ~5 on 2 cores): a woken waiter's thread may wait
#: longer than that for a CPU, and the holder took the lock back for another whole lease (two of eight waits).
STEP_BACK = 0.02

#: A commit of puts that takes the store lock this many journal bytes behind (what other processes committed
#: since it last read), while another writer waits for the lock, writes its record first and applies those records
#: after letting go (:meth:`JsonBackend._commit_deferred`): the catch-up leaves the serialized section. Below it the
#: catch-up is short and the lock (and its lease) is worth keeping. See benchmarks/README.md (issue 15).
DEFER_BYTES = 1 << 15

#: A waiting writer offers its record to the lock's holder (json/slots.py) only while its commits' fsync estimate
#: (:attr:`LockHolding._offer_estimate`: its own appends, and half of each verdict's wait at its door) is at least
#: this many seconds. Why: the offer, the door and the catch-up without the lock cost each writer process about
#: three times the CPU of a plain commit, which pays where the disk is slow (congested disk, SQLite FULL 290-630
#: saves/s: 4 writers 2.1x without slots) and loses where fsyncs are fast and the 2 cores are the limit (a quiet
#: disk at ~7k fsyncs/s: 0.70-0.89x in every repetition; benchmarks/README.md, "slots").
OFFER_MIN_SYNC = 0.0005

#: What :meth:`LockHolding._acquire_file_lock` did with a commit's offer (json/slots.py).
_NOT_OFFERED, _OFFERED, _DONE = 0, 1, 2


class LockHolding:
    """The lock discipline of a :class:`~storage.backends.json.store.JsonBackend` (a mixin: the attributes are
    the store's, set in its ``__init__``)."""

    path: Path
    read_only: bool
    lock_timeout: float
    _journal: Journal
    _tables: Tables
    _flock: SidecarLock
    _mutex: Mutex
    _lease: Lease
    _intent: str  # a restore's intent file (json/restore.py)
    _forget_intent: str  # a forget's (json/forget_files.py)
    _holding: bool  # this store holds the file lock: nobody else can append, skip read refreshes
    _lease_turn: bool  # the lease's end is scheduled for the loop's next turn
    #: The committed end the lock file said when a commit took the lock and deferred its catch-up; None: caught up.
    _behind: int | None
    _let_go_early: bool  # the commit let go of the lock already (json/store.py ``_commit_deferred``): no lease
    _suspect: BaseException | None  # a failed append: the journal is not trusted until it is rewritten
    _slots: Slots  # waiting writers' records offered to the holder (json/slots.py)
    _slots_waiter: DoorWaiter  # the thread that waits at our door
    _peer_committed: bool  # the put this commit offered was committed by the holder before us (json/slots.py)
    _lockless: bool  # ... learned at our door: this commit holds the store's mutex but not the file lock
    _offer_estimate: float  # seconds a commit's fsync takes here lately (see OFFER_MIN_SYNC)

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Translate the operating system's refusals into :class:`StorageIOError` (with the OSError chained)."""
        try:
            yield
        except OSError as exc:
            raise self._io_error(exc, what) from exc

    def _io_error(self, exc: OSError, what: str) -> StorageIOError:
        """:meth:`_io`'s error, for the per-commit path (a ``try`` there costs less than a context manager)."""
        where = exc.filename or self.path
        return StorageIOError(f"{where}: {what} failed: {exc.strerror or exc}", errno=exc.errno, path=str(where))

    def _locked(self) -> AbstractAsyncContextManager[None]:
        """Hold this store's mutex and the cross-process file lock, caught up with the journal (see _Held).

        A read-only store takes only its mutex (and catches up the read-only way): it never writes.
        """
        return _Held(self)

    def _commit_locked(self) -> AbstractAsyncContextManager[None]:
        """:meth:`_locked` for group commit's rounds: those may keep the file lock between them (json/lease.py)."""
        return _CommitHeld(self, None)

    def _commit_locked_for(self, item: object) -> AbstractAsyncContextManager[None]:
        """:meth:`_commit_locked` for a lone writer's commit of ``item``: a list of operations is offered to the
        lock's holder while we wait for it (json/slots.py); when the holder committed it, the commit finds
        :attr:`_peer_committed` set, caught up with it."""
        return _CommitHeld(self, item if type(item) is list else None)

    async def _enter_locked(self) -> None:
        await self._mutex.acquire()
        self._lease.end()  # only commits lease: every other holder takes the lock with every check
        await self._take_lock()

    async def _enter_commit(self, offer: list[Any] | None = None) -> None:
        """:meth:`_enter_locked` for a commit: a lease still on (json/lease.py) is resumed with nothing to check
        (nobody else could commit, nor leave a restore's or a forget's intent, while this store held the lock)."""
        asked = time.monotonic()  # a run of commits is one that asked for the lock soon after the last one ended
        await self._mutex.acquire()
        if self._lease.resume():
            self._holding = True
            return
        await self._take_lock(commit=True, offer=offer)
        if not self.read_only and not self._lockless:
            self._lease.begin(asked)

    async def _take_lock(self, *, commit: bool = False, offer: list[Any] | None = None) -> None:
        """Holding the mutex: take the file lock and catch up (releases the mutex if that fails). ``commit``: for a
        group commit's round, which may defer the catch-up (:meth:`_defer_catch_up`)."""
        try:
            if self.read_only:
                with self._io("reading the journal"):
                    self._tables.refresh_read_only()
                return
            offered = await self._acquire_file_lock(offer)
            if offered == _DONE:  # committed by the holder, applied: nothing to write, no lock taken
                self._peer_committed = self._lockless = True
                return
            self._holding = True
            try:
                self._settle_slots()  # before anything could replace the journal a dead holder's claims name
                if offered and await self._offer_committed():
                    self._peer_committed = True  # the commit is done: caught up with it below, nothing to write
                    self._tables.catch_up()
                elif not (commit and self._defer_catch_up()):
                    self._tables.catch_up()
                if json_restore.intent_pending(self._intent):  # a restore crashed (or is finishing) since open
                    self._catch_up_behind()  # the recovery reads the documents
                    # in a thread: an intent of an earlier version digests every document (0.22 s at 100k members)
                    await cancellation.run_in_thread(json_restore.recover, self.path, self._tables.data,
                                                     self._journal.holds)
                if json_forget.intent_pending(self._forget_intent):  # the same for a forget (storage.lifecycle)
                    self._catch_up_behind()
                    await cancellation.run_in_thread(json_forget.recover, self.path, self._tables.data,
                                                     self._journal.holds)
            except BaseException as exc:
                if offered and self._slots.standing:  # never left offered for a later holder to commit
                    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else None
                    self._slots.abandon_offer(cause or OSError(exc.__class__.__name__))
                self._holding = False
                self._behind = None
                self._peer_committed = False
                self._flock.release()
                if isinstance(exc, OSError):
                    raise self._io_error(exc, "catching up with the journal") from exc
                raise
        except BaseException:
            self._mutex.release()
            raise

    def _defer_catch_up(self) -> bool:
        """Just after a commit took the lock (not leased): whether it may leave the catch-up with what other
        processes committed until after its own record is durable (:meth:`_commit_deferred`); if so, the committed
        end is kept in :attr:`_behind` and True returned.

        Why (issue 15, 4 writer processes): a writer that takes the lock after the others' leases used to read
        and apply their records (hundreds, ~4 us each) under the lock first, while everybody else waited and one
        of the two cores sat idle. Only a put needs no view: a round with anything else catches up before it
        stages (:meth:`_commit_group`), and so does a restore's or a forget's recovery. Only when it pays: far
        enough behind (DEFER_BYTES), and another writer waiting (the lock is let go early, see
        :meth:`_commit_deferred`). Never while the journal is suspect, a reload or locked catch-up is pending,
        the journal file was replaced (another process's compaction), the lock file does not name this file's
        committed end, or what follows that end is not filler (:meth:`Journal.may_write_at`)."""
        tables, journal, flock = self._tables, self._journal, self._flock
        if self._suspect is not None or journal.fd < 0 or tables.need_reload or tables.need_lock or not flock.can_sign:
            return False
        committed = tables.committed()
        if committed is None or committed.ino != journal.ino or committed.end - journal.offset < DEFER_BYTES:
            return False
        if not flock.waited_for() or journal.replaced() or not journal.may_write_at(committed.end):
            return False
        self._behind = committed.end
        return True

    def _catch_up_behind(self) -> None:
        """Under the lock: the catch-up :meth:`_defer_catch_up` left, now after all (a round that reads the view,
        a commit that does not go inline, a recovery)."""
        if self._behind is None:
            return
        self._behind = None
        try:
            self._tables.catch_up()
        except OSError as exc:
            raise self._io_error(exc, "catching up with the journal") from exc

    def _exit_locked(self) -> None:
        try:
            if not self.read_only:
                self._holding = False
                self._flock.release()
        finally:
            self._mutex.release()

    def _exit_commit(self, failed: bool) -> None:
        """:meth:`_exit_locked` for a commit: the lock stays leased after a good commit in a run of them."""
        try:
            if self._lockless:  # the holder committed it (json/slots.py): we never took the lock
                self._lockless = self._peer_committed = False
            elif not self.read_only:
                self._holding = False
                self._behind = None  # a deferred catch-up never done: the view is behind, as any non-holder's
                early, self._let_go_early = self._let_go_early, False
                # a claim left unmarked (json/slots.py ``mark``): let go now, its writer's door opens and the
                # next holder settles it from the journal
                if not self._lease.finish(keep=not (failed or early or self._slots.unmarked)):
                    self._flock.release()  # (nothing to do when _commit_deferred let go already)
                elif not self._lease_turn:  # the loop's next turn ends the lease unless it is hot (json/lease.py)
                    self._lease_turn = True
                    asyncio.get_running_loop().call_soon(self._lease_turned)
        finally:
            self._mutex.release()

    def _lease_turned(self) -> None:
        self._lease_turn = False
        self._lease.turned()

    def _settle_slots(self) -> None:
        """Just after taking the lock: slots a dead holder claimed are settled (json/slots.py). A verdict that
        cannot be written is kept in memory (``settle_orphans``); only headers that cannot be read fail the
        acquisition, with an error that names ``storage.slots``."""
        try:
            self._slots.settle_orphans(self._journal.path.as_posix(), self._committed_state)
        except OSError as exc:
            raise StorageIOError(f"{self._slots.path}: reading the slots of writers waiting for the store lock "
                                 f"failed: {exc.strerror or exc}; this store's writes wait until it can be read",
                                 errno=exc.errno, path=self._slots.path) from exc

    async def _offer_committed(self) -> bool:
        """Holding the lock, after :meth:`_settle_slots`: take our offer back; whether it was committed. A slot
        that says neither OFFERED, FAILED nor COMMITTED was changed behind the protocol's back (``storage.slots``
        truncated): the journal since the offer decides (json/slots.py ``found_in_journal``), searched in a worker
        thread that a cancellation waits for: it reads up to 64 MB, which on the loop's thread stalled it far
        beyond its 20 ms budget."""
        state = self._slots.take_back().state
        if state in (OFFERED, FAILED, COMMITTED):
            return state == COMMITTED
        found = await cancellation.run_in_thread(self._slots.found_in_journal, self._journal.path.as_posix(),
                                                 self._committed_state())
        log.warning("%s: this store's slot was found %s: the journal says its offered write was %scommitted",
                    self._slots.path, "emptied" if state == EMPTY else "damaged", "" if found else "not ")
        return found

    def _committed_state(self) -> tuple[int, int] | None:
        committed = self._flock.committed(trusted_only=True)
        return None if committed is None else (committed.ino, committed.end)

    def _offer(self, ops: list[Any] | None) -> int:
        """Before waiting for another process's lock: offer a commit's operations to the holder (json/slots.py);
        the door's generation, or -1 (not offered)."""
        if (ops is None or self._offer_estimate < OFFER_MIN_SYNC or self._suspect is not None
                or not self._flock.can_sign):
            return -1
        try:
            return self._slots.offer(encode_record(ops), self._journal.generation)
        except OSError:
            return -1  # offers are an optimization: wait and commit as before

    async def _at_door(self, gen: int) -> int:
        """After offering with generation ``gen``: wait at our door (json/slots.py) for the holder to mark our
        slot. _DONE: committed and applied (the view caught up to the committed end, which covers it, without the
        lock); _NOT_OFFERED: it failed (taken back: commit it ourselves); _OFFERED: still offered or claimed (the
        holder let go, or died): wait for the lock, as before."""
        began = time.perf_counter()
        waiter = self._slots_waiter.wait(gen)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.lock_timeout)
        except BaseException as exc:
            committed = await cancellation.run_to_completion(self._withdraw_offer(gen))
            if committed and isinstance(exc, TimeoutError):
                return _DONE  # the holder committed it after all, and it is applied: the put is done
            error = self._wait_failed(exc, "waiting for the store lock")
            if error is exc:
                raise
            raise error from (None if isinstance(exc, TimeoutError) else exc)
        slot = self._slots.peek()
        if slot.state == FAILED:
            self._slots.take_back()
            return _NOT_OFFERED
        if slot.state != COMMITTED:
            return _OFFERED
        tables, journal = self._tables, self._journal
        try:
            tables.follow(locked=False)
        except OSError:
            return _OFFERED  # under the lock, the usual way (take_back says COMMITTED: the catch-up applies it)
        if (tables.need_reload or tables.need_lock or journal.ino != slot.ino
                or journal.offset < slot.at + slot.length):
            return _OFFERED
        self._slots.take_back()
        # the verdict came after about two of the holder's fsyncs (the one running when we offered, then ours):
        # what this writer no longer measures itself while the holder commits for it
        self._offer_estimate = 0.8 * self._offer_estimate + 0.1 * (time.perf_counter() - began)
        return _DONE

    def _wait_failed(self, exc: BaseException, what: str) -> BaseException:
        """What a wait for the store lock that ended with ``exc`` raises: a timeout as :class:`LockTimeoutError`,
        an OSError as StorageIOError, anything else (a cancellation) as it is."""
        if isinstance(exc, TimeoutError):
            return LockTimeoutError(f"{self.path}: another process held the store lock for over "
                                    f"{self.lock_timeout}s")
        if isinstance(exc, OSError):
            return self._io_error(exc, what)
        return exc

    async def _wait_offered(self, gen: int, behind: float = 0.0) -> bool:
        """:meth:`_wait_for_file_lock`; if the wait ends without the lock (cancelled, timed out) while our offer
        stands, the offer is withdrawn, or settled when a holder claimed it (see :meth:`_withdraw_offer`). True:
        the wait timed out but the holder had committed the offer, which is applied: the put is done. ``gen``: the
        offer's door (-1: no offer stands)."""
        try:
            await self._wait_for_file_lock(behind)
        except BaseException as exc:
            if gen >= 0:
                committed = await cancellation.run_to_completion(self._withdraw_offer(gen))
                if committed and isinstance(exc, LockTimeoutError):
                    return True
            raise
        return False

    async def _withdraw_offer(self, gen: int) -> bool:
        """A commit that offered its record (at door ``gen``) gives up waiting; whether the record was committed.
        Offered only: withdrawn, nothing written. Claimed: a holder is writing it, so we wait (bounded by the lock
        timeout) at our door, which its mark, its letting go or its death opens, and under the lock if the slot
        still says claimed then (a dead holder's: settled from the journal); applied if it committed: the
        process's view stays equal to the disk. Committed: applied (from the journal without the lock when that
        reaches it, else under the lock)."""
        try:
            outcome = self._slots.withdraw()
        except OSError:
            return False
        if outcome.state == CLAIMED:  # the holder marks it, lets go or dies: each opens our door
            try:
                await asyncio.wait_for(asyncio.shield(self._slots_waiter.wait(gen)), self.lock_timeout)
            except TimeoutError:
                self._slots.forget_offer()  # the caller is told it may still commit: nobody asks the journal
                raise LockTimeoutError(
                    f"{self.path}: another process held the store lock for over {self.lock_timeout}s with this "
                    "write handed to it to commit: it may still commit it") from None
            try:  # again: an offer still standing is withdrawn now, never left behind for a later holder
                outcome = self._slots.withdraw()
            except OSError:
                pass  # still CLAIMED here: settled under the lock below
            if outcome.state in (OFFERED, FAILED):
                return False
        if outcome.state == COMMITTED:  # taken back by withdraw already
            tables, journal = self._tables, self._journal
            tables.follow(locked=False)
            if not (tables.need_reload or tables.need_lock or journal.ino != outcome.ino
                    or journal.offset < outcome.at + outcome.length):
                return True
        elif outcome.state in (OFFERED, FAILED):
            return False
        # CLAIMED, or a slot found empty or damaged (storage.slots truncated): decided under the lock
        await self._wait_for_file_lock()
        self._holding = True
        try:
            self._settle_slots()
            committed = outcome.state == COMMITTED or await self._offer_committed()
            if committed:
                self._tables.catch_up()
            return committed
        finally:
            self._holding = False
            self._flock.release()

    async def _acquire_file_lock(self, offer: list[Any] | None = None) -> int:
        """Take the file lock. _OFFERED when ``offer`` was offered to the holder meanwhile (json/slots.py: the
        slot then says what became of it), _DONE when the holder committed it and it is applied (the lock is
        then not taken), else _NOT_OFFERED."""
        lease = self._lease
        lease.contended = True  # unless the lock is free at once (json/lease.py: Lease.begin)
        behind = 0.0
        if lease.yielded:  # our last lease ended with a writer waiting: let it go first (json/lease.py)
            lease.yielded = False
            behind = STEP_BACK
        else:
            try:
                if self._flock.try_acquire():  # uncontended: no thread hop
                    lease.contended = False
                    return _NOT_OFFERED
            except OSError as exc:
                raise self._io_error(exc, "taking the store lock") from exc
        if self._flock.can_wait:
            offered = _NOT_OFFERED
            gen = self._offer(offer)
            if gen >= 0:
                offered = await self._at_door(gen)
                if offered == _DONE:
                    lease.contended = False
                    return _DONE
            if await self._wait_offered(gen if offered == _OFFERED else -1, behind):
                lease.contended = False
                return _DONE
            return offered
        if behind:
            try:
                if self._flock.try_acquire():
                    lease.contended = False
                    return _NOT_OFFERED
            except OSError as exc:
                raise self._io_error(exc, "taking the store lock") from exc
        cancel = threading.Event()
        waiter = asyncio.get_running_loop().run_in_executor(None, self._flock.acquire, self.lock_timeout, cancel)
        try:
            with self._io("taking the store lock"):
                await asyncio.shield(waiter)
        except LockBusy:
            raise LockTimeoutError(f"{self.path}: another process held the store lock for over "
                                   f"{self.lock_timeout}s") from None
        except asyncio.CancelledError:
            # Stop the waiting thread and give the lock back if it got it meanwhile, before anyone else (who would
            # share our descriptor) can take it.
            cancel.set()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout=None)
            except (LockBusy, OSError, asyncio.CancelledError):
                pass
            self._flock.release()
            raise
        return _NOT_OFFERED

    async def _wait_for_file_lock(self, behind: float = 0.0) -> None:
        """Wait for another process to let go: a dedicated thread blocks in ``flock`` (woken by the kernel the
        moment the lock is free; see :meth:`SidecarLock.wait_free`). On a timeout or a cancellation the wait is
        abandoned; if the thread gets the lock after all, the descriptor is closed (released) unused.
        ``behind``: see :meth:`SidecarLock.wait_free`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        while True:
            abandoned = threading.Event()
            waiter = in_own_thread(self._flock.wait_free, abandoned, behind)
            try:
                fd = await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - loop.time()))
            except BaseException as exc:
                abandoned.set()
                waiter.add_done_callback(_close_unused)
                error = self._wait_failed(exc, "taking the store lock")
                if error is exc:
                    raise
                raise error from (None if isinstance(exc, TimeoutError) else exc)
            try:
                if self._flock.adopt(fd):
                    return
            except OSError as exc:
                raise self._io_error(exc, "taking the store lock") from exc
            if loop.time() >= deadline:  # the folder stays locked by a process whose sidecar was deleted
                raise LockTimeoutError(f"{self.path}: another process held the store lock for over "
                                       f"{self.lock_timeout}s")
            await asyncio.sleep(0.001)


class _Held:
    """``async with store._locked()``: a plain class, not an ``asynccontextmanager`` (every commit takes it, and
    an async generator per use, registered with the loop, cost several microseconds of a lone save)."""

    __slots__ = ("_store",)

    def __init__(self, store: LockHolding) -> None:
        self._store = store

    async def __aenter__(self) -> None:
        await self._store._enter_locked()

    async def __aexit__(self, *exc: object) -> None:
        self._store._exit_locked()


class _CommitHeld:
    """``async with store._commit_locked()`` (see :meth:`LockHolding._enter_commit`)."""

    __slots__ = ("_item", "_store")

    def __init__(self, store: LockHolding, item: list[Any] | None) -> None:
        self._store = store
        self._item = item

    def __aenter__(self) -> Coroutine[Any, Any, None]:
        # awaited by ``async with`` itself: no coroutine of our own around it
        return self._store._enter_commit(self._item)

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._store._exit_commit(exc_type is not None)


def in_own_thread(fn: Callable[..., int], *args: Any) -> asyncio.Future[int]:
    """Run ``fn`` in a new daemon thread (not the default executor: a wait that is abandoned may block there for
    as long as another process holds the lock, and must not take an executor slot meanwhile)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()

    def settle(result: int | None, error: BaseException | None) -> None:
        if future.cancelled():
            if result is not None and result >= 0:
                os.close(result)  # nobody will adopt it: let go of the lock
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result if result is not None else -1)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # delivered to the awaiting task
            _deliver(loop, settle, None, exc)
            return
        _deliver(loop, settle, result, None)

    threading.Thread(target=run, name="storage-lock-wait", daemon=True).start()
    return future


def _deliver(loop: asyncio.AbstractEventLoop, settle: Callable[[int | None, BaseException | None], None],
             result: int | None, error: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(settle, result, error)
    except RuntimeError:  # the loop is closed: nobody waits any more
        if result is not None and result >= 0:
            os.close(result)


def _close_unused(waiter: asyncio.Future[int]) -> None:
    """A lock wait was abandoned: if the thread got the lock after all, let go of it."""
    if waiter.cancelled() or waiter.exception() is not None:
        return
    fd = waiter.result()
    if fd >= 0:
        os.close(fd)
