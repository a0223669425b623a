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
  never both write from a stale view, and ``update()`` runs its function on the latest document.
  Readers ``stat`` the journal before each read and apply what other processes appended.
* **Fast.** A save costs one appended line and one fsync, whatever the store's size. Concurrent writers in one
  process are grouped into one line and one fsync (group commit). When the journal outgrows what compaction would
  rewrite, the changed collections' snapshots are rewritten and the journal starts afresh.
* **Never loses data on bad input.** An unreadable snapshot raises :class:`CorruptDataError` naming the file and
  byte position and is left as it is; only a torn final journal record (never acknowledged) may be dropped.

Every document is held in memory in its encoded form (bytes): compact, and a ``get`` returns a fresh ``dict``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ... import cancellation
from ...codec import OWN_COLLECTIONS, check_collection, decode_doc
from ...config import StoreConfig
from ...errors import (
    CorruptDataError,
    DatabaseError,
    ExternalChangeError,
    LockTimeoutError,
    ReadOnlyError,
    StorageIOError,
    ValidationError,
)
from ...fsutil import TEMP_MARK, atomic_write, fsync_dir, make_dirs
from ...messages.columns import MessageColumns
from ...protocol import Document, Transaction, UpdateFn
from ..base import BackendBase, OpsBase, apply_update
from . import restore as json_restore
from .group_commit import Failed, GroupCommit
from .journal import Journal, Op, encode_record
from .lock import LockBusy, SidecarLock
from .message_queries import JsonMessageQueries
from .messages import MESSAGES_DIR, MessageLog
from .snapshot import OVERHEAD, Collection, read_snapshot, render_collection

__all__ = ["JsonBackend", "JOURNAL_NAME", "LOCK_NAME"]

_B = TypeVar("_B", bound="JsonBackend")

log = logging.getLogger("storage.json")

JOURNAL_NAME = "storage.journal"
LOCK_NAME = "storage.lock"
#: Compact once the journal is larger than this fraction of the snapshots it would rewrite (and MIN_COMPACT).
COMPACT_RATIO = 1.0
MIN_COMPACT_BYTES = 1 << 20
#: Append+fsync runs on the event loop while it has recently taken less than this many seconds (see _append).
INLINE_SYNC_BUDGET = 0.0005
_TEMP_RE = re.compile(r".+" + re.escape(TEMP_MARK) + r"\d+-[0-9a-f]{8}\Z")



class _Staged:
    """Changes being prepared under the lock, layered over the committed data (read-your-writes)."""

    __slots__ = ("base", "changes")

    def __init__(self, base: dict[str, Collection]) -> None:
        self.base = base
        self.changes: dict[tuple[str, str], bytes | None] = {}

    def get(self, collection: str, key: str) -> bytes | None:
        if (collection, key) in self.changes:
            return self.changes[(collection, key)]
        coll = self.base.get(collection)
        return coll.get(key) if coll is not None else None

    def apply(self, ops: list[Op]) -> None:
        for op in ops:
            self.changes[(op[1], op[2])] = op[3] if op[0] == "p" else None  # type: ignore[misc]

    def keys(self, collection: str) -> set[str]:
        keys = set(self.base.get(collection, ()))
        for (coll, key), value in self.changes.items():
            if coll == collection:
                if value is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return keys


#: A write waiting for the next group commit: turns the view so far into its ops and the caller's result.
_Prepare = Callable[[_Staged], tuple[list[Op], Any]]


