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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ..analytics import MessageColumns
from ..codec import check_collection, decode_doc
from ..config import StoreConfig
from ..errors import DatabaseError, LockTimeoutError, ValidationError
from ..fsutil import TEMP_MARK, atomic_write, fsync_dir
from ..protocol import Document, Transaction, UpdateFn
from .base import BaseStore, OpsBase, apply_update
from .group_commit import Failed, GroupCommit
from .journal import Journal, Op, encode_record
from .json_messages import MESSAGES_DIR, MessageLog
from .lockfile import LockBusy, SidecarLock
from .snapshot import OVERHEAD, Collection, read_snapshot, render_collection

__all__ = ["JsonStore", "JOURNAL_NAME", "LOCK_NAME"]

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


class JsonStore(BaseStore):
    """The JSON-files backend. Open it with :func:`storage.open_store` (or ``await JsonStore.open(path)``)."""

    backend_name = "json"

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        self.path = Path(config.path)
        self.lock_timeout = config.lock_timeout
        self._data: dict[str, Collection] = {}
        self._sizes: dict[str, int] = {}  # approximate snapshot bytes per collection
        self._foreign: dict[str, str] = {}  # *.json files that are not collections: name -> why
        self._dirty: set[str] = set()  # collections changed in the current journal generation
        self._journal = Journal(self.path / JOURNAL_NAME)
        self._flock = SidecarLock(self.path / LOCK_NAME)
        self._mutex = asyncio.Lock()  # one holder of the file lock per store, across coroutines
        self._holding = False  # this store holds the file lock: nobody else can append, skip read refreshes
        self._commits: GroupCommit[_Prepare, Any] = GroupCommit(self._locked, self._commit_group,
                                                                after=self._maybe_compact)
        self._broken: BaseException | None = None
        self._need_reload = False
        self._seen_counter = -1  # the lock file's change counter when we last caught up (see lockfile.py)
        self._sync_estimate = 0.0  # moving average of append+fsync seconds: decides inline vs thread
        #: Compact once the journal exceeds this and the snapshots it would rewrite (tests lower it).
        self.min_compact_bytes = MIN_COMPACT_BYTES
        self._messages = MessageLog(self.path / MESSAGES_DIR, self._locked)  # messages/<guild>/<month>.jsonl

    def __repr__(self) -> str:
        return f"<JsonStore path={str(self.path)!r} closed={self._closed}>"

    # ---------------------------------------------------------------------------------------------------------------
    # opening and loading
    @classmethod
    async def open(cls, config: StoreConfig | str | os.PathLike[str]) -> JsonStore:
        """Open (creating the folder if needed) under the lock: cleans up after crashes, loads, replays."""
        if not isinstance(config, StoreConfig):
            config = StoreConfig(backend="json", path=os.fspath(config), source="arguments")
        store = cls(config)
        await asyncio.to_thread(store._open_sync)
        return store

    def _open_sync(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseError(f"cannot create the data folder {self.path}: {exc}") from exc
        try:
            self._flock.acquire(self.lock_timeout)
        except LockBusy:
            raise LockTimeoutError(f"{self.path}: another process held the store lock for over "
                                   f"{self.lock_timeout}s") from None
        except OSError as exc:
            raise DatabaseError(f"cannot take the lock {self.path / LOCK_NAME}: {exc}") from exc
        try:
            self._remove_temp_files()
            self._load_locked()
            self._seen_counter = self._flock.read_counter()
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

    def _load_locked(self) -> None:
        """(Re)load every snapshot and replay the journal. Needs the file lock."""
        if not self._journal.path.exists():
            Journal.create(self._journal.path, 1)
            fsync_dir(self.path)
        records = self._journal.open()
        trusted = self._journal.snapshots
        data: dict[str, Collection] = {}
        sizes: dict[str, int] = {}
        foreign: dict[str, str] = {}
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if not entry.name.endswith(".json") or not entry.is_file():
                continue
            name = entry.name[:-5]
            try:
                check_collection(name)
            except ValidationError:
                foreign[name] = "its name is not a valid collection name"
                continue
            loaded = read_snapshot(Path(entry.path), trusted.get(name))
            if isinstance(loaded, str):
                foreign[name] = loaded
                continue
            data[name], sizes[name] = loaded
        self._data, self._sizes, self._foreign, self._dirty = data, sizes, foreign, set()
        for ops in records:
            self._apply(ops)

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
        """Apply what other processes appended; flag a full reload when the journal jumped generations."""
        if self._need_reload or not self._journal.changed():
            return
        records, switched_at, reload = self._journal.follow(locked=locked)
        for index, ops in enumerate(records):
            if index == switched_at:
                self._dirty = set()  # another process compacted: its snapshots hold everything before this
            self._apply(ops)
        if switched_at == len(records):
            self._dirty = set()
        self._need_reload = reload

    async def _refresh(self) -> None:
        """Before a read: apply what other processes committed. A shared-memory read when nothing changed."""
        if self._holding:
            return  # we hold the lock: nobody else can have written
        seen = self._flock.read_counter()
        if seen == self._seen_counter and not self._need_reload:
            return
        self._seen_counter = seen  # before reading the journal: a commit racing with us bumps it again
        self._follow(locked=False)
        if self._need_reload:
            async with self._locked():
                pass  # _locked() reloads under the lock

    def _catch_up_locked(self) -> None:
        """Under the lock: apply everything committed (truncating a torn tail), reload after a generation jump."""
        self._follow(locked=True)
        if self._need_reload:
            log.info("%s: the journal moved on by more than one compaction: reloading the snapshots", self.path)
            self._load_locked()
            self._need_reload = False

    # ---------------------------------------------------------------------------------------------------------------
    # the lock
    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold this store's mutex and the cross-process file lock, caught up with the journal."""
        async with self._mutex:
            await self._acquire_file_lock()
            self._holding = True
            try:
                self._catch_up_locked()
                yield
            finally:
                self._holding = False
                self._flock.release()

    async def _acquire_file_lock(self) -> None:
        if self._flock.try_acquire():  # uncontended: no thread hop
            return
        cancel = threading.Event()
        waiter = asyncio.get_running_loop().run_in_executor(None, self._flock.acquire, self.lock_timeout, cancel)
        try:
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
            except (LockBusy, asyncio.CancelledError):
                pass
            self._flock.release()
            raise

    # ---------------------------------------------------------------------------------------------------------------
    # group commit
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise DatabaseError(f"{self.path}: the store stopped accepting writes after an I/O failure "
                                f"({self._broken}); close and reopen it") from self._broken

    async def _submit(self, prepare: _Prepare) -> Any:
        """Queue a write for the next group commit (group_commit.py) and wait until it is durable."""
        self._check_usable()
        return await self._commits.submit(prepare)

    async def _commit_group(self, batch: list[_Prepare], outcomes: list[Any]) -> None:
        """One group commit, under the lock: every writer's ops in one journal record, one fsync."""
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
            await self._append(encode_record(ops))
            self._apply(ops)
            self._seen_counter = self._flock.bump_counter()

    async def _append(self, record: bytes) -> None:
        """Append and fsync one record: inline while fsyncs are fast, in a worker thread once they are not.

        Handing the write to a thread costs more than a fast fsync itself (measured here: ~150 us hop for a
        ~200 us fsync), but a slow disk (several ms per fsync) must not stall the event loop. So the loop keeps a
        moving average of recent append+fsync times and blocks for at most about INLINE_SYNC_BUDGET at a time.
        """
        started = time.perf_counter()
        try:
            if self._sync_estimate < INLINE_SYNC_BUDGET:
                self._journal.append(record)
            else:
                await asyncio.to_thread(self._journal.append, record)
        except OSError as exc:
            if self._journal.size() != self._journal.offset:
                self._broken = exc
            raise DatabaseError(f"{self._journal.path}: write failed, nothing was committed: {exc}") from exc
        self._sync_estimate = 0.8 * self._sync_estimate + 0.2 * (time.perf_counter() - started)

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
                    await asyncio.to_thread(self._compact_locked)
        except (OSError, DatabaseError) as exc:
            log.error("%s: compaction failed, the journal keeps the data and grows: %s", self.path, exc)

    async def compact(self) -> None:
        """Fold the journal into the snapshot files now (``storage compact``); leaves plain JSON files."""
        self._guard_read()
        async with self._locked():
            await asyncio.to_thread(self._compact_locked)

    def _compact_locked(self) -> None:
        """Rewrite each changed collection's snapshot, then start the next journal generation.

        Order matters for crashes: snapshots first (each atomic), then the new journal. If we die in between, the
        old journal is replayed onto the new snapshots on the next open, which is harmless (see journal.py).
        """
        checksums = {name: crc for name, crc in self._journal.snapshots.items() if name not in self._dirty}
        for name in sorted(self._dirty):
            if name in self._foreign:
                continue
            rendered = render_collection(self._data.get(name, {}))
            atomic_write(self.path / f"{name}.json", rendered, sync_dir=False)
            checksums[name] = zlib.crc32(rendered)
        fsync_dir(self.path)
        Journal.create(self._journal.path, self._journal.generation + 1, checksums)
        self._journal.open()  # header only: we hold the lock, nobody appended
        self._dirty = set()
        self._seen_counter = self._flock.bump_counter()

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

    # message analytics: the append-only log in json_messages.py
    async def _insert_messages(self, records: list[dict[str, Any]]) -> int:
        return await self._messages.insert(records)

    async def _modify_message(self, message_id: str, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
        return await self._messages.modify(message_id, fn)

    async def _delete_messages_before(self, before: datetime) -> int:
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
            self._check_usable()
            async with self._locked():
                tx = JsonTransaction(self)
                try:
                    yield tx
                except BaseException:
                    tx._finish()
                    raise
                ops = tx._finish()
                if ops:
                    await self._append(encode_record(ops))
                    self._apply(ops)
                    self._seen_counter = self._flock.bump_counter()
        finally:
            self._leave_transaction(token)

    async def close(self) -> None:
        """Wait for queued writes, fold the journal into the snapshots, release the files."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._commits.wait()
            if self._dirty and self._broken is None:
                async with self._locked():
                    if self._dirty:
                        await asyncio.to_thread(self._compact_locked)
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
        }


class JsonTransaction(OpsBase):
    """A transaction on a :class:`JsonStore`: changes are staged in memory and committed as one journal line."""

    def __init__(self, store: JsonStore) -> None:
        self._store = store
        self._staged = _Staged(store._data)
        self._ops: list[Op] = []
        self._active = True

    def _guard_read(self) -> None:
        if not self._active:
            raise DatabaseError("the transaction is finished")
        self._store._guard_open()

    _guard_write = _guard_read

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
