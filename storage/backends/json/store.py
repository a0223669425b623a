"""The embedded default backend: plain JSON files in a folder, made durable, process-safe and fast.

Layout (``config/`` by default)::

    members.json        {"<guild_id>_<user_id>": {...}, ...}   the seed's file, plain JSON (a snapshot)
    <collection>.json   the same shape for every other collection
    storage.journal     committed changes since the snapshots, one fsynced JSON line per commit
    storage.lock        the sidecar file that the cross-process lock (filelock) is taken on

How it stays correct:

* **Durable.** A write returns only after its journal line is fsynced. Snapshots are rewritten with temp file +
  fsync + ``os.replace`` + directory fsync, so a file is always either the old or the new version.
* **Process-safe.** Every commit happens under the file lock, after catching up with the journal, so two processes
  never both write from a stale view, and ``update()`` runs its function on the latest document. Commits back to
  back keep the lock between them (json/lease.py: nobody else can write meanwhile, so there is nothing to catch
  up with), for at most about 10 ms while another writer waits. A commit of puts that takes the lock far behind
  while others wait for it writes its record at the committed end first, lets go, and only then applies what the
  others committed before it, then its own, before it returns (``_commit_deferred``: puts do not read the view).
  Readers ``stat`` the journal before each read and apply what other processes appended. A small put that finds
  the lock taken is offered to its holder instead (json/slots.py): the holder's one record and one fsync carry it,
  and its writer, told at its door, applies the journal up to the committed end before it acknowledges.
* **Fast.** A save costs one appended line and one fsync, whatever the store's size. Concurrent writers in one
  process are grouped into one line and one fsync (group commit). When the journal outgrows what compaction would
  rewrite, the changed collections' snapshots are rewritten and the journal starts afresh.
* **Never loses data on bad input.** An unreadable snapshot raises :class:`CorruptDataError` naming the file and
  byte position and is left as it is; only a torn final journal record (never acknowledged) may be dropped.

Every document is held in memory in its encoded form (bytes): compact, and a ``get`` returns a fresh ``dict``.

Who does what: :class:`~storage.backends.json.tables.Tables` (tables.py) owns the documents in memory, the snapshot
files, loading, following other processes' commits and compaction; :class:`~.holding.LockHolding` (holding.py)
how the store takes and keeps the lock and catches up on taking it; :class:`JsonBackend` owns group commit and the
one commit path (append + fsync, publish the committed end, apply), and decides when the journal is trusted;
:class:`~.transaction.JsonTransaction` (transaction.py) stages a transaction's changes for that path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ... import cancellation
from ...config import StoreConfig
from ...documents import apply_update
from ...errors import (
    DatabaseError,
    LockTimeoutError,
    ReadOnlyError,
    StorageIOError,
    ValidationError,
)
from ...expiry import to_micros
from ...feed import ChangeFeed
from ...fsutil import TEMP_MARK, make_dirs, start_writeback, sync_fd
from ...interfaces import BackendTransaction, ExportSink, MessageSummary, MessageSwap, MigrationLock
from ...member_calls import MembersMixin
from ...member_fast import encode_member_save
from ...messages.columns import MessageColumns
from ...messages.records import VALIDATE_IN_THREAD
from ...models import MEMBERS, member_key
from ...offload import off_loop
from ...protocol import Document, UpdateFn
from ...query.plan import Query
from ...types import Member
from ..base import BackendBase
from . import forget_files as json_forget
from . import restore as json_restore
from .door_waiter import DoorWaiter
from .expiry import dead_keys, live_expiries, live_mapping, visible
from .feed import JsonFeed
from .filler import MIN_CHUNK
from .group_commit import Failed, GroupCommit
from .holding import LockHolding
from .indexes import build_indexes
from .journal import Journal, Op, encode_in_slices, encode_record, parse_record
from .lazy import SIZES_AFTER, Lazy
from .lease import Lease
from .lifecycle import JsonLifecycle
from .listing import ITEMS_INLINE, ITEMS_TURN, select, select_from
from .lock import LockBusy, SidecarLock
from .message_export import export_records
from .message_queries import JsonMessageQueries
from .messages import MESSAGES_DIR, MessageLog, encode_batch
from .migration_lock import FileMigrationLock
from .mutex import Mutex
from .presence import Presence
from .put_run import PutRun
from .puts import column_ops, put_ops
from .query import Mode, QueryAnswers, run_query
from .restore import RestoreSwap
from .slots import COMMITTED, FAILED, Claim, Slots, combine
from .sync_thread import SyncThread
from .tables import BULK_APPLY, Plan, Staged, Tables
from .transaction import JsonTransaction, release_staged

__all__ = ["JsonBackend", "JsonTransaction", "JOURNAL_NAME", "LOCK_NAME"]

_B = TypeVar("_B", bound="JsonBackend")

log = logging.getLogger("storage.json")

JOURNAL_NAME = "storage.journal"
LOCK_NAME = "storage.lock"
#: the slots in which writers waiting for the lock offer their record to its holder (json/slots.py)
SLOTS_NAME = "storage.slots"
#: A holder's record with the waiting writers' records it claims stays below this (one line, one fsync).
MAX_GROUP_BYTES = 1 << 16
#: Append+fsync runs on the event loop while it has recently taken less than this many seconds (see _commit).
INLINE_SYNC_BUDGET = 0.0005
#: The same for a record larger than a filler chunk (a batch: json/filler.py MIN_CHUNK), measured apart. Why: a
#: 1,000-member batch's append + fdatasync takes 0.4-0.55 ms here, at the edge of INLINE_SYNC_BUDGET, so about
#: half the batches of a run paid a thread hop (~0.3 ms, and the loop turns it costs) and the batch row of
#: benchmarks/bench_peers.py swung between 0.8x and 1.4x SQLite FULL from run to run. A batch goes inline while
#: both estimates (its own and the small records', which sees a slower disk first) are under this, and never past
#: INLINE_MAX_BYTES. 4 ms, not the small records' 0.5: on a congested disk (fsyncs of 1-3 ms) a batch sent to a
#: thread paid two thread wake-ups on top (1-2.5 ms on a loaded 2-core host: 8-12 ms a batch against 4.4-10 ms
#: inline, benchmarks/README.md), while held on the loop its fsync is a fifth of the 20 ms stall budget at most.
INLINE_BATCH_BUDGET = 0.004
#: A record of more bytes than this always has its append + fsync in a worker thread, whatever the estimates say.
INLINE_MAX_BYTES = 1 << 20
#: A commit of more operations than this is encoded and planned in a worker thread, appended in a thread, and
#: applied with C-level dict updates (see Tables.plan).
LARGE_COMMIT = 2000
#: A commit of at least this many operations (a batch) plans its apply while the disk writes its record (the
#: writeback started before the fsync, or the planning offered to the sync thread: _timed_sync); fewer: the
#: writeback's call or the hand-over would cost more than it saves.
PLAN_DURING_SYNC = max(BULK_APPLY, 256)
_first, _second = itemgetter(0), itemgetter(1)
_TEMP_RE = re.compile(r".+" + re.escape(TEMP_MARK) + r"\d+-[0-9a-f]{8}\Z")


#: A write waiting for the next group commit: turns the view so far into its ops and the caller's result.
_Prepare = Callable[[Staged], tuple[list[Op], Any]]
#: What a group commit takes as operations rather than as a prepare (puts: no view to read).
_PUTS = (list, PutRun)


class JsonBackend(LockHolding, QueryAnswers, JsonLifecycle, JsonMessageQueries, BackendBase):
    """The JSON-files backend. Open it with :func:`storage.open_store` (or ``await storage.JsonStore.open(path)``,
    this backend with the features of :mod:`storage.stores`)."""

    backend_name = "json"

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        self.path = Path(config.path)
        self.lock_timeout = config.lock_timeout
        self.read_only = config.read_only
        self._journal = Journal(self.path / JOURNAL_NAME, read_only=self.read_only)
        self._intent = json_restore.intent_path(self.path)
        self._forget_intent = json_forget.intent_path(self.path)  # a forget's (forget_files.py)
        self._flock = SidecarLock(self.path / LOCK_NAME, read_only=self.read_only)
        #: this store's share of the folder while open for writing: the last to close folds (json/presence.py)
        self._presence = Presence(self.path / LOCK_NAME)
        #: the committed documents, their snapshot files, catch-up and compaction (tables.py)
        self._tables = Tables(self.path, self._journal, self._flock, read_only=self.read_only)
        self._mutex = Mutex()  # one holder of the file lock per store, across coroutines (json/mutex.py)
        self._holding = False  # this store holds the file lock: nobody else can append, skip read refreshes
        #: commits back to back keep the file lock between them (json/lease.py)
        self._lease = Lease(self._flock)
        self._lease_turn = False  # the lease's end is scheduled for the loop's next turn
        #: The committed end the lock file said when this commit took the lock and deferred its catch-up (see
        #: _commit_deferred); None: caught up, as after every other acquisition. Cleared when the lock is let go.
        self._behind: int | None = None
        self._let_go_early = False  # _commit_deferred let go of the lock already: no lease
        #: waiting writers' records offered to the lock's holder, and those it claims (json/slots.py)
        self._slots = Slots(os.fspath(self.path / SLOTS_NAME), self._committed_state)
        self._journal.kept_needed = self._slots.kept_needed  # what a waiting writer may read (json/slots.py)
        self._peer_committed = False  # the lone put this commit offered was committed by the holder before us
        self._lockless = False  # ... and we learned it at our door, without taking the lock (json/slots.py)
        self._slots_waiter = DoorWaiter(self._slots.wait_door)  # the kept thread of those door waits
        if not self.read_only:
            self._flock.on_taken = self._slots.close_doors
            self._flock.on_release = self._slots.open_doors
        self._commits: GroupCommit[_Prepare | list[Op] | PutRun, Any] = GroupCommit(
            self._commit_locked, self._commit_group, after=self._maybe_compact, solo=True,
            after_due=self._compaction_may_be_due, locked_for=self._commit_locked_for)
        #: Tables.compaction_due is asked again only once the journal (of inode _compact_ino) reaches this offset
        self._compact_ino: int | None = None
        self._compact_next = 0
        #: A failed append (fsync error): the journal is not trusted until it is rewritten (_after_failed_append).
        self._suspect: BaseException | None = None
        self._sync_estimate = 0.0  # moving average of append+fsync seconds: decides inline vs thread
        self._offer_estimate = 0.0  # the same, and the door's verdicts: decides offers (holding.OFFER_MIN_SYNC)
        self._batch_sync_estimate = 0.0  # the same for records larger than a filler chunk (INLINE_BATCH_BUDGET)
        self._sync_thread = SyncThread()  # plans a batch's apply during its fsync where no writeback starts
        self._messages = MessageLog(self.path / MESSAGES_DIR, self._locked)  # messages/<guild>/<month>.jsonl
        #: store.watch(): every operation the tables apply, in journal order (json/feed.py)
        self._feed = JsonFeed(self._refresh, self._catch_up_now, self.path / LOCK_NAME)
        self._tables.feed = self._feed.feed

    def __repr__(self) -> str:
        mode = " read_only" if self.read_only else ""
        return f"<{type(self).__name__} path={str(self.path)!r}{mode} closed={self._closed}>"

    @property
    def min_compact_bytes(self) -> int:
        """Compact once the journal exceeds this and the snapshots it would rewrite (tests lower it)."""
        return self._tables.min_compact_bytes

    @min_compact_bytes.setter
    def min_compact_bytes(self, value: int) -> None:
        self._tables.min_compact_bytes = value
        self._compact_next = 0  # ask again at the next commit

    # ---------------------------------------------------------------------------------------------------------------
    # opening and loading
    @classmethod
    async def open(cls: type[_B], config: StoreConfig | str | os.PathLike[str], *,
                   merge_external: bool = False) -> _B:
        """Open (creating the folder if needed) under the lock: cleans up after crashes, loads, replays.

        Read-only (``config.read_only``): the folder must exist; no lock is taken and nothing is written, so it
        works on a read-only medium (a mounted backup, a snapshot) and never changes the store.

        ``merge_external`` resolves an :class:`ExternalChangeError` at open (``storage compact --merge-external``):
        the journal's changes are replayed over the edited snapshot (its values win for the documents it changed,
        the edit is kept for every other document), and the next compaction writes the result.
        """
        if not isinstance(config, StoreConfig):
            config = StoreConfig(backend="json", path=os.fspath(config), source="arguments")
        store = cls(config)
        store._tables.merge_external = merge_external
        try:
            await cancellation.run_in_thread(store._open_sync)
        except asyncio.CancelledError:
            store._journal.close()  # opened all the same: give the files back before the cancellation goes on
            store._lease.close()
            store._flock.close()
            store._presence.close()
            raise
        return store

    def _open_sync(self) -> None:
        if self.read_only:
            if not self.path.is_dir():
                raise DatabaseError(f"{self.path}: no such folder (a read-only open never creates one)")
            with self._io("opening the store read-only"):
                self._tables.load()
            return
        with self._io("creating the data folder"):
            make_dirs(self.path)
        try:
            with self._io("taking the store lock"):
                self._flock.acquire(self.lock_timeout)
        except LockBusy:
            raise LockTimeoutError(f"{self.path}: another process held the store lock for over "
                                   f"{self.lock_timeout}s") from None
        try:
            with self._io("opening the store"):
                self._settle_slots()  # a dead holder's claims, before a recovery could replace the journal
                self._remove_temp_files()
                self._tables.load()
                # finish or undo a crashed restore
                json_restore.recover(self.path, self._tables.data, self._journal.holds, at_open=True)
                # ... and a crashed forget
                json_forget.recover(self.path, self._tables.data, self._journal.holds, at_open=True)
                self._tables.record_checksums()  # e.g. the seed's own members.json (see Tables._check_edit)
                self._tables.publish()
                self._presence.enter()
        except BaseException:
            self._presence.close()
            self._journal.close()
            self._flock.close()
            raise
        finally:
            self._flock.release()

    def _remove_temp_files(self) -> None:
        """Temp files are only ever written under the lock, which we hold: any left over is from a crash."""
        for entry in os.scandir(self.path):
            if _TEMP_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
                log.warning("%s: removing %s left by an interrupted write", self.path, entry.name)
                os.unlink(entry.path)

    # ---------------------------------------------------------------------------------------------------------------
    # reading what other processes committed
    async def _refresh(self) -> None:
        """Before a read: apply what other processes committed. One ``pread`` when nothing changed."""
        if self._holding:
            return  # we hold the lock: nobody else can have written
        journal, tables = self._journal, self._tables
        if journal.fd >= 0 and not (tables.need_reload or tables.need_lock):
            try:
                if not journal.changed():
                    return  # the fast path of every read: one pread
            except OSError:
                pass  # reported with context below
        with self._io("reading the journal"):
            if self.read_only:
                tables.refresh_read_only()
                return
            tables.follow(locked=False)
        if tables.need_reload or tables.need_lock:
            async with self._locked():
                pass  # _locked() catches up (and reloads) under the lock

    def _catch_up_now(self) -> bool:
        """The synchronous part of :meth:`_refresh` (no lock taken), for the change feed (json/feed.py); True when
        the rest needs the lock (then :meth:`_refresh`)."""
        if self._holding or self._closed:
            return False
        tables = self._tables
        with self._io("reading the journal"):
            if self.read_only:
                tables.refresh_read_only()
                return False
            tables.follow(locked=False)
        return tables.need_reload or tables.need_lock

    def _change_feed(self) -> ChangeFeed:
        return self._feed.feed

    # ---------------------------------------------------------------------------------------------------------------
    # the lock
    # ---------------------------------------------------------------------------------------------------------------
    # committing
    def _check_usable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: the store was opened read-only")

    async def _submit(self, prepare: _Prepare | list[Op] | PutRun, record: bytes | None = None) -> Any:
        """Queue a write for the next group commit (group_commit.py) and wait until it is durable. A write is its
        ops when they do not depend on the documents (a put), else a function of the view so far.

        A put of one document by a lone writer while the lease is still on (json/lease.py) and appends run inline
        commits right here, synchronously (:meth:`_commit_now`): nothing in it can suspend, so nothing can interrupt
        it half-way, and the coroutines and ``async with`` of a group-commit round are skipped (about 3 us of a
        save). A batch, or a document too large for an fsync on the loop (:meth:`_may_inline`), commits the usual
        way. ``record``: the lone put's journal line when the caller has it (:func:`encode_record`'s bytes), for
        that synchronous commit. A :class:`~.put_run.PutRun` (a batch put) commits as its operations do; alone in
        its round, as it is (json/put_run.py)."""
        self._check_usable()
        if (type(prepare) is list and self._lease.held and self._suspect is None
                and len(prepare) == 1 and self._may_inline(len(prepare[0][3]))  # type: ignore[misc]
                and self._resume_alone()):
            failed = True
            try:
                try:
                    self._commit_now(prepare, record, claims=True)
                except OSError as exc:
                    await self._after_failed_append(exc)  # under the lock, as _commit does
                    raise self._write_failed(exc) from exc
                failed = False
            finally:
                self._exit_commit(failed)
                self._commits.alone_done()
            if self._compaction_may_be_due():
                await self._maybe_compact()
            return None
        return await self._commits.submit(prepare)

    def _resume_alone(self) -> bool:
        """For :meth:`_submit`'s synchronous commit: the current task may commit alone now (group_commit.py), the
        mutex is free and the lease still on: all three taken (True), or none (False)."""
        commits = self._commits
        if not commits.alone_now():
            return False
        if self._mutex.try_acquire():
            if self._lease.resume():
                self._holding = True
                return True
            self._mutex.release()
        commits.alone_done()
        return False

    async def _commit_group(self, batch: list[_Prepare | list[Op] | PutRun], outcomes: list[Any]) -> None:
        """One group commit, under the lock: every writer's ops in one journal record, one fsync."""
        if self._peer_committed:  # the holder committed our offered put, and we caught up with it (json/slots.py)
            self._peer_committed = False
            outcomes.append(None)
            return
        if self._behind is not None and not all(type(prepare) in _PUTS for prepare in batch):
            self._catch_up_behind()  # the round reads the view: caught up first (see _defer_catch_up)
        if self._suspect is not None:
            await self._trust_journal()
        if len(batch) == 1 and type(batch[0]) in _PUTS:  # a lone put: no view to stage
            outcomes.append(None)
            await self._commit(batch[0], claims=True)  # type: ignore[arg-type]
            return
        staged = Staged(self._tables.data, self._tables.expires)
        ops: list[Op] = []
        last = len(batch) - 1
        for index, prepare in enumerate(batch):
            if type(prepare) is list:
                item_ops, result = prepare, None
                if index != last:
                    staged.apply(item_ops)
                ops.extend(item_ops)
                outcomes.append(result)
                continue
            try:
                item_ops, result = prepare(staged)  # type: ignore[operator]
            except Exception as exc:  # this writer's own failure (its update fn raised, bad result)
                outcomes.append(Failed(exc))
                continue
            if index != last:  # only later writers of this group read the staged view
                staged.apply(item_ops)
            ops.extend(item_ops)
            outcomes.append(result)
        if ops:
            await self._commit(ops, claims=True)

    async def _commit(self, ops: list[Op] | PutRun, *, record: bytes | None = None, claims: bool = False) -> None:
        """Make ``ops`` durable, then visible: append + fsync, publish the committed end, apply to memory.

        Under the lock. The three steps happen together or not at all, whatever interrupts them: if the task is
        cancelled while a worker thread runs the fsync, the thread is waited for (storage.cancellation), and a
        record that reached the disk is published and applied before the cancellation goes on, so the process's
        view always equals the disk. A record that did not reach the disk is neither.

        ``record``: ``ops`` already encoded (a transaction with message work named it in its intent first).
        ``claims``: the records other processes' waiting writers offered may join it (json/slots.py; not for a
        record named elsewhere first, nor a transaction's).
        """
        if self._behind is not None:  # the catch-up was deferred (_defer_catch_up): puts only
            if type(ops) is PutRun and len(ops) <= LARGE_COMMIT:
                ops = list(ops)
            if type(ops) is list and len(ops) <= LARGE_COMMIT:
                record = encode_record(ops) if record is None else record
                if self._may_inline(len(record)):
                    try:
                        self._commit_deferred(ops, record, claims)
                    except OSError as exc:  # the write or its fsync (caught up by now): as below
                        await self._after_failed_append(exc)
                        raise self._write_failed(exc) from exc
                    return
            self._catch_up_behind()  # a commit that awaits a thread: caught up before, as usual
        plan: Plan | None = None
        large = len(ops) > LARGE_COMMIT
        if large:  # encoding and sorting out 25k documents held the loop ~50 ms: a thread does it
            record, plan = await cancellation.run_in_thread(_prepare_large, self._tables, ops, record)
        journal = self._journal
        try:
            if record is None:
                record = ops.record() if isinstance(ops, PutRun) else encode_record(ops)
            if not large and self._may_inline(len(record)):
                self._commit_now(ops, record, claims=claims)
                return
            start = journal.offset
            claimed: list[Claim] = []
            if claims and type(ops) is list and len(ops) < PLAN_DURING_SYNC:  # a slow disk: the most to gain
                record, claimed, ops = self._claim(start, record, ops)
            try:
                if not large and len(ops) >= PLAN_DURING_SYNC:  # a batch: planned meanwhile (_timed_sync)
                    spent, plan = await cancellation.run_in_thread(self._timed_sync, ops, record)
                else:
                    spent = await cancellation.run_in_thread(_timed_append, journal, record)
            finally:
                # Decided before any recovery below: rewriting the files after a failure moves the offset too.
                if journal.offset == start:
                    self._slots.mark(claimed, FAILED)  # (nothing when none)
                else:  # durable: publish and apply even if we are being cancelled
                    self._tables.publish()
                    self._slots.mark(claimed, COMMITTED)
                    if plan is None and type(ops) is PutRun:  # not planned meanwhile: from its one dict
                        plan = ops.plan(self._tables)
                    if plan is None:  # expiries to clear: operation by operation
                        self._tables.apply(ops if type(ops) is list else list(ops))
                    else:
                        self._tables.apply_plan(plan, ops)  # C-level dict updates: visible all at once
        except OSError as exc:
            await self._after_failed_append(exc)
            raise self._write_failed(exc) from exc
        except asyncio.CancelledError as exc:
            if isinstance(exc.__cause__, OSError):  # the write failed while we were cancelled (see cancellation.py)
                log.error("%s: a journal write failed (%s): rewriting the store's files before the next commit",
                          journal.path, exc.__cause__)
                self._suspect = exc.__cause__  # no rewrite now (we are cancelled): _trust_journal does it next
            raise
        # The append's own time, not the thread hop's: a hop costs 0.3-1 ms on a busy host, and counting it kept
        # the store threading appends that take 0.1 ms (see benchmarks/README.md, Design measurements).
        self._learn_sync(len(record), spent)

    def _may_inline(self, size: int) -> bool:
        """Whether an append of a ``size``-byte record runs on the loop, from how long recent ones took (see
        INLINE_SYNC_BUDGET and INLINE_BATCH_BUDGET)."""
        if size <= MIN_CHUNK:
            return self._sync_estimate < INLINE_SYNC_BUDGET
        return size <= INLINE_MAX_BYTES and max(self._sync_estimate, self._batch_sync_estimate) < INLINE_BATCH_BUDGET

    def _learn_sync(self, size: int, spent: float) -> None:
        """Fold an append's time into the moving average of its size class (the one :meth:`_may_inline` reads)."""
        if size <= MIN_CHUNK:
            self._sync_estimate = 0.8 * self._sync_estimate + 0.2 * spent
            self._offer_estimate = 0.8 * self._offer_estimate + 0.2 * spent
        else:
            self._batch_sync_estimate = 0.8 * self._batch_sync_estimate + 0.2 * spent

    def _commit_now(self, ops: list[Op] | PutRun, record: bytes | None = None, *, claims: bool = False) -> None:
        """:meth:`_commit`'s inline way, under the lock: append + fsync on the loop, publish, apply. Nothing here
        suspends. An OSError leaves the record unpublished and unapplied (the caller's recovery rewrites the files
        from memory without it)."""
        if record is None:
            record = ops.record() if isinstance(ops, PutRun) else encode_record(ops)
        tables = self._tables
        plan: Plan | None = None
        claimed: list[Claim] = []
        if len(ops) >= PLAN_DURING_SYNC:  # a batch: its apply planned while the disk writes (_timed_sync)
            spent, plan = self._timed_sync(ops, record)
        else:
            journal = self._journal
            if claims and type(ops) is list:
                record, claimed, ops = self._claim(journal.offset, record, ops)
            began = time.perf_counter()
            try:
                journal.append(record)
            except OSError:
                self._slots.mark(claimed, FAILED)
                raise
            spent = time.perf_counter() - began
        tables.publish()
        if claimed:
            self._slots.mark(claimed, COMMITTED)
        if plan is None and type(ops) is PutRun:  # the worker did not plan it: its plan from one dict, here
            plan = ops.plan(tables)
        if plan is None:
            tables.apply(ops if type(ops) is list else list(ops))
        else:
            tables.apply_plan(plan, ops)
        self._learn_sync(len(record), spent)

    def _timed_sync(self, ops: list[Op] | PutRun, record: bytes) -> tuple[float, Plan | None]:
        """``journal.append(record)`` with the planning of ``ops``' apply done while the disk writes the record;
        returns the write's and the fsync's own time (not the planning's) and the plan (None: not planned, the
        caller plans after the fsync as before). Under the lock; nothing is published or applied here.

        The record's writeback is started right after its ``pwrite`` (fsutil.start_writeback), the plan worked out
        on this thread meanwhile, and the ``fdatasync`` is then left with the cache flush (a 1,000-member batch at
        100k members: the fsync 0.6 ms, of which the data 0.3-0.4; the plan 0.4-0.5 ms). Where the writeback cannot
        be started (not Linux), the planning is offered to the sync thread during the fsync instead
        (json/sync_thread.py); that offer needs the worker thread to be scheduled in time, which a loaded machine
        did not do for most batches (the offers paused: the plan after the fsync, ~0.65 ms more a batch).

        On the loop (:meth:`_commit_now`), or in the worker thread of :meth:`_commit`'s threaded append (a slow
        disk): that caller used to apply the batch, or plan it, on the loop *after* the fsync (1.1-1.9 ms of a
        1,000-member batch at 100k members, benchmarks/README.md) while the loop sat idle during it. The loop may
        run other tasks meanwhile: the plan reads only what the lock keeps still (the documents, their sizes and
        expiries; a read that caches a document the plan looks at caches the same bytes, which
        :func:`_prepare_large`'s plan in a thread already relies on)."""
        tables = self._tables
        plan: Plan | None = None
        began = written = time.perf_counter()
        synced = 0.0

        def sync(fd: int) -> None:
            nonlocal plan, written, synced
            written = time.perf_counter()
            if start_writeback(fd):
                started = time.perf_counter()
                plan = _plan_quietly(tables, ops)  # while the disk writes (nothing to undo: it only reads)
                planned = time.perf_counter()
                sync_fd(fd)
                synced = started - written + time.perf_counter() - planned  # the disk's calls, not the plan
            else:
                plan = self._sync_thread.sync_during(fd, lambda: _plan(tables, ops))
                synced = self._sync_thread.last_sync

        self._journal.append(record, sync)  # the offset moves only once the fsync succeeded
        return written - began + synced, plan

    def _commit_deferred(self, ops: list[Op], record: bytes, claims: bool = False) -> None:
        """:meth:`_commit_now` for a commit that took the lock without catching up (:meth:`_defer_catch_up`): its
        record goes at the committed end the lock file said (past what this process read), is made durable and its
        end published; then the lock is let go (others wait: no lease), and only then are the records other
        processes committed before it applied, followed by its own ``ops``, in journal order, before the caller
        acknowledges anything. Nothing here suspends: no other coroutine of this process sees the view between
        the publish and the apply, and a cancellation cannot split them.

        A failed write or fsync leaves the record unpublished and cut back, and the commit catches up under the
        lock as usual before the caller's recovery rewrites the files from memory (:meth:`_after_failed_append`);
        if that catch-up fails too, memory cannot be trusted for the rewrite: the journal stays suspect and the
        view is reloaded under the lock first (:meth:`Tables.catch_up`), then rewritten, at the next commit. A
        failure to read the records before it (their apply) comes after the record is durable: the call raises,
        and the view is reloaded at its next use (:meth:`Tables.apply_after`)."""
        journal, tables = self._journal, self._tables
        start = self._behind
        assert start is not None
        self._behind = None
        claimed: list[Claim] = []
        if claims:
            record, claimed, ops = self._claim(start, record, ops)
        began = time.perf_counter()
        stop = start + len(record)
        try:
            try:
                journal.write_at(record, start)  # cut back to start on failure; journal.offset stays where we read to
            except OSError:
                self._slots.mark(claimed, FAILED)
                raise
            spent = time.perf_counter() - began
            self._flock.publish(journal.ino or 0, stop)
            if claimed:
                self._slots.mark(claimed, COMMITTED)
        except OSError as exc:
            # As a failed append: the catch-up (under the lock, the committed end unchanged) cuts away whatever of
            # the record is left past it, then the caller rewrites the files from memory.
            try:
                tables.catch_up()
            except BaseException:
                tables.need_reload = True  # memory is behind: reload before the rewrite (see the docstring)
                self._suspect = exc
                raise self._write_failed(exc) from exc
            raise
        self._learn_sync(len(record), spent)
        self._holding = False  # others wait (_defer_catch_up): let go now, the apply needs no lock
        self._let_go_early = True
        try:
            self._flock.hand_over()  # a writer waits (_defer_catch_up): it runs before our apply (json/lock.py)
        except OSError as exc:  # nothing to undo: the record is durable and published (closing lets go at the end)
            log.error("%s: letting go of the store lock failed: %s", self.path, exc)
        try:
            tables.apply_after(start, stop, ops)
        except OSError as exc:
            raise self._io_error(exc, "catching up with the journal") from exc

    def _claim(self, start: int, record: bytes, ops: list[Op]) -> tuple[bytes, list[Claim], list[Op]]:
        """Under the lock, before writing ``record`` at ``start``: claim the records that waiting writers offered
        (json/slots.py) and make them part of it (one journal line, one fsync); returns the line, the claims (to
        mark COMMITTED or FAILED once the fsync is known) and the operations to apply (ours, then theirs). A
        claimed record that does not parse as one this library writes is marked FAILED and left out."""
        room = MAX_GROUP_BYTES - len(record)
        claims = self._slots.claim(self._journal.ino or 0, start + len(record) - 2, room) if room > 0 else []
        if not claims:
            return record, claims, ops
        all_ops = list(ops)
        for claim in claims:
            try:
                all_ops.extend(parse_record(b"[" + claim.inner + b"]"))
            except Exception:  # damage in a slot: not ours to write (its writer commits it itself)
                self._slots.mark(claims, FAILED)
                return record, [], ops
        return combine(record, claims), claims, all_ops

    def _write_failed(self, exc: OSError) -> StorageIOError:
        path = self._journal.path
        return StorageIOError(f"{path}: write failed, nothing was committed: {exc.strerror or exc}",
                              errno=exc.errno, path=str(path))

    async def _after_failed_append(self, exc: OSError) -> None:
        """A failed write or fsync. After a failed fsync the file's cached pages no longer say what is on disk
        (PostgreSQL's "fsyncgate"), so the journal is not trusted again until it is rewritten from memory (which
        holds exactly what was committed): that is what :meth:`_trust_journal` does, now and before every later
        commit until it succeeds. Readers never saw the failed record: it was never published."""
        log.error("%s: a journal write failed (%s): rewriting the store's files before the next commit",
                  self._journal.path, exc)
        self._suspect = exc
        try:
            await self._trust_journal()
        except DatabaseError as again:
            log.error("%s: rewriting after the failed write failed too (%s); writes will retry it", self.path, again)

    async def _trust_journal(self) -> None:
        """Under the lock: if a write failed earlier, rewrite the snapshots and start a fresh journal first."""
        if self._suspect is None:
            return
        suspect = self._suspect
        try:
            await self._run_compaction(everything=True)
        except DatabaseError as exc:
            raise StorageIOError(f"{self.path}: the journal is not trusted since a write failed ({suspect}) and "
                                 f"rewriting it failed: {exc}; nothing was committed",
                                 errno=getattr(exc, "errno", None), path=getattr(exc, "path", None)) from exc
        self._suspect = None
        log.info("%s: the store's files were rewritten after a failed write; writes go on", self.path)

    # ---------------------------------------------------------------------------------------------------------------
    # compaction
    def _compaction_may_be_due(self) -> bool:
        """After a commit: whether :meth:`_maybe_compact` has anything to do. Summing the changed collections'
        sizes after every commit cost a lone save about 2 us: it is asked again only once the journal has grown by
        an eighth of what was left to the threshold (exact when the threshold stays; when deletes lower it, the
        compaction comes at most that eighth later), or after a compaction started another journal file."""
        journal = self._journal
        if journal.offset < self._compact_next and journal.ino == self._compact_ino:
            return False
        threshold = self._tables.compaction_threshold()
        if threshold is not None and journal.offset > threshold:
            return True
        self._compact_ino = journal.ino
        self._compact_next = journal.offset + 1 if threshold is None else journal.offset + int(
            threshold - journal.offset) // 8
        return False

    async def _maybe_compact(self) -> None:
        """Compaction is an optimization: if it fails (disk full), the journal still holds every write."""
        if not self._tables.compaction_due():
            return
        try:
            async with self._locked():
                if self._tables.compaction_due():
                    await self._run_compaction()
        except DatabaseError as exc:
            log.error("%s: compaction failed, the journal keeps the data and grows: %s", self.path, exc)

    async def compact(self) -> None:
        """Fold the journal into the snapshot files now (``storage compact``); leaves plain JSON files."""
        self._guard_read()
        self._check_usable()
        async with self._locked():
            await self._run_compaction()

    async def purge_expired(self) -> int:
        """Remove the documents that are no longer visible (they already read as absent) from memory and the
        files now, by a compaction; returns how many. (Closing the store and every compaction do it too.)"""
        self._guard_write()
        self._check_usable()
        async with self._locked():
            now = self._now_micros()
            count = sum(len(dead_keys(expiring, now)) for expiring in self._tables.expires.values())
            if count:
                await self._run_compaction(now=now)
        return count

    async def _run_compaction(self, *, everything: bool = False, now: int | None = None) -> None:
        """Compact in a worker thread that a cancellation waits for (the lock stays held until it is done).

        ``everything`` rewrites every collection (after a failed fsync, when no file written since is trusted).
        """
        try:  # a claim of ours left unmarked would be settled FAILED in the new journal: committed twice
            self._slots.settle_unmarked()
        except OSError as exc:
            raise StorageIOError(f"{self._slots.path}: compaction refused: a write another process handed to the "
                                 "store lock's holder is committed but writing that into this file failed "
                                 f"({exc.strerror or exc}); the journal still holds every write, and compactions go "
                                 "on once the file can be written", errno=exc.errno, path=self._slots.path) from exc
        # On the loop: the worker thread below only reads the documents.
        purged = self._tables.purge_expired(self._now_micros() if now is None else now)
        try:
            await cancellation.run_in_thread(self._tables.compact,
                                             set(self._tables.data) if everything else purged)
        except OSError as exc:
            raise StorageIOError(f"{exc.filename or self.path}: compaction failed: {exc.strerror or exc}; the "
                                 "journal still holds every write", errno=exc.errno,
                                 path=str(exc.filename or self.path)) from exc

    async def _whole(self, *collections: str) -> None:
        """Before walking a collection on the loop: a lazy one (json/lazy.py) is read whole in a worker thread and
        put in place as a plain dict (the loop never parses a snapshot). Every collection when none is named."""
        tables = self._tables
        for name in collections or list(tables.data):
            coll = tables.data.get(name)
            if type(coll) is Lazy and not coll.is_whole:
                with self._io(f"reading {name}.json"):
                    await cancellation.run_in_thread(coll.whole)
        tables.settle()

    # ---------------------------------------------------------------------------------------------------------------
    # primitives
    def _now_micros(self) -> int:
        """Now, as the expiry predicate compares it (json/expiry.py ``visible``)."""
        return to_micros(self._now())

    def _dead(self, collection: str) -> set[str]:
        """Keys of the collection's documents that are no longer visible (empty, and no clock read, when the
        collection has no expiring document: the usual case)."""
        expiring = self._tables.expires.get(collection)
        return dead_keys(expiring, self._now_micros()) if expiring else set()

    async def _get(self, collection: str, key: str) -> Document | None:
        tables = self._tables
        if not self._holding:  # _refresh's fast path inlined: this runs before every get (a coroutine less)
            journal = self._journal
            try:
                stale = journal.fd < 0 or tables.need_reload or tables.need_lock or journal.changed()
            except OSError:
                stale = True  # _refresh reports it with context
            if stale:
                await self._refresh()
        coll = tables.data.get(collection)
        raw = coll.get(key) if coll is not None else None
        if raw is None:
            return None
        expiring = tables.expires.get(collection)
        if expiring and key in expiring and not visible(expiring[key], self._now_micros()):
            return None
        doc: Document = orjson.loads(raw)
        return doc

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Document]:
        await self._refresh()
        coll = self._tables.data.get(collection) or {}
        dead = self._dead(collection)
        loads = orjson.loads
        if type(coll) is Lazy:  # the keys not read yet in one pass, one fstat (json/lazy.py)
            return {k: loads(raw) for k, raw in coll.get_many(keys).items() if k not in dead}
        return {k: loads(coll[k]) for k in keys if k in coll and k not in dead}

    async def _expiries(self, collection: str, keys: list[str] | None) -> dict[str, datetime]:
        await self._refresh()
        return live_expiries(self._tables.expires.get(collection) or {}, keys, self._now_micros())

    def _check_writable(self, collection: str) -> None:
        self._check_usable()
        foreign = self._tables.foreign
        if collection in foreign:
            raise ValidationError(
                f"{self.path / (collection + '.json')} exists but is not a collection ({foreign[collection]}); "
                "refusing to write to it", field="collection")

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]],
                           expires: datetime | None = None) -> None:
        self._check_writable(collection)
        if expires is None and PLAN_DURING_SYNC <= len(items) <= LARGE_COMMIT:  # a batch (batch_update_members)
            await self._submit_puts(collection, PutRun(collection, list(map(_first, items)), list(map(_second, items))))
            return
        if len(items) <= LARGE_COMMIT:
            ops = put_ops(collection, items, expires)
        else:  # 25k operations built in one go held the loop ~10 ms: ITEMS_TURN at a time, a loop turn between
            ops = []
            for start in range(0, len(items), ITEMS_TURN):
                if start:
                    await asyncio.sleep(0)
                ops.extend(put_ops(collection, items[start:start + ITEMS_TURN], expires))
        await self._submit_puts(collection, ops)

    async def _put_columns(self, collection: str, keys: list[str], encoded: list[bytes],
                           expires: datetime | None = None) -> None:
        """A batch ``put_many``'s puts straight from its two lists (documents.normalize_columns): without an
        expiry, a batch (PLAN_DURING_SYNC or more) as one :class:`~.put_run.PutRun` (no operation tuple kept per
        document, and a plan from one ``dict`` of the lists: json/put_run.py); else ITEMS_TURN operations at a
        time with a loop turn between."""
        self._check_writable(collection)
        if expires is None and len(keys) >= PLAN_DURING_SYNC:
            await self._submit_puts(collection, PutRun(collection, keys, encoded))
            return
        ops: list[Op] = []
        for start in range(0, len(keys), ITEMS_TURN):
            if start:
                await asyncio.sleep(0)
            ops += column_ops(collection, keys[start:start + ITEMS_TURN], encoded[start:start + ITEMS_TURN],
                               expires)
        await self._submit_puts(collection, ops)

    async def _submit_puts(self, collection: str, ops: list[Op] | PutRun) -> None:
        """Commit a put's operations (a batch into a lazy collection first builds its snapshot's sizes)."""
        coll = self._tables.data.get(collection)
        if type(coll) is Lazy and len(ops) >= SIZES_AFTER and coll.wants_sizes:  # a batch: once (json/lazy.py)
            await cancellation.run_in_thread(coll.build_sizes)
        await self._submit(ops)

    async def save_member_data(self, user_id: int | str, guild_id: int | str, data: Member | Document) -> bool:
        """:meth:`storage.members.MembersMixin.save_member_data`, the usual call one coroutine deep: two int ids and
        a member of the usual shape (storage.member_fast) go straight to :meth:`_submit` (whose synchronous commit
        takes it while the lease is on), without ``put`` and ``_put_encoded`` and their checks of a key and a
        collection that are known good. Why: with the fsync made free a save was about 10 us of Python, at the
        edge of SQLite FULL and of the append+fdatasync floor (issue 15). Anything else goes the usual way."""
        self._guard_write()
        usual = encode_member_save(user_id, guild_id, data)
        if usual is None or MEMBERS in self._tables.foreign:
            return await MembersMixin.save_member_data(self, user_id, guild_id, data)
        key, encoded = usual
        # the journal line of this one put (json/journal.py encode_record's bytes: a member key needs no escape)
        record = b"".join((f'[["p","{MEMBERS}","{key}",'.encode(), encoded, b"]]\n"))
        await self._submit([("p", MEMBERS, key, encoded)], record)
        return True

    async def get_member_data(self, user_id: int | str, guild_id: int | str,
                              default: Mapping[str, Any] | None = None) -> Member:
        """:meth:`storage.members.MembersMixin.get_member_data`, the usual call (no ``default``) one coroutine
        deep: ``member_key``'s key is canonical, so ``get``'s checks of it and of the collection are skipped."""
        if default is not None:
            return await MembersMixin.get_member_data(self, user_id, guild_id, default)
        self._guard_read()
        doc: Any = await self._get(MEMBERS, member_key(user_id, guild_id))
        return doc if doc is not None else {}  # type: ignore[no-any-return]

    async def _delete(self, collection: str, key: str) -> bool:
        self._check_writable(collection)

        def prepare(staged: Staged) -> tuple[list[Op], bool]:
            if not staged.present(collection, key, self._now_micros()):
                return [], False  # absent, or expired: reads as absent, purged by compaction
            return [("d", collection, key)], True

        result: bool = await self._submit(prepare)
        return result

    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None,
                      expires: datetime | None = None) -> Document:
        self._check_writable(collection)

        def prepare(staged: Staged) -> tuple[list[Op], Document]:
            raw = staged.live(collection, key, self._now_micros())
            _doc, encoded = apply_update(fn, orjson.loads(raw) if raw is not None else None, default)
            return put_ops(collection, [(key, encoded)], expires), orjson.loads(encoded)

        result: Document = await self._submit(prepare)
        return result

    async def _items(self, collection: str, prefix: str | None) -> AsyncIterator[tuple[str, Document]]:
        """A snapshot of the collection (taken at the first step), in key order. A bot's heartbeat shares this
        loop: a large collection is filtered and sorted in a worker thread (the loop only copies the references),
        and the loop gets a turn every :data:`ITEMS_TURN` documents decoded."""
        await self._refresh()
        await self._whole(collection)
        coll = self._tables.data.get(collection) or {}
        dead = self._dead(collection)
        if len(coll) > ITEMS_INLINE:
            # The snapshot is one C-level dict copy (0.5 ms at 100k; a list of pairs built on the loop took 9-15
            # ms); the pairs are picked and sorted from it in a worker thread.
            plain = coll.whole() if type(coll) is Lazy else coll  # settled to a dict by _whole: this is a guard
            selected = await off_loop(select_from, dict(plain), dead, prefix)
        else:
            pairs = [pair for pair in coll.items() if pair[0] not in dead] if dead else list(coll.items())
            selected = select(pairs, prefix)
        loads = orjson.loads
        for index, (key, raw) in enumerate(selected):
            if index and not index % ITEMS_TURN:
                await asyncio.sleep(0)
            yield key, loads(raw)

    async def _count(self, collection: str) -> int:
        await self._refresh()
        return len(self._tables.data.get(collection) or ()) - len(self._dead(collection))

    async def collections(self) -> list[str]:
        self._guard_read()
        await self._refresh()
        return sorted(name for name, coll in self._tables.data.items() if len(coll) > len(self._dead(name)))

    # queries and indexes (query.py, indexes.py)
    async def _query(self, collection: str, query: Query, mode: Mode) -> Any:
        await self._refresh()
        await self._whole(collection)
        tables = self._tables
        coll = live_mapping(tables.data.get(collection) or {}, self._dead(collection))  # expiry: json/expiry.py
        return await run_query(coll, tables.indexes.of(collection), query, mode)

    async def _delete_where(self, collection: str, query: Query) -> int:
        """One transaction: the matching keys found under the lock, deleted in one journal line."""
        self._check_writable(collection)
        async with self.transaction() as tx:
            return await tx._delete_where(collection, query)

    async def _ensure_index(self, collection: str, path: str) -> bool:
        """Under the lock (no commit can change the collection meanwhile): build in a worker thread, declare it
        in ``storage.indexes``, then install it."""
        self._check_writable(collection)
        async with self._locked():
            await self._follow_declarations()
            indexes = self._tables.indexes
            paths = indexes.declared.get(collection, [])
            if path in paths:
                return False
            built = await cancellation.run_in_thread(build_indexes, self._tables.data.get(collection) or {},
                                                     [path])

            def install() -> None:
                current = indexes.live.get(collection)
                if current is None:
                    indexes.live[collection] = built
                else:
                    current.paths.update(built.paths)

            await self._declare_indexes({**indexes.declared, collection: sorted([*paths, path])},
                                        "declaring the index", install)
        return True

    async def _follow_declarations(self) -> None:
        """Under the lock, before changing the declarations: take up what other processes declared or dropped since
        this store read ``storage.indexes`` (its write would otherwise undo theirs), the new indexes built in a
        worker thread. Cancelled or failed before the end, nothing changed. A file that cannot be read is left to
        this store's own declarations (which its write then puts back)."""
        indexes = self._tables.indexes
        declared = await cancellation.run_in_thread(indexes.on_file)
        if declared is None or declared == indexes.declared:
            return
        built = {}
        for name, paths in declared.items():
            live = indexes.of(name)
            new = [p for p in paths if live is None or p not in live.paths]
            if new:
                built[name] = await cancellation.run_in_thread(build_indexes, self._tables.data.get(name) or {}, new)
        indexes.adopt(declared, built)

    async def _declare_indexes(self, declared: dict[str, list[str]], doing: str, install: Callable[[], None]) -> None:
        """Persist ``declared`` as the index declarations (under the lock), then ``install`` the live indexes to
        match. Memory follows the file: if it failed before the file was replaced, the old declarations stay in
        force; once the file holds the new ones (even if the task is cancelled while the worker thread finishes,
        or the folder's fsync after fails), they are recorded and installed before the error goes on."""
        indexes = self._tables.indexes
        before = indexes.declared
        replaced = threading.Event()
        indexes.declared = declared
        try:
            with self._io(doing):
                await cancellation.run_in_thread(indexes.write, replaced.set)
        except BaseException:
            if not replaced.is_set():
                indexes.declared = before
                raise
            install()
            raise
        install()

    async def _drop_index(self, collection: str, path: str) -> bool:
        self._check_usable()
        async with self._locked():
            await self._follow_declarations()
            indexes = self._tables.indexes
            paths = indexes.declared.get(collection, [])
            if path not in paths:
                return False
            rest = [p for p in paths if p != path]

            def uninstall() -> None:
                live = indexes.live.get(collection)
                if live is not None:
                    live.paths.pop(path, None)
                    if not live.paths:
                        del indexes.live[collection]

            await self._declare_indexes({c: p for c, p in {**indexes.declared, collection: rest}.items() if p},
                                        "dropping the index", uninstall)
        return True

    async def _indexes(self, collection: str) -> list[str]:
        return list(self._tables.indexes.declared.get(collection, []))

    async def _all_indexes(self) -> dict[str, list[str]]:
        return {name: list(paths) for name, paths in sorted(self._tables.indexes.declared.items()) if paths}

    # where the data is (storage.interfaces)
    def location(self) -> str:
        return os.path.realpath(self.path)

    def data_folder(self) -> Path | None:
        return self.path

    def migration_lock(self) -> MigrationLock:
        return FileMigrationLock(self.path)

    def owns_entry(self, name: str, is_dir: bool) -> bool:
        if name.startswith("storage.") or json_restore.is_restore_entry(name):
            return True  # the journal, the lock, the migration lock, a restore in progress
        if is_dir:
            return name == MESSAGES_DIR
        return name.endswith(".json") and name[:-5] in self._tables.data  # every collection it has loaded

    def messages_in_snapshot(self, snapshot: str | None) -> bool:
        # A transaction holds the store lock, every message write takes it, and a scan reads the files without it:
        # nothing can change between the documents and the messages.
        return True

    async def _export_messages(self, emit: ExportSink, advance: Callable[[int], None]) -> bool:
        await off_loop(export_records, self._messages.root, emit, advance)  # file by file, as bytes, off the loop
        return True

    def message_swap(self) -> MessageSwap | None:
        return RestoreSwap(self.path, self._locked)

    def foreign_files(self) -> dict[str, str]:
        """``*.json`` files in the folder that are not collections, and why (shown by ``storage check``)."""
        return dict(self._tables.foreign)

    # message analytics: the append-only log in json/messages.py
    async def _ingest(self, records: Iterator[Any], size_hint: int) -> int:
        """``record_messages``: checked and encoded a small group at a time (in a worker thread for a large batch),
        keeping lines and ids, not the batch's normalized dicts (see ``messages.Encoded``); then one insert."""
        batch = await cancellation.run_in_thread(encode_batch, records) if size_hint > VALIDATE_IN_THREAD \
            else encode_batch(records)
        if not batch:
            return 0
        self._check_usable()
        return await self._messages.insert(batch)

    async def _insert_messages(self, records: list[dict[str, Any]]) -> int:
        self._check_usable()
        return await self._messages.insert(records)

    async def _insert_message_groups(self, groups: Iterable[list[dict[str, Any]]]) -> int:
        self._check_usable()
        return await self._messages.insert_groups(groups)

    async def _modify_message(self, message_id: str, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        self._check_usable()
        return await self._messages.modify(message_id, fn)

    async def _delete_messages_before(self, before: datetime, guild: str | None = None) -> int:
        self._check_usable()
        return await self._messages.delete_before(before, guild)

    def _scan_messages(self, guild_id: str | None = None, since: datetime | None = None,
                       until: datetime | None = None, *, snapshot: str | None = None) -> AsyncIterator[dict[str, Any]]:
        # no snapshots here: a transaction holds the lock every message write takes (see messages_in_snapshot)
        return self._messages.scan(guild_id, since, until)

    async def _message_summary(self) -> MessageSummary:
        self._check_usable()
        return await self._messages.summary()

    def _scan_message_columns(self, guild_id: str | None, since: datetime | None,
                              until: datetime | None) -> AsyncIterator[MessageColumns]:
        return self._messages.columns(guild_id, since, until)  # the aggregate queries, from a column cache

    # ---------------------------------------------------------------------------------------------------------------
    # transactions and closing
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[BackendTransaction]:
        """Serializable: the lock is held from the first line of the block to the commit.

        Keep transactions short: other writers (and other processes) wait while one is open.
        """
        token = self._enter_transaction()
        try:
            async with self._locked():
                await self._trust_journal()
                tx = JsonTransaction(self)
                try:
                    yield tx
                except BaseException:
                    tx._finish()
                    await tx._discard_messages()
                    raise
                ops = tx._finish()
                if tx._restore is not None:  # a restore: its message swap commits with the record (json/restore.py)
                    if not tx._tx_messages.empty:
                        await tx._discard_messages()
                        raise ValueError("a restore's transaction cannot also forget or prune messages")
                    await self._commit_restore(ops, tx._restore)
                elif not tx._tx_messages.empty:  # forgets or prunes: their message side commits with the record
                    await self._commit_transaction(ops, tx._tx_messages)
                else:
                    await tx._discard_messages()
                    if ops:
                        await self._commit(ops)
                release_staged(tx)  # committed: nothing reads the staged operations any more
        finally:
            self._leave_transaction(token)

    async def close(self) -> None:
        """Wait for queued writes, fold the journal into the snapshots, release the files.

        Cancelling ``close()`` does not cut it short: the compaction it started runs to its end (the files are
        released only then), and the cancellation is delivered after.
        """
        if self._closed:
            return
        if self._closing_elsewhere():  # the opening loop has ended: no write can be queued; the journal holds all
            self._closed = True
            self._presence.close()
            self._journal.close()
            self._lease.close()
            self._flock.close()
            self._messages.close()
            self._sync_thread.close()
            self._slots_waiter.close()
            self._slots.close()
            self._tables.release()
            return
        self._closed = True
        await cancellation.run_to_completion(self._close())

    def _expired_held(self) -> bool:
        """Whether memory holds documents that expired (no clock read when none is expiring)."""
        return bool(self._tables.expires) and self._tables.has_expired(self._now_micros())

    async def _close(self) -> None:
        try:
            await self._commits.wait()
            self._lease.close()  # no commit can start any more: let go of the lock now
            await self._messages.wait()
            await self._feed.close()  # watchers end after the last commits' changes
            # The last writable store to close folds the journal; the others leave it to the stores still open
            # (json/presence.py: a fold at 100k members held the lock for seconds while they waited to write).
            if not self.read_only and self._presence.leave() and self._suspect is None:
                await self._refresh()  # what the stores that closed before us committed: ours to fold too
                if self._tables.dirty or self._expired_held():
                    async with self._locked():  # expired documents are purged from the files too
                        if self._tables.dirty or self._expired_held():
                            await self._run_compaction()
                if self._presence.alone:
                    self._journal.drop_kept()  # no store left that could follow it (json/presence.py)
            await self._messages.release()  # the message index and cache, freed off the loop
        finally:
            self._feed.feed.close()  # already closed unless something above failed; its task then ends by itself
            self._presence.close()
            self._journal.close()
            self._lease.close()
            self._flock.close()
            self._messages.close()
            self._sync_thread.close()
            self._slots_waiter.close()
            self._slots.close()
            self._tables.release()

    def stats(self) -> dict[str, Any]:
        """Sizes for ``storage status``."""
        return {
            "path": str(self.path),
            "collections": {name: len(coll) for name, coll in sorted(self._tables.data.items())},
            "journal_bytes": self._journal.offset,
            "journal_generation": self._journal.generation,
            "foreign_files": dict(self._tables.foreign),
            "read_only": self.read_only,
        }



def _prepare_large(tables: Tables, ops: list[Op] | PutRun, record: bytes | None) -> tuple[bytes, Plan | None]:
    """In a worker thread, under the lock (nobody changes the documents meanwhile): the record (unless given) and
    the plan (a PutRun's from its two lists, json/put_run.py)."""
    if type(ops) is PutRun:
        return ops.record() if record is None else record, ops.plan(tables)
    return encode_in_slices(ops) if record is None else record, tables.plan(ops)  # type: ignore[arg-type]


def _plan(tables: Tables, ops: list[Op] | PutRun) -> Plan | None:
    """``tables.plan(ops)``; a PutRun's from its two lists (json/put_run.py)."""
    return ops.plan(tables) if isinstance(ops, PutRun) else tables.plan(ops)


def _plan_quietly(tables: Tables, ops: list[Op] | PutRun) -> Plan | None:
    """:func:`_plan` between a record's write and its fsync: a planning that fails (a bug) is logged and the
    commit plans after the fsync as usual (a failure here must not pass for the write's)."""
    try:
        return _plan(tables, ops)
    except Exception:
        log.exception("planning a commit during its fsync failed; it is applied the usual way")
        return None


def _timed_append(journal: Journal, record: bytes) -> float:
    """``journal.append`` in a worker thread; returns how long the write and fsync took there."""
    began = time.perf_counter()
    journal.append(record)
    return time.perf_counter() - began
