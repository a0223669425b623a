"""The JSON backend's message log: append-only JSON Lines files, one per guild and month.

Layout and line format: :mod:`.json_message_files`. Why this shape: messages are the highest-volume data a bot
writes, and the one thing it never does with them is rewrite old ones. Appending a batch costs one ``write`` and
one fsync per file it touches, however large the log; a query reads only the files of its guild and months, and a
prune drops whole months with an ``unlink``.

Updates. :meth:`MessageLog.modify` appends ``{"update": <the whole new record>}`` to the file holding the record:
old lines are never rewritten, and the last line of an id in its file is its current version. The identity and
the timestamp of a message cannot change (see :mod:`storage.messages.records`), so an update always belongs to the same
file as its record.

Concurrency. Every write holds the store's lock (its in-process mutex and the cross-process file lock) and runs
its blocking I/O in a thread. Inserts are group-committed (:mod:`.group_commit`): the batches of every caller that
queued while the previous commit ran are written together, one ``write`` and one fsync per file for all of them.
Idempotency needs every stored id: the index (``message_id -> the file holding it``) is built lazily, on the first write
(queries never need it), and before each write it is caught up with what other processes appended, by reading
the tail of every file that grew since. A prune by another process changes ``rewrites.generation``, after which
the index is rebuilt from the files. The index maps Python ints to a small int per file, so the dict holds no
object the garbage collector walks: about 75 bytes per message, in the processes that write, nothing in those
that only read. Building it reads the ids with one regular expression per 8 MB block (about 1 s per million
messages on a busy 2-core machine, against 2.3-3 s for a line-by-line read). An update finds the record's latest
line by searching its file backwards from the end (recent messages, the ones that get updates, are in the first
block searched).

Queries read files without the lock: files only grow, except that a prune replaces them atomically
(``os.replace``) or removes them. The aggregate queries read column blocks from :mod:`.json_message_cache`. A scan
of full records (backups, ``storage stats --channel``) holds one guild-month file in memory at a time (all
guilds' files of one month for a scan of every guild), as its lines (bytes, which the garbage collector does not
walk), and parses each record as it yields it.

Crashes. A batch is written to each file with one ``write`` and acknowledged after every file's fsync (and the
directory's, for a new file); if a write fails, every file is cut back to where it was. A process that dies
mid-batch (never acknowledged) may leave a prefix of the batch, which re-sending completes (ids are
deduplicated), and a torn last line, which is dropped with a warning the next time a writer catches up (readers
skip it: it may be in flight). An unreadable line anywhere else is corruption: :class:`CorruptDataError` names
the file and byte position, and nothing is changed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson

from ...errors import CorruptDataError, StorageIOError, ValidationError
from ...fsutil import atomic_write, fsync_dir, sync_fd, temp_name, write_all
from ...interfaces import MessageSummary
from ...messages.columns import MessageColumns, micros
from ...messages.records import bound_key, normalized_chunks, timestamp_key
from ...offload import Pacer
from ...shards import ShardedDict
from ...sorting import sorted_in_runs
from .group_commit import Failed, GroupCommit
from .message_cache import ColumnCache
from .message_files import (
    ENCODE_SLICE,
    GENERATION_NAME,
    MESSAGES_DIR,
    ORDER_ID,
    ORDER_TS,
    PIECE,
    FileKey,
    Record,
    block_line_ids,
    corrupt,
    encode_bodies,
    encode_update,
    file_path,
    is_temp_file,
    iter_blocks,
    iter_lines,
    join_lines,
    list_files,
    list_months,
    month_range,
    order_key,
    parse_line,
    parse_record,
    read_generation,
    run_holding,
    run_in_thread,
    split_lines,
)

__all__ = ["MessageLog", "MESSAGES_DIR", "GENERATION_NAME", "Encoded", "encode_batch", "ENCODE_GROUP"]

log = logging.getLogger("storage.json.messages")

_FSYNC_THREADS = 8  # a batch touching several files fsyncs them in parallel (the disk merges the flushes)
_SEARCH_BLOCK = 1 << 20  # an update searches its record's file backwards in blocks of this size
#: ``scan`` gives the event loop a turn every this many records (what its consumer does with each one, e.g. a copy
#: hashing it, runs on the loop: a whole month at once held it 0.35 s at 1M messages).
SCAN_TURN = 500


@dataclass
class _FileState:
    """What the index holds of one file: its slot (the index's value for its ids), its inode, how far it was read."""

    slot: int
    ino: int
    size: int


@dataclass
class Encoded:
    """A ``record_messages`` batch checked and encoded (:func:`encode_batch`): its unique records' ids, guilds,
    months (``YYYY-MM``) and lines (see ``encode_bodies``), in order. Ints, texts and bytes only: nothing here is
    tracked by the garbage collector, where the batch's 10,000 normalized record dicts, held until the write,
    set off full collections inside the call (issue 15)."""

    ids: list[int] = field(default_factory=list)
    guilds: list[str] = field(default_factory=list)
    months: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


#: Records normalized, then encoded, at a time by :func:`encode_batch`: fewer than the youngest generation's
#: threshold (700 new containers), so that a group is usually gone before a collection finds it alive.
ENCODE_GROUP = 256


def encode_batch(records: Iterator[Any]) -> Encoded:
    """The caller's records checked, deduplicated and normalized (:func:`~storage.messages.records.normalized_chunks`:
    a bad record raises ValidationError, and nothing is written), then encoded :data:`ENCODE_GROUP` at a time,
    keeping only what the write needs (in a worker thread for a large batch)."""
    batch = Encoded()
    ids, guilds, months = batch.ids, batch.guilds, batch.months
    for chunk in normalized_chunks(records, ENCODE_GROUP):
        for rec in chunk:
            ids.append(int(rec["message_id"]))
            guilds.append(rec["guild_id"])
            months.append(rec["timestamp"][:7])
        batch.bodies += encode_bodies(chunk)
    return batch


@dataclass
class _Group:
    """The lines of one insert commit that go to one file."""

    slot: int  # the file's slot, reserved for a new file
    rows: list[int] = field(default_factory=list)  # positions of its records in the commit's new records
    bodies: Sequence[bytes] = ()  # their encoded lines, see encode_bodies
    size: int = 0  # bytes written


class MessageLog:
    """The message files of one :class:`~storage.backends.json.store.JsonStore` (see the module doc).

    ``locked`` is the store's ``_locked``: an async context manager holding its mutex and the file lock.
    """

    def __init__(self, root: Path, locked: Callable[[], AbstractAsyncContextManager[None]]) -> None:
        self.root = root
        self._locked = locked
        #: message id -> slot of the file holding it; sharded: one dict of 1M ids grew in 27-58 ms steps holding
        #: the GIL (storage/shards.py)
        self._index: ShardedDict[int, int] | None = None
        self._files: dict[FileKey, _FileState] = {}
        self._slots: list[FileKey | None] = []
        self._generation = b""
        self._rewriting = False  # a prune has changed the generation already
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # parallel fsyncs, made on first need
        self._inserts: GroupCommit[list[Record] | Encoded, int] = GroupCommit(locked, self._commit_inserts)
        self._cache = ColumnCache(root)

    def __repr__(self) -> str:
        known = "not loaded" if self._index is None else f"{len(self._index)} ids"
        return f"<MessageLog root={str(self.root)!r} index={known}>"

    async def wait(self) -> None:
        """Wait until every queued insert is settled (before closing)."""
        await self._inserts.wait()

    async def release(self) -> None:
        """:meth:`close`, freeing the index and the cache in a worker thread a piece at a time: at 1M messages,
        dropping them in one go (one C call: the GIL is not given back) held the event loop 25-40 ms at close."""
        index, files, pool = self._index, self._cache.take(), self._pool
        self._index, self._files, self._slots, self._pool = None, {}, [], None
        await run_in_thread(_free, index, files, pool)

    def free(self) -> None:
        """:meth:`close` for a worker thread: the index and the cache freed a piece at a time (see :meth:`release`).
        A restore's staged log (storage/backends/json/restore.py) indexes every backed-up message: closed with
        :meth:`close`, its 1M ids were freed in one step that held the GIL ~40 ms (``--holders``)."""
        index, files, pool = self._index, self._cache.take(), self._pool
        self._index, self._files, self._slots, self._pool = None, {}, [], None
        _free(index, files, pool)

    def close(self) -> None:
        """Forget the index and the cache (they are rebuilt from the files by whoever opens the store next)."""
        self._index, self._files, self._slots = None, {}, []
        self._cache.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _path(self, key: FileKey) -> Path:
        return file_path(self.root, key)

    # ---------------------------------------------------------------------------------------------------------------
    # the index, caught up under the lock
    def _before_rewrite(self) -> None:
        """Tell other processes, once per prune, that files are being rewritten: their indexes must be rebuilt.

        Done before the first file changes, so that a crash half-way still tells them.
        """
        if self._rewriting:
            return
        token = secrets.token_hex(8).encode() + b"\n"
        atomic_write(self.root / GENERATION_NAME, token)
        self._generation = token
        self._rewriting = True

    def _sync_locked(self) -> ShardedDict[int, int]:
        """Bring the index up to date with the files (load it on first use). Needs the lock."""
        generation = read_generation(self.root)
        if self._index is None or generation != self._generation:
            if self._index is not None:
                log.info("%s: another process rewrote message files: rebuilding the id index", self.root)
            self._index, self._files, self._slots = ShardedDict(), {}, []
            self._generation = generation
            self._remove_temp_files()
        index = self._index
        seen: set[FileKey] = set()
        for key, path, st in list_files(self.root):
            seen.add(key)
            state = self._files.get(key)
            if state is not None and (state.ino != st.st_ino or st.st_size < state.size):
                log.warning("%s was replaced without a generation change: re-reading it", path)
                self._forget(key)
                state = None
            if state is None:
                state = self._files[key] = _FileState(len(self._slots), st.st_ino, 0)
                self._slots.append(key)
            if st.st_size > state.size:
                self._read_tail(path, state, st.st_size, index)
        if len(seen) != len(self._files):
            for key in [k for k in self._files if k not in seen]:
                log.warning("%s disappeared without a generation change: forgetting its ids", self._path(key))
                self._forget(key)
        return index

    def _remove_temp_files(self) -> None:
        """Temp files are written only under the lock, which we hold: any we find is from a crashed prune."""
        if not self.root.is_dir():
            return
        dirs = [self.root] + [Path(e.path) for e in os.scandir(self.root) if e.is_dir()]
        for folder in dirs:
            for entry in os.scandir(folder):
                if is_temp_file(entry.name) and entry.is_file(follow_symlinks=False):
                    log.warning("%s: removing %s left by an interrupted prune", folder, entry.name)
                    os.unlink(entry.path)

    def _forget(self, key: FileKey) -> None:
        """Drop a file's ids from the index (its slot is never reused)."""
        state = self._files.pop(key)
        self._slots[state.slot] = None
        assert self._index is not None
        index, slot = self._index, state.slot
        for mid in [m for m, s in index.items() if s == slot]:
            del index[mid]

    def _read_tail(self, path: Path, state: _FileState, size: int, index: ShardedDict[int, int]) -> None:
        """Index the lines appended to a file since we last read it; truncate a torn last line."""
        slot = state.slot
        fd = os.open(path, os.O_RDWR)
        try:
            end = state.size
            previous: tuple[int, bytes] | None = None
            for block in iter_blocks(fd, state.size, size, PIECE):
                if previous is not None:
                    index.update(dict.fromkeys(block_line_ids(path, *previous), slot))
                previous = block
            if previous is not None:
                offset, data = previous
                cut = data.rfind(b"\n", 0, len(data) - 1) + 1  # where the last line starts
                if cut:
                    index.update(dict.fromkeys(block_line_ids(path, offset, data[:cut]), slot))
                end = offset + cut
                try:
                    last = parse_record(data[cut:-1])  # checked in full: a torn write may end in a newline
                except ValueError:
                    pass
                else:
                    index[int(last["message_id"])] = slot
                    end = offset + len(data)
            if end < size:
                log.warning("%s: dropping a torn final line (%d bytes at offset %d): it was never acknowledged",
                            path, size - end, end)
                os.ftruncate(fd, end)
                sync_fd(fd)
            state.size = end
        finally:
            os.close(fd)

    # ---------------------------------------------------------------------------------------------------------------
    # inserts, group-committed
    async def insert(self, records: list[Record] | Encoded) -> int:
        """Append the records whose ids are not stored yet; returns how many were appended.

        Callers that arrive while a commit is running are written together by the next one.
        """
        return await self._inserts.submit(records)

    async def insert_groups(self, groups: Iterable[list[Record]]) -> int:
        """:meth:`insert` of every record of ``groups`` (ids distinct), consumed under the lock in a worker thread
        and encoded a group at a time (see ``_insert_locked``); one write and fsync per file for all of them."""
        return sum(await run_holding(self._locked(), self._insert_locked, groups))

    async def _commit_inserts(self, batches: list[list[Record] | Encoded], counts: list[int | Failed]) -> None:
        """One group commit, under the lock: every caller's batch in one write and fsync per file."""
        counts += await run_in_thread(self._insert_locked, batches)

    def _insert_locked(self, batches: Iterable[list[Record] | Encoded]) -> list[int]:
        """Append every batch's new records (in order: an id in two batches is new for the first one only).

        Each batch is encoded as soon as it is grouped, and only its lines and ids are kept: ``batches`` may be a
        generator decoding small groups (a restore's staging, :func:`restore.stage_messages`), whose records are
        then garbage before the collector finds them alive (see ``backup.messages.DECODE_GROUP``).
        """
        index = self._sync_locked()
        files, slots = self._files, self._slots
        pacer = Pacer()  # the event loop's turns between batches and files (a GIL convoy otherwise: see Pacer)
        groups: dict[FileKey, _Group] = {}
        counts: list[int] = []
        ids: list[int] = []  # the new records' ids, in order (to forget them if nothing is written)
        bodies: list[bytes] = []  # their encoded lines, see encode_bodies

        def place(mid: int, key: FileKey) -> bool:
            """Give a record its file's group (True), unless its id is stored already or earlier in the commit."""
            if mid in index:
                return False
            group = groups.get(key)
            if group is None:
                state = files.get(key)
                if state is None:  # a new file: reserve its slot now, so ids can point to it
                    slots.append(None)
                group = groups[key] = _Group(len(slots) - 1 if state is None else state.slot)
            index[mid] = group.slot  # also marks it seen for the rest of the commit
            group.rows.append(len(ids))
            ids.append(mid)
            return True

        try:
            for batch in batches:
                pacer.tick()
                if isinstance(batch, Encoded):
                    rows = [i for i, (mid, guild, month) in enumerate(zip(batch.ids, batch.guilds, batch.months))
                            if place(mid, (guild, month))]
                    counts.append(len(rows))
                    bodies += batch.bodies if len(rows) == len(batch) else [batch.bodies[i] for i in rows]
                    continue
                fresh = [rec for rec in batch if place(int(rec["message_id"]), (rec["guild_id"], rec["timestamp"][:7]))]
                counts.append(len(fresh))
                for start in range(0, len(fresh), ENCODE_SLICE):  # each dumps, count and split kept short
                    bodies += encode_bodies(fresh[start:start + ENCODE_SLICE])
                    pacer.tick()
            if ids:
                if len(groups) == 1:
                    next(iter(groups.values())).bodies = bodies
                else:
                    for group in groups.values():  # gathered in C
                        rows = group.rows
                        group.bodies = itemgetter(*rows)(bodies) if len(rows) > 1 else [bodies[rows[0]]]
                self._append(groups, pacer)
        except BaseException:
            for mid in ids:  # nothing was written: forget the ids (reserved slots stay unused)
                index.pop(mid, None)
            raise
        return counts

    def _append(self, groups: dict[FileKey, _Group], pacer: Pacer) -> None:
        """Write each group's lines to its file, fsync them all, then record the new sizes. On failure cut every
        file back (and raise DatabaseError). ``pacer`` is ticked after each file (each is an ``open``, a ``write``
        and a pool's ``fsync`` finishing: GIL hand-overs that starve the event loop without pauses, see Pacer).

        With several files, each one's fsync starts in the pool as soon as it is written, so the disk flushes the
        first files while the next ones are encoded and written (the fsyncs run in parallel: the disk merges the
        flushes, about 3x faster for a batch over 10 files).
        """
        written: list[tuple[FileKey, Path, int, bool]] = []  # key, path, size before, created
        fds: list[int] = []
        inodes: list[int] = []
        syncs: list[concurrent.futures.Future[None]] = []
        pool = self._fsync_pool() if len(groups) > 1 else None
        try:
            try:
                for key, group in groups.items():
                    path = self._path(key)
                    state = self._files.get(key)
                    created = state is None
                    if created:
                        self._make_dirs(path.parent)
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    fds.append(fd)
                    if state is not None:
                        before, ino = state.size, state.ino
                    else:
                        st = os.fstat(fd)
                        before, ino = st.st_size, st.st_ino
                    written.append((key, path, before, created))
                    inodes.append(ino)
                    data = join_lines(group.bodies)
                    write_all(fd, data)
                    group.size = len(data)
                    del data
                    if pool is None:
                        sync_fd(fd)
                    else:
                        syncs.append(pool.submit(sync_fd, fd))
                    pacer.tick()
            finally:
                concurrent.futures.wait(syncs)  # all of them, before anyone closes or truncates a file
            for sync in syncs:
                sync.result()
            for folder in {path.parent for _k, path, _b, created in written if created}:
                fsync_dir(folder)
        except OSError as exc:
            self._cut_back(written)
            raise StorageIOError(f"{self.root}: writing messages failed, nothing was recorded: {exc}",
                                 errno=exc.errno, path=str(exc.filename or self.root)) from exc
        finally:
            for fd in fds:
                os.close(fd)
        for (key, _path, before, created), ino in zip(written, inodes):
            group = groups[key]
            if created:
                self._files[key] = _FileState(group.slot, ino, before + group.size)
                self._slots[group.slot] = key
            else:
                self._files[key].size = before + group.size

    def _fsync_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="storage-fsync")
        return self._pool

    def _cut_back(self, written: list[tuple[FileKey, Path, int, bool]]) -> None:
        """Undo a failed append. Readers may have seen the lines meanwhile: a new generation tells them to forget
        what they cached (best effort: with the disk full, that write may fail too, which is logged)."""
        if not written:
            return
        try:
            self._rewriting = False
            self._before_rewrite()
        except OSError:
            log.exception("%s: could not record that a failed append was cut back", self.root)
        finally:
            self._rewriting = False
        for _key, path, before, created in written:
            try:
                if created and before == 0:
                    os.unlink(path)
                else:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.ftruncate(fd, before)
                        sync_fd(fd)
                    finally:
                        os.close(fd)
            except OSError:
                log.exception("%s: could not cut back a failed append; the next writer indexes what is there",
                              path)

    def _make_dirs(self, folder: Path) -> None:
        """Create ``messages/<guild>/`` durably (each new directory entry fsynced in its parent)."""
        missing = []
        for parent in (folder, folder.parent):
            if parent.is_dir():
                break
            missing.append(parent)
        for parent in reversed(missing):
            parent.mkdir(exist_ok=True)
            fsync_dir(parent.parent)

    # ---------------------------------------------------------------------------------------------------------------
    # updates and prunes
    async def modify(self, message_id: str, fn: Callable[[Record], Record]) -> bool:
        """Append ``{"update": fn(record)}`` to the record's file; False when the id is not stored."""
        return await run_holding(self._locked(), self._modify_locked, message_id, fn)

    def _modify_locked(self, message_id: str, fn: Callable[[Record], Record]) -> bool:
        index = self._sync_locked()
        slot = index.get(int(message_id))
        if slot is None:
            return False
        key = self._slots[slot]
        assert key is not None
        path, state = self._path(key), self._files[key]
        current = _latest(path, state.size, message_id)
        new = fn(dict(current))
        if new["message_id"] != current["message_id"] or new["guild_id"] != current["guild_id"] \
                or new["timestamp"][:7] != current["timestamp"][:7]:
            raise ValidationError("an update cannot move a message to another guild or month", field="timestamp")
        if new == current:
            return True  # nothing changes: no line to write
        line = encode_update(new)
        written = [(key, path, state.size, False)]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                write_all(fd, line)
                sync_fd(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._cut_back(written)
            raise StorageIOError(f"{path}: writing the update failed, nothing changed: {exc}", errno=exc.errno,
                                 path=str(exc.filename or path)) from exc
        state.size += len(line)
        return True

    async def delete_before(self, before: datetime, guild: str | None = None) -> int:
        """Remove every record (of ``guild``, when given) with timestamp < ``before``: whole months by unlink, the
        boundary month rewritten."""
        return await run_holding(self._locked(), self._delete_locked, bound_key(before), guild)

    def _delete_locked(self, before: str, guild: str | None = None) -> int:
        index = self._sync_locked()
        month = before[:7]
        partial = before > month_range(month)[0]  # the bound's own month has lines to keep and maybe to drop
        doomed = sorted(k for k in self._files if (guild is None or k[0] == guild)
                        and (k[1] < month or (partial and k[1] == month)))
        if not doomed:
            return 0
        self._rewriting = False
        try:
            deleted = 0
            folders: set[Path] = set()
            for key in doomed:
                path = self._path(key)
                if key[1] < month:
                    deleted += self._drop_file(key, path, index)
                else:
                    deleted += self._rewrite_file(key, path, before, index)
                folders.add(path.parent)
            for folder in sorted(folders):
                fsync_dir(folder)
                if not any(os.scandir(folder)):
                    os.rmdir(folder)
                    fsync_dir(folder.parent)
            return deleted
        except OSError as exc:
            raise StorageIOError(f"{self.root}: pruning messages failed (files already pruned stay pruned, the "
                                 f"others are unchanged): {exc}", errno=exc.errno,
                                 path=str(exc.filename or self.root)) from exc
        finally:
            self._rewriting = False

    def _drop_file(self, key: FileKey, path: Path, index: ShardedDict[int, int]) -> int:
        """Remove a month that is entirely before the bound; returns how many records it held."""
        state = self._files[key]
        ids: set[int] = set()
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, block in iter_blocks(fd, 0, state.size, PIECE):
                ids.update(block_line_ids(path, offset, block))
        finally:
            os.close(fd)
        self._before_rewrite()
        os.unlink(path)
        self._files.pop(key)
        self._slots[state.slot] = None
        for mid in ids:
            if index.get(mid) == state.slot:
                del index[mid]
        return len(ids)

    def _rewrite_file(self, key: FileKey, path: Path, before: str, index: ShardedDict[int, int]) -> int:
        """Stream the boundary month into a temp file without the old lines, then swap it in atomically."""
        state = self._files[key]
        dropped: set[int] = set()
        kept: set[int] = set()
        tmp = temp_name(path)
        src = os.open(path, os.O_RDONLY)
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            out: list[bytes] = []
            size = pending = 0
            for offset, line in iter_lines(src, 0, state.size, PIECE):
                try:
                    rec = parse_record(line)
                except ValueError as exc:
                    raise corrupt(path, offset, exc) from None
                mid = int(rec["message_id"])
                if timestamp_key(rec["timestamp"]) < before:
                    dropped.add(mid)
                    continue
                kept.add(mid)
                out.append(line + b"\n")
                size += len(line) + 1
                pending += len(line) + 1
                if pending >= PIECE:
                    write_all(dst, b"".join(out))
                    out, pending = [], 0
            write_all(dst, b"".join(out))
            if dropped:
                os.fsync(dst)
        except BaseException:
            os.close(dst)
            os.unlink(tmp)
            raise
        finally:
            os.close(src)
        os.close(dst)
        if not dropped:
            os.unlink(tmp)
            return 0
        self._before_rewrite()
        if kept:
            os.replace(tmp, path)
            state.ino, state.size = os.stat(path).st_ino, size
        else:
            os.unlink(tmp)
            os.unlink(path)
            self._files.pop(key)
            self._slots[state.slot] = None
        gone = dropped - kept  # all lines of an id share its timestamp: normally all of ``dropped``
        for mid in gone:
            if index.get(mid) == state.slot:
                del index[mid]
        return len(gone)

    # ---------------------------------------------------------------------------------------------------------------
    # reads (no lock: files only grow, or are replaced atomically)
    async def scan(self, guild_id: str | None, since: datetime | None,
                   until: datetime | None) -> AsyncIterator[Record]:
        """Records in ``[since, until)`` ordered by (timestamp, message id), one month at a time."""
        lo = bound_key(since) if since is not None else None
        hi = bound_key(until) if until is not None else None
        if lo is not None and hi is not None and lo >= hi:
            return
        months = await asyncio.to_thread(list_months, self.root, guild_id, lo, hi)
        for month, guilds in months:
            start, end = month_range(month)
            m_lo = lo if lo is not None and lo > start else None
            m_hi = hi if hi is not None and hi < end else None
            paths = [self._path((g, month)) for g in guilds]
            lines = await asyncio.to_thread(_load_month, paths, m_lo, m_hi)
            loads = orjson.loads
            for index, line in enumerate(lines):
                if index and not index % SCAN_TURN:
                    await asyncio.sleep(0)  # a month is up to 100k records: the consumer's work gets loop turns
                rec = loads(line)  # validated by _load_month: a record, or {"update": record}
                yield rec if "message_id" in rec else rec["update"]
            await _release(lines)

    async def summary(self) -> MessageSummary:
        """Count, guilds, oldest and newest of every record (``status``): files counted without parsing where that
        is sure to give the same answer (:mod:`.message_counts`), the others and the oldest / newest from the column
        cache."""
        return await self._cache.summary()

    async def columns(self, guild_id: str | None, since: datetime | None,
                      until: datetime | None) -> AsyncIterator[MessageColumns]:
        """The records in ``[since, until)`` as column blocks, from the cache (:mod:`.json_message_cache`)."""
        lo = micros(since) if since is not None else None
        hi = micros(until) if until is not None else None
        if lo is not None and hi is not None and lo >= hi:
            return
        lo_key = bound_key(since) if since is not None else None
        hi_key = bound_key(until) if until is not None else None
        turn = False
        for block in await self._cache.blocks(guild_id, lo_key, hi_key, lo, hi):
            for part in block.parts():  # a loop turn between blocks of at most COLUMN_BLOCK rows: counting them
                if turn:                # all in one step held the loop 25-35 ms at 200k messages a guild
                    await asyncio.sleep(0)
                turn = True
                yield part


# -------------------------------------------------------------------------------------------------------------------


async def _release(lines: list[bytes]) -> None:
    """Drop a scanned month's lines SCAN_TURN at a time with a loop turn between (a month of one guild may hold
    any number of records: dropping the last reference to a list frees all of it in one step)."""
    while lines:
        del lines[-SCAN_TURN:]
        await asyncio.sleep(0)


def _free(index: ShardedDict[int, int] | None, files: dict[FileKey, Any],
          pool: concurrent.futures.Executor | None) -> None:
    """Drop ``index`` a shard at a time and ``files`` item by item (in a worker thread, which gives the GIL back
    between Python steps), and shut ``pool`` down (joining its threads blocks)."""
    if index is not None:
        index.clear()  # a shard at a time
    while files:
        files.popitem()
    if pool is not None:
        pool.shutdown(wait=True)


def _latest(path: Path, size: int, message_id: str) -> Record:
    """The latest version of a record in its file: its last line, searched backwards from ``size``.

    Updates are mostly about recent messages (reactions, a late analysis), which are found in the first block.
    """
    digits = message_id.encode()
    needles = (b'\n{"message_id":"' + digits + b'"', b'\n{"update":{"message_id":"' + digits + b'"')
    overlap = len(needles[1])
    fd = os.open(path, os.O_RDONLY)
    try:
        end = size
        while end > 0:
            start = max(0, end - _SEARCH_BLOCK)
            chunk = os.pread(fd, end - start, start)
            shift = 1 if start == 0 else 0
            text = b"\n" + chunk if shift else chunk
            hit = max(text.rfind(needle) for needle in needles)
            if hit >= 0:
                line_start = start + hit + 1 - shift
                return _read_line(path, fd, line_start, size)
            end = start + overlap if start else 0
        # Not a line of ours (message_id first): written by hand, say. Parse every line, the last one wins.
        found: Record | None = None
        for offset, line in iter_lines(fd, 0, size):
            try:
                rec = parse_record(line)
            except ValueError as exc:
                raise corrupt(path, offset, exc) from None
            if rec["message_id"] == message_id:
                found = rec
    finally:
        os.close(fd)
    if found is None:
        raise CorruptDataError(f"{path}: message {message_id} is indexed in this file but has no line in it; was "
                               "the file changed meanwhile?", path=str(path))
    return found


def _read_line(path: Path, fd: int, offset: int, size: int) -> Record:
    data = b""
    while b"\n" not in data and offset + len(data) < size:
        more = os.pread(fd, min(64 << 10, size - offset - len(data)), offset + len(data))
        if not more:
            break
        data += more
    line = data.split(b"\n", 1)[0]
    try:
        return parse_record(line)
    except ValueError as exc:
        raise corrupt(path, offset, exc) from None


def _keyed(path: Path, lo: str | None, hi: str | None, keys: list[str], lines: list[bytes],
           pacer: Pacer) -> None:
    """Append one file's current records in ``[lo, hi)`` to ``keys`` (their order keys) and ``lines`` (the lines,
    each validated; a bad line: see :func:`parse_block`; the last line of an id is its current version)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return  # pruned meanwhile
    end = data.rfind(b"\n") + 1
    first = len(keys)
    updates = False
    offset = 0
    # split a piece at a time, as parse_block does: one ``split`` of a whole file (and the copy of it sliced
    # first) kept the GIL for milliseconds per MB, a pause the pacer cannot cut
    for line in split_lines(data, end):
        try:
            rec, update = parse_line(line)
        except ValueError as exc:
            if offset + len(line) + 1 == end:
                break  # being written right now, or torn by a crash: left for later (as parse_block does)
            raise corrupt(path, offset, exc) from None
        updates = updates or update
        key = order_key(rec)
        ts = key[:ORDER_TS]
        if (lo is None or ts >= lo) and (hi is None or ts < hi):
            keys.append(key)
            lines.append(line)
        offset += len(line) + 1
        pacer.tick()
    if updates:  # the last line of an id is its current version (an update keeps the id and the timestamp)
        latest = {keys[i][ORDER_ID:]: i for i in range(first, len(keys))}  # str -> int: not tracked by the collector
        kept = list(latest.values())
        keys[first:] = [keys[i] for i in kept]
        lines[first:] = [lines[i] for i in kept]


def _load_month(paths: list[Path], lo: str | None, hi: str | None) -> list[bytes]:
    """The current records in ``[lo, hi)`` of one month's files (one per guild), as their lines in scan order.

    In a worker thread. Lines, not dicts: bytes are not tracked by the garbage collector, where a month of
    records held as dicts (83k at 1M messages, each with its analysis dict and topics list) was ~250k containers
    that every full collection meanwhile walked (a copy's full collections took up to 260 ms, holding the GIL),
    and freeing them cost its consumer 40-55 ms of the loop. The scan parses each line as it yields it.

    The order keys and the lines are two lists, and what is sorted is their positions (ints): ``(key, line)``
    pairs were a tuple holding a tuple, which the collector's first look cannot untrack (the inner one is still
    tracked when it checks the outer), so a month's pairs lived long enough to reach its oldest generation and
    set off most of a JSON-to-anything copy's full collections (1-7k promoted pairs each, at 1M messages).
    """
    keys: list[str] = []  # order_key's strings: a tuple each grew the collector's count (see order_key)
    lines: list[bytes] = []
    # a month of one guild is ~0.2-0.5 s of parsing: without pauses a thread running Python beside the loop (a
    # copy from a JSON store, its consumer) held the GIL for whole switch intervals, the loop waiting 15-30 ms
    pacer = Pacer()
    for path in paths:
        _keyed(path, lo, hi, keys, lines, pacer)
    # Each file's lines are mostly in order already; sorted a run at a time (storage/sorting.py: one sort of the
    # month held the GIL 28 ms)
    ordered = []
    for i in sorted_in_runs(range(len(keys)), keys.__getitem__):  # a heap merge in Python: paced as well
        ordered.append(lines[i])
        pacer.tick()
    while keys:  # freed a slice at a time: the GIL can go back to the loop between two slices
        del keys[-10_000:]
        del lines[-10_000:]
        pacer.tick()
    return ordered
