"""The append-only journal of the JSON backend: one fsynced line per committed change.

Why a journal: the seed (and Red's JSON driver) rewrote the whole file on every save, so a save cost grew with the
store (about 2 s at 100k members). Appending one line and fsyncing it costs the size of the change. The snapshot
files stay plain JSON in the seed's shape; the journal holds what happened since, and compaction folds it back in
(Redis AOF style).

Format: the first line is a header ``{"storage_journal": 1, "generation": N, "snapshots": {name: crc32}}`` (the
checksums of the snapshot files the compaction that started this generation left, so that opening can trust
them without re-validating every document); every other line is one committed
record, a JSON array of operations ``["p", collection, key, doc]`` (put) or ``["d", collection, key]`` (delete).
Every operation is a whole-document put or a delete, so replaying a journal onto a snapshot that already contains
some of it gives the same result: that is what makes a crash mid-compaction harmless.

Crash rules: one commit (a group of concurrent writers' changes) is one line written by one ``write()``; it is
acknowledged only after its fsync, and the next write starts only after that, so only the *last* record can be
torn. A torn last record (no newline, or not parseable) is dropped with a warning and truncated away under the
lock; anything unparseable before it is real corruption and raises :class:`CorruptDataError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import orjson

from ..codec import dumps_kept
from ..errors import CorruptDataError
from ..fsutil import atomic_write, sync_fd, write_all

__all__ = ["Journal", "Op", "encode_record", "JOURNAL_FORMAT"]

log = logging.getLogger("storage.journal")

JOURNAL_FORMAT = 1
#: An operation as the store applies it: ``("p", collection, key, encoded_doc)`` or ``("d", collection, key)``.
Op = tuple[str, str, str, bytes] | tuple[str, str, str]


def encode_record(ops: Sequence[Op]) -> bytes:
    """One journal line; documents are spliced in already encoded (no second serialization)."""
    parts = []
    for op in ops:
        head = b'["' + op[0].encode() + b'",' + orjson.dumps(op[1]) + b"," + orjson.dumps(op[2])
        parts.append(head + b"," + op[3] + b"]" if op[0] == "p" else head + b"]")  # type: ignore[misc]
    return b"[" + b",".join(parts) + b"]\n"


def _header(generation: int, snapshots: dict[str, int]) -> bytes:
    return orjson.dumps({"storage_journal": JOURNAL_FORMAT, "generation": generation, "snapshots": snapshots}) + b"\n"


def _parse_record(line: bytes) -> list[Op]:
    """Decode one record into ops; raises ValueError when the line is not a record this library wrote."""
    raw = orjson.loads(line)
    if type(raw) is not list:
        raise ValueError("record is not a list")
    ops: list[Op] = []
    for op in raw:
        if type(op) is list and len(op) == 4 and op[0] == "p" and type(op[3]) is dict:
            ops.append(("p", op[1], op[2], dumps_kept(op[3])))
        elif type(op) is list and len(op) == 3 and op[0] == "d":
            ops.append(("d", op[1], op[2]))
        else:
            raise ValueError(f"bad operation {op!r:.80}")
        if type(op[1]) is not str or type(op[2]) is not str:
            raise ValueError("collection and key must be strings")
    return ops


class Journal:
    """One journal file: its descriptor, generation and how far this process has applied it.

    Not thread-safe and not async: the store serializes access (its mutex and file lock for writes; reads run on
    the event loop thread between awaits).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.ino: int | None = None
        self.generation = 0
        self.offset = 0  # end of the last record applied by this process
        #: crc32 of each snapshot file as compaction wrote it: a file that still matches needs no re-validation.
        self.snapshots: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @staticmethod
    def create(path: Path, generation: int, snapshots: dict[str, int] | None = None) -> None:
        """Write a fresh journal (header only) atomically; replaces an existing one."""
        atomic_write(path, _header(generation, snapshots or {}))

    def open(self) -> list[list[Op]]:
        """Open the current journal file and read every complete record. Call under the store's lock."""
        self.close()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            st = os.fstat(fd)
            header_end, generation, snapshots = self._read_header(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ino, self.generation, self.offset = fd, st.st_ino, generation, header_end
        self.snapshots = snapshots
        return self.read_new(locked=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _read_header(self, fd: int) -> tuple[int, int, dict[str, int]]:
        head = os.pread(fd, 1 << 16, 0)
        end = head.find(b"\n")
        if end < 0 and len(head) == 1 << 16:  # a header naming very many collections
            head = os.pread(fd, 1 << 24, 0)
            end = head.find(b"\n")
        if end < 0:
            raise CorruptDataError(
                f"{self.path}: journal header is missing or truncated ({len(head)} bytes); "
                "the journal was damaged outside this library", path=str(self.path), position=0)
        try:
            header = orjson.loads(head[:end])
            generation = int(header["generation"])
            fmt = header["storage_journal"]
            snapshots = {str(k): int(v) for k, v in header.get("snapshots", {}).items()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise CorruptDataError(f"{self.path}: journal header is not valid", path=str(self.path),
                                   position=0) from None
        if fmt != JOURNAL_FORMAT:
            raise CorruptDataError(f"{self.path}: journal format {fmt!r} is not supported (this library writes "
                                   f"{JOURNAL_FORMAT})", path=str(self.path), position=0)
        return end + 1, generation, snapshots

    # -- reading ---------------------------------------------------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_new(self, *, locked: bool) -> list[list[Op]]:
        """Records appended since :attr:`offset`; advances it past every record returned.

        ``locked`` means no writer can be active: an incomplete or unparseable last record is then a torn write
        from a crashed process, and is truncated away. Unlocked (a reader peeking at another process's writes),
        the tail may simply be in flight, so it is left for later.
        """
        size = self.size()
        if size <= self.offset:
            if size < self.offset:
                raise CorruptDataError(f"{self.path}: journal shrank below what was already read ({size} < "
                                       f"{self.offset})", path=str(self.path), position=size)
            return []
        data = os.pread(self.fd, size - self.offset, self.offset)
        records: list[list[Op]] = []
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                break
            try:
                records.append(_parse_record(data[pos:end]))
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
                if data.find(b"\n", end + 1) >= 0:
                    raise CorruptDataError(
                        f"{self.path}: journal record at byte {self.offset + pos} is corrupt ({exc}); "
                        "later records exist, so this is not a torn write", path=str(self.path),
                        position=self.offset + pos) from None
                # The last line is unparseable. Unlocked, it may still be in flight: look again later. Locked, it
                # is a torn write that never got its fsync (one commit is one line, written by one write()).
                break
            pos = end + 1
        self.offset += pos
        if pos < len(data) and locked:
            self._drop_torn_tail(size)
        return records

    def _drop_torn_tail(self, size: int) -> None:
        log.warning("%s: dropping a torn final record (%d bytes at offset %d): it was never acknowledged",
                    self.path, size - self.offset, self.offset)
        os.ftruncate(self.fd, self.offset)
        sync_fd(self.fd)

    def replaced(self) -> bool:
        """True when another process compacted: the path now names a different file."""
        try:
            return os.stat(self.path).st_ino != self.ino
        except FileNotFoundError:
            raise CorruptDataError(f"{self.path}: the journal file was removed while the store was open",
                                   path=str(self.path)) from None

    def changed(self) -> bool:
        """Cheap check (one ``stat``) for anything new: appended records or a compaction."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return st.st_ino != self.ino or st.st_size != self.offset

    def follow(self, *, locked: bool) -> tuple[list[list[Op]], int | None, bool]:
        """Catch up with other processes: ``(records, switched_at, need_full_reload)``.

        After another process compacted, the rest of the old file is read through our still-open descriptor, then
        the new file is followed from its header if it is exactly the next generation (``switched_at`` is the index
        in ``records`` where its records start). Otherwise (two compactions happened meanwhile) the caller must
        reload the snapshots under the lock.
        """
        if self.size() < self.offset:
            return [], None, True  # cut back under us (a failed write elsewhere): only a reload is safe
        records = self.read_new(locked=locked)
        if not self.replaced():
            return records, None, False
        records += self.read_new(locked=locked)
        old_generation = self.generation
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return records, None, True
        try:
            st = os.fstat(fd)
            header_end, generation, snapshots = self._read_header(fd)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self.fd, self.ino, self.generation, self.offset = fd, st.st_ino, generation, header_end
        self.snapshots = snapshots
        if generation != old_generation + 1:
            return records, None, True
        switched_at = len(records)
        return records + self.read_new(locked=locked), switched_at, False

    # -- writing ---------------------------------------------------------------------------------------------------
    def append(self, data: bytes) -> None:
        """Append records and fsync them. Call under the lock, caught up (``offset`` at end of file).

        On failure the file is cut back to where it was, so a later append never follows a half-written record.
        """
        start = self.offset
        try:
            write_all(self.fd, data)
            sync_fd(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, start)
                sync_fd(self.fd)
            except OSError:
                log.exception("%s: could not cut back a failed append", self.path)
            raise
        self.offset = start + len(data)