class JsonBackend(JsonMessageQueries, BackendBase):
    """The JSON-files backend. Open it with :func:`storage.open_store` (or ``await storage.JsonStore.open(path)``,
    this backend with the features of :mod:`storage.stores`)."""

    backend_name = "json"

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        self.path = Path(config.path)
        self.lock_timeout = config.lock_timeout
        self.read_only = config.read_only
        self._data: dict[str, Collection] = {}
        self._sizes: dict[str, int] = {}  # approximate snapshot bytes per collection
        self._foreign: dict[str, str] = {}  # *.json files that are not collections: name -> why
        self._dirty: set[str] = set()  # collections changed in the current journal generation
        #: each snapshot file as this process last read or wrote it: (stat signature, crc32), to notice edits
        self._files: dict[str, tuple[tuple[int, int, int], int]] = {}
        self._journal = Journal(self.path / JOURNAL_NAME, read_only=self.read_only)
        self._flock = SidecarLock(self.path / LOCK_NAME, read_only=self.read_only)
        self._mutex = asyncio.Lock()  # one holder of the file lock per store, across coroutines
        self._holding = False  # this store holds the file lock: nobody else can append, skip read refreshes
        self._commits: GroupCommit[_Prepare, Any] = GroupCommit(self._locked, self._commit_group,
                                                                after=self._maybe_compact)
        #: A failed append (fsync error): the journal file is not trusted until it is rewritten (see _append).
        self._suspect: BaseException | None = None
        self._need_reload = False
        self._merge_external = False  # see open()
        self._need_lock = False  # what other processes committed is unknown from here: catch up under the lock
        self._sync_estimate = 0.0  # moving average of append+fsync seconds: decides inline vs thread
        #: Compact once the journal exceeds this and the snapshots it would rewrite (tests lower it).
        self.min_compact_bytes = MIN_COMPACT_BYTES
        self._messages = MessageLog(self.path / MESSAGES_DIR, self._locked)  # messages/<guild>/<month>.jsonl

    def __repr__(self) -> str:
        mode = " read_only" if self.read_only else ""
        return f"<{type(self).__name__} path={str(self.path)!r}{mode} closed={self._closed}>"

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Translate the operating system's refusals into :class:`StorageIOError` (with the OSError chained)."""
        try:
            yield
        except OSError as exc:
            where = exc.filename or self.path
            raise StorageIOError(f"{where}: {what} failed: {exc.strerror or exc}", errno=exc.errno,
                                 path=str(where)) from exc

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
        store._merge_external = merge_external
        try:
            await cancellation.run_in_thread(store._open_sync)
        except asyncio.CancelledError:
            store._journal.close()  # opened all the same: give the files back before the cancellation goes on
            store._flock.close()
            raise
        return store

    def _open_sync(self) -> None:
        if self.read_only:
            if not self.path.is_dir():
                raise DatabaseError(f"{self.path}: no such folder (a read-only open never creates one)")
            with self._io("opening the store read-only"):
                self._load()
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
                self._remove_temp_files()
                self._load()
                json_restore.recover(self.path, self._data, at_open=True)  # finish or undo a crashed restore
                untrusted = {name: crc for name, (_sig, crc) in self._files.items()
                             if name not in self._journal.snapshots}
                if untrusted:  # e.g. the seed's own members.json: record its checksum (see _check_edit)
                    self._journal.rebase(untrusted)
                    fsync_dir(self.path)
                self._flock.publish(self._journal.ino or 0, self._journal.offset)
        except BaseException:
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

    def _committed(self) -> tuple[int, int] | None:
        return self._flock.committed(trusted_only=True)

    def _load(self) -> None:
        """(Re)load every snapshot and replay the journal. Needs the file lock (or a read-only store)."""
        if not self._journal.path.exists():
            if self.read_only:
                records: list[list[Op]] = []
                self._journal.close()
                self._journal.ino = None
            else:
                Journal.create(self._journal.path, 1)
                fsync_dir(self.path)
        if self._journal.path.exists():
            records = self._journal.open(self._committed)
        trusted = self._journal.snapshots
        data: dict[str, Collection] = {}
        sizes: dict[str, int] = {}
        foreign: dict[str, str] = {}
        files: dict[str, tuple[tuple[int, int, int], int]] = {}
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if not entry.name.endswith(".json"):
                continue
            name = entry.name[:-5]
            try:
                check_collection(name)
            except ValidationError:
                foreign[name] = "its name is not a valid collection name"
                continue
            path = Path(entry.path)
            if not entry.is_file():  # follows symlinks: a link to a file is that file (see _snapshot_target)
                foreign[name] = "it is not a regular file" + (" (a directory)" if entry.is_dir() else "")
                continue
            st = os.stat(path)
            loaded = read_snapshot(path, trusted.get(name))
            if isinstance(loaded, str):
                foreign[name] = loaded
                continue
            data[name], sizes[name], crc = loaded
            files[name] = (_signature(st), crc)
            if name in trusted and trusted[name] != crc:
                self._check_edit(name, path, data[name], records)
        for name, why in foreign.items():
            if name in OWN_COLLECTIONS:
                raise CorruptDataError(f"{self.path / (name + '.json')} belongs to the library ({name!r}) but {why}; "
                                       "the file was left as it is", path=str(self.path / (name + ".json")))
        self._data, self._sizes, self._foreign, self._dirty, self._files = data, sizes, foreign, set(), files
        self._need_reload = self._need_lock = False
        for ops in records:
            self._apply(ops)

    def _check_edit(self, name: str, path: Path, coll: Collection, records: list[list[Op]]) -> None:
        """A snapshot that is not the file the last compaction wrote: fine if the journal has nothing newer for it
        (a hand edit while the store was closed, or a compaction that crashed after writing it), damage if
        replaying the journal would overwrite part of it (someone wrote it while the store had it open)."""
        final: dict[str, bytes | None] = {}
        for ops in records:
            for op in ops:
                if op[1] == name:
                    final[op[2]] = op[3] if op[0] == "p" else None  # type: ignore[misc]
        clobbered = [key for key, value in final.items() if coll.get(key) != value]
        if clobbered and self._merge_external:
            log.warning("%s was changed outside the store: replaying the journal's newer values of %d documents "
                        "over the edit, as asked (merge_external)", path, len(clobbered))
        elif clobbered:
            raise ExternalChangeError(
                f"{path} was changed outside the store while its journal still holds newer changes to "
                f"{len(clobbered)} of its documents (e.g. {clobbered[0]!r}); opening would overwrite them, so the file "
                "was left as it is. Stop the bot before editing files by hand. To keep both (the journal's values "
                "win for the documents it changed): `python -m storage compact --merge-external`",
                path=str(path))
        log.info("%s was edited while the store was closed: using the edit", path)

    # ---------------------------------------------------------------------------------------------------------------
    # applying committed changes to memory
    def _apply(self, ops: list[Op]) -> None:
        data, sizes = self._data, self._sizes
        for op in ops:
            coll_name, key = op[1], op[2]
            coll = data.get(coll_name)
            if coll is None:
                coll = data[coll_name] = {}
                sizes[coll_name] = 2
            old = coll.get(key)
            if old is not None:
                sizes[coll_name] -= len(key) + len(old) + OVERHEAD
            if op[0] == "p":
                new: bytes = op[3]  # type: ignore[misc]
                coll[key] = new
                sizes[coll_name] += len(key) + len(new) + OVERHEAD
            elif old is not None:
                del coll[key]
            self._dirty.add(coll_name)

    def _follow(self, *, locked: bool) -> None:
        """Apply what other processes committed; flag a catch-up under the lock or a full reload when needed."""
        if self._need_reload or self._journal.fd < 0 or not self._journal.changed():
            return
        found = self._journal.follow(self._committed, locked=locked)
        for index, ops in enumerate(found.records):
            if index == found.switched_at:
                self._dirty = set()  # another process compacted: its snapshots hold everything before this
            self._apply(ops)
        if found.switched_at == len(found.records):
            self._dirty = set()
        self._need_reload = found.reload
        self._need_lock = found.need_lock

    async def _refresh(self) -> None:
        """Before a read: apply what other processes committed. One ``stat`` when nothing changed."""
        if self._holding:
            return  # we hold the lock: nobody else can have written
        journal = self._journal
        if journal.fd >= 0 and not (self._need_reload or self._need_lock):
            try:
                if not journal.changed():
                    return  # the fast path of every read: one pread
            except OSError:
                pass  # reported with context below
        with self._io("reading the journal"):
            if self.read_only:
                self._refresh_read_only()
                return
            self._follow(locked=False)
        if self._need_reload or self._need_lock:
            async with self._locked():
                pass  # _locked() catches up (and reloads) under the lock

    def _refresh_read_only(self) -> None:
        """A read-only store never takes the lock: when the committed end is unknown it reads every complete
        record (a record whose fsync is still running may then be seen), and reloads after a generation jump."""
        if self._journal.fd < 0:
            if self._journal.path.exists():
                self._load()
            return
        self._follow(locked=False)
        if self._need_lock and not self._need_reload:
            for ops in self._journal.read_new(end=None, locked=False):
                self._apply(ops)
            self._need_lock = False
        if self._need_reload:
            self._load()

    def _catch_up_locked(self) -> None:
        """Under the lock: apply everything committed (cutting away what never was), reload after a generation
        jump, and publish the committed end when it was not known."""
        self._follow(locked=True)
        if self._need_reload:
            log.info("%s: the journal moved on by more than one compaction: reloading the snapshots", self.path)
            self._load()
        committed = self._committed()
        if committed is None or committed != (self._journal.ino, self._journal.offset):
            self._flock.publish(self._journal.ino or 0, self._journal.offset)

    # ---------------------------------------------------------------------------------------------------------------
    # the lock
    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold this store's mutex and the cross-process file lock, caught up with the journal.

        A read-only store takes only its mutex (and catches up the read-only way): it never writes.
        """
        async with self._mutex:
            if self.read_only:
                with self._io("reading the journal"):
                    self._refresh_read_only()
                yield
                return
            await self._acquire_file_lock()
            self._holding = True
            try:
                with self._io("catching up with the journal"):
                    self._catch_up_locked()
                    if json_restore.pending(self.path):  # a restore crashed (or is finishing) since the last open
                        json_restore.recover(self.path, self._data)
                yield
            finally:
                self._holding = False
                self._flock.release()

    async def _acquire_file_lock(self) -> None:
        with self._io("taking the store lock"):
            if self._flock.try_acquire():  # uncontended: no thread hop
                return
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

    # ---------------------------------------------------------------------------------------------------------------
    # committing
    def _check_usable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: the store was opened read-only")

    async def _submit(self, prepare: _Prepare) -> Any:
        """Queue a write for the next group commit (group_commit.py) and wait until it is durable."""
        self._check_usable()
        return await self._commits.submit(prepare)

    async def _commit_group(self, batch: list[_Prepare], outcomes: list[Any]) -> None:
        """One group commit, under the lock: every writer's ops in one journal record, one fsync."""
        await self._trust_journal()
        staged = _Staged(self._data)
        ops: list[Op] = []
        for prepare in batch:
            try:
                item_ops, result = prepare(staged)
            except Exception as exc:  # this writer's own failure (its update fn raised, bad result)
                outcomes.append(Failed(exc))
                continue
            staged.apply(item_ops)
            ops.extend(item_ops)
            outcomes.append(result)
        if ops:
            await self._commit(ops)

    async def _commit(self, ops: list[Op]) -> None:
        """Make ``ops`` durable, then visible: append + fsync, publish the committed end, apply to memory.

        Under the lock. The three steps happen together or not at all, whatever interrupts them: if the task is
        cancelled while a worker thread runs the fsync, the thread is waited for (storage.cancellation), and a
        record that reached the disk is published and applied before the cancellation goes on, so the process's
        view always equals the disk. A record that did not reach the disk is neither.
        """
        record = encode_record(ops)
        journal = self._journal
        start = journal.offset
        began = time.perf_counter()
        try:
            try:
                if self._sync_estimate < INLINE_SYNC_BUDGET:
                    journal.append(record)
                else:
                    await cancellation.run_in_thread(journal.append, record)
            finally:
                # Decided before any recovery below: rewriting the files after a failure moves the offset too.
                if journal.offset != start:  # durable: publish and apply even if we are being cancelled
                    self._flock.publish(journal.ino or 0, journal.offset)
                    self._apply(ops)
        except OSError as exc:
            await self._after_failed_append(exc)
            raise StorageIOError(f"{journal.path}: write failed, nothing was committed: {exc.strerror or exc}",
                                 errno=exc.errno, path=str(journal.path)) from exc
        except asyncio.CancelledError as exc:
            if isinstance(exc.__cause__, OSError):  # the write failed while we were cancelled (see cancellation.py)
                log.error("%s: a journal write failed (%s): rewriting the store's files before the next commit",
                          journal.path, exc.__cause__)
                self._suspect = exc.__cause__  # no rewrite now (we are cancelled): _trust_journal does it next
            raise
        self._sync_estimate = 0.8 * self._sync_estimate + 0.2 * (time.perf_counter() - began)

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
    def _compaction_due(self) -> bool:
        if not self._dirty:
            return False
        rewrite = sum(self._sizes.get(c, 0) for c in self._dirty)
        return self._journal.offset > max(self.min_compact_bytes, COMPACT_RATIO * rewrite)

    async def _maybe_compact(self) -> None:
        """Compaction is an optimization: if it fails (disk full), the journal still holds every write."""
        if not self._compaction_due():
            return
        try:
            async with self._locked():
                if self._compaction_due():
                    await self._run_compaction()
        except DatabaseError as exc:
            log.error("%s: compaction failed, the journal keeps the data and grows: %s", self.path, exc)

    async def compact(self) -> None:
        """Fold the journal into the snapshot files now (``storage compact``); leaves plain JSON files."""
        self._guard_read()
        self._check_usable()
        async with self._locked():
            await self._run_compaction()

    async def _run_compaction(self, *, everything: bool = False) -> None:
        """Compact in a worker thread that a cancellation waits for (the lock stays held until it is done).

        ``everything`` rewrites every collection (after a failed fsync, when no file written since is trusted).
        """
        try:
            await cancellation.run_in_thread(self._compact_locked, set(self._data) if everything else set())
        except OSError as exc:
            raise StorageIOError(f"{exc.filename or self.path}: compaction failed: {exc.strerror or exc}; the "
                                 "journal still holds every write", errno=exc.errno,
                                 path=str(exc.filename or self.path)) from exc

    def _compact_locked(self, also: AbstractSet[str] = frozenset()) -> None:
        """Rewrite each changed collection's snapshot (and those in ``also``), then start the next journal
        generation, whose header records every snapshot's checksum.

        Order matters for crashes: snapshots first (each atomic), then the new journal. If we die in between, the
        old journal is replayed onto the new snapshots on the next open, which is harmless (see journal.py).
        A snapshot that was changed behind the store's back is not overwritten (ExternalChangeError).
        """
        names = self._dirty | also
        checksums = {name: crc for name, crc in self._journal.snapshots.items() if name not in names}
        for name in sorted(names):
            if name in self._foreign:
                continue
            path = self.path / f"{name}.json"
            self._check_not_edited(name, path)
            rendered = render_collection(self._data.get(name, {}))
            target = _snapshot_target(path)
            atomic_write(target, rendered, sync_dir=target.parent != self.path)
            crc = zlib.crc32(rendered)
            checksums[name] = crc
            self._files[name] = (_signature(os.stat(target)), crc)
        fsync_dir(self.path)
        self._journal.mark_replacing()
        try:
            Journal.create(self._journal.path, self._journal.generation + 1, checksums,
                           previous_end=self._journal.offset)
        except BaseException:
            self._journal.unmark()
            raise
        self._journal.open(lambda: None)  # header only: we hold the lock, nobody appended
        self._flock.publish(self._journal.ino or 0, self._journal.offset)
        self._dirty = set()

    def _check_not_edited(self, name: str, path: Path) -> None:
        """Refuse to overwrite a snapshot someone else wrote since this process (or the last compaction) did."""
        known = self._files.get(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return  # deleted by hand: memory holds every document, the rewrite brings it back
        if known is not None and _signature(st) == known[0]:
            return
        expected = self._journal.snapshots.get(name, known[1] if known is not None else None)
        if expected is None:
            if known is None and st.st_size > 0:
                raise ExternalChangeError(f"{path} appeared while the store had it open; the file was left as it "
                                          "is", path=str(path))
            return
        crc = zlib.crc32(path.read_bytes())
        if crc != expected:
            raise ExternalChangeError(
                f"{path} was changed outside the store while it was open (the library owns its files while a store "
                "is open: stop the bot to edit them); the store's changes stay in the journal and the file was "
                "left as it is", path=str(path))
        self._files[name] = (_signature(st), crc)

    # ---------------------------------------------------------------------------------------------------------------
    # primitives
    async def _get(self, collection: str, key: str) -> Document | None:
        await self._refresh()
        coll = self._data.get(collection)
        raw = coll.get(key) if coll is not None else None
        return orjson.loads(raw) if raw is not None else None

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Document]:
        await self._refresh()
        coll = self._data.get(collection) or {}
        loads = orjson.loads
        return {k: loads(coll[k]) for k in keys if k in coll}

    def _check_writable(self, collection: str) -> None:
        self._check_usable()
        if collection in self._foreign:
            raise ValidationError(
                f"{self.path / (collection + '.json')} exists but is not a collection ({self._foreign[collection]}); "
                "refusing to write to it", field="collection")

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]]) -> None:
        self._check_writable(collection)
        ops: list[Op] = [("p", collection, key, raw) for key, raw in items]
        await self._submit(lambda staged: (ops, None))

    async def _delete(self, collection: str, key: str) -> bool:
        self._check_writable(collection)

        def prepare(staged: _Staged) -> tuple[list[Op], bool]:
            if staged.get(collection, key) is None:
                return [], False
            return [("d", collection, key)], True

        result: bool = await self._submit(prepare)
        return result

    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None) -> Document:
        self._check_writable(collection)

        def prepare(staged: _Staged) -> tuple[list[Op], Document]:
            raw = staged.get(collection, key)
            _doc, encoded = apply_update(fn, orjson.loads(raw) if raw is not None else None, default)
            return [("p", collection, key, encoded)], orjson.loads(encoded)

        result: Document = await self._submit(prepare)
        return result

    async def _items(self, collection: str, prefix: str | None) -> AsyncIterator[tuple[str, Document]]:
        await self._refresh()
        coll = self._data.get(collection) or {}
        pairs = sorted((k, v) for k, v in coll.items() if prefix is None or k.startswith(prefix))
        for key, raw in pairs:
            yield key, orjson.loads(raw)

    async def _count(self, collection: str) -> int:
        await self._refresh()
        return len(self._data.get(collection) or ())

    async def collections(self) -> list[str]:
        self._guard_read()
        await self._refresh()
        return sorted(name for name, coll in self._data.items() if coll)

    def foreign_files(self) -> dict[str, str]:
        """``*.json`` files in the folder that are not collections, and why (shown by ``storage check``)."""
        return dict(self._foreign)

    # message analytics: the append-only log in json/messages.py
    async def _insert_messages(self, records: list[dict[str, Any]]) -> int:
        self._check_usable()
        return await self._messages.insert(records)

    async def _modify_message(self, message_id: str, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        self._check_usable()
        return await self._messages.modify(message_id, fn)

    async def _delete_messages_before(self, before: datetime) -> int:
        self._check_usable()
        return await self._messages.delete_before(before)

    def _scan_messages(self, guild_id: str | None = None, since: datetime | None = None,
                       until: datetime | None = None) -> AsyncIterator[dict[str, Any]]:
        return self._messages.scan(guild_id, since, until)

    def _scan_message_columns(self, guild_id: str | None, since: datetime | None,
                              until: datetime | None) -> AsyncIterator[MessageColumns]:
        return self._messages.columns(guild_id, since, until)  # the aggregate queries, from a column cache

    # ---------------------------------------------------------------------------------------------------------------
    # transactions and closing
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
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
                    raise
                ops = tx._finish()
                if ops:
                    await self._commit(ops)
        finally:
            self._leave_transaction(token)

    async def close(self) -> None:
        """Wait for queued writes, fold the journal into the snapshots, release the files.

        Cancelling ``close()`` does not cut it short: the compaction it started runs to its end (the files are
        released only then), and the cancellation is delivered after.
        """
        if self._closed:
            return
        self._closed = True
        await cancellation.run_to_completion(self._close())

    async def _close(self) -> None:
        try:
            await self._commits.wait()
            await self._messages.wait()
            if self._dirty and not self.read_only and self._suspect is None:
                async with self._locked():
                    if self._dirty:
                        await self._run_compaction()
        finally:
            self._journal.close()
            self._flock.close()
            self._messages.close()

    def stats(self) -> dict[str, Any]:
        """Sizes for ``storage status``."""
        return {
            "path": str(self.path),
            "collections": {name: len(coll) for name, coll in sorted(self._data.items())},
            "journal_bytes": self._journal.offset,
            "journal_generation": self._journal.generation,
            "foreign_files": dict(self._foreign),
            "read_only": self.read_only,
        }


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is rewritten or replaced (checked before trusting it is still ours)."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def _snapshot_target(path: Path) -> Path:
    """Where a snapshot is written: a symlinked ``<collection>.json`` is followed, and the file it names is
    replaced (atomically, in its own folder), so the link stays. A bot may keep ``members.json`` on a mounted
    volume that way; the library never replaces a link with a regular file."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


class JsonTransaction(OpsBase):
    """A transaction on a :class:`JsonBackend`: changes are staged in memory and committed as one journal line."""

    def __init__(self, store: JsonBackend) -> None:
        self._store = store
        self._staged = _Staged(store._data)
        self._ops: list[Op] = []
        self._active = True

    def _guard_read(self) -> None:
        if not self._active:
            raise DatabaseError("the transaction is finished")
        self._store._guard_open()

    def _guard_write(self) -> None:
        self._guard_read()
        self._store._check_usable()  # a read-only store's transaction only reads

    def _finish(self) -> list[Op]:
        self._active = False
        return self._ops

    def _stage(self, ops: list[Op]) -> None:
        self._staged.apply(ops)
        self._ops.extend(ops)

    async def _get(self, collection: str, key: str) -> Document | None:
        raw = self._staged.get(collection, key)
        return orjson.loads(raw) if raw is not None else None

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Document]:
        out = {}
        for key in keys:
            raw = self._staged.get(collection, key)
            if raw is not None:
                out[key] = orjson.loads(raw)
        return out

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]]) -> None:
        self._store._check_writable(collection)
        self._stage([("p", collection, key, raw) for key, raw in items])

    async def _delete(self, collection: str, key: str) -> bool:
        self._store._check_writable(collection)
        if self._staged.get(collection, key) is None:
            return False
        self._stage([("d", collection, key)])
        return True

    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None) -> Document:
        self._store._check_writable(collection)
        raw = self._staged.get(collection, key)
        _doc, encoded = apply_update(fn, orjson.loads(raw) if raw is not None else None, default)
        self._stage([("p", collection, key, encoded)])
        return decode_doc(encoded)

    async def _items(self, collection: str, prefix: str | None) -> AsyncIterator[tuple[str, Document]]:
        for key in sorted(k for k in self._staged.keys(collection) if prefix is None or k.startswith(prefix)):
            raw = self._staged.get(collection, key)
            if raw is not None:
                yield key, orjson.loads(raw)

    async def _count(self, collection: str) -> int:
        return len(self._staged.keys(collection))

    async def collections(self) -> list[str]:
        """The collections that hold documents, as this transaction sees them (like ``PgTransaction``'s: a backup
        or copy lists them here, since the store itself refuses calls inside its own transaction)."""
        self._guard_read()
        staged = self._staged
        changed = {collection for collection, _ in staged.changes}
        names = {name for name, coll in staged.base.items() if coll and name not in changed}
        names.update(name for name in changed if staged.keys(name))
        return sorted(names)


__all__ += ["JsonTransaction"]
