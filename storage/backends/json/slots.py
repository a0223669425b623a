"""Shared slots: a writer that waits for the store lock hands its small record to the lock's holder, whose one
fsync then commits it with its own (a cross-process group commit with the fsync still under the lock; issue 15).

Why this shape (benchmarks/README.md, "Design measurements", cross-process group commit): four writer processes
on one store commit one record per ``fdatasync``, one at a time, as SQLite WAL FULL does. Letting the fsync leave
the lock (PostgreSQL ``XLogFlush``) would share it, but then the journal holds bytes nobody committed while the lock
is free, and every other holder (open, catch-up, compaction, transactions, restore, messages) would have to drain
them first. Here the journal never holds uncommitted bytes while the lock is free: the holder writes the waiters'
records *as part of its own commit*, under the lock, so nothing else changes for the lock's other users.

The file ``storage.slots`` beside ``storage.lock`` (never fsynced: it means something only while its writers live)
has :data:`COUNT` slots. Each has a header (state, length, journal inode, offset) in the first page and room for one
record. Three kinds of OFD locks (Linux ``F_OFD_SETLK``; they belong to one open file description, so two stores
of one process are two writers here, as for ``flock``):

* the *owner* byte of a slot, write-locked by the store that uses the slot for as long as it is open: a holder
  never claims a slot whose owner is gone (the kernel dropped its lock), and a store takes a free slot this way;
* the *mutex* byte of a slot, write-locked by whoever changes the slot's state, for a few syscalls;
* none for the holder: it holds the store lock (``flock``), which is what makes it the only claimer.

States and who moves them (every change under the slot's mutex):

* EMPTY -> OFFERED: the owner, before it waits for the store lock (its record, at most :data:`MAX_RECORD` bytes);
* OFFERED -> CLAIMED(inode, X, length): the holder, before its ``pwrite``: the record's operations will lie at
  bytes X..X+length of the journal of that inode (inside the holder's record: one journal line, see below);
* CLAIMED -> COMMITTED / FAILED: the holder, after its fsync and publish (or after its write or fsync failed),
  before it lets go of the store lock;
* CLAIMED left by a holder that died (the next holder finds it: nobody else can hold the lock and see CLAIMED):
  :meth:`Slots.settle_orphans` reads the journal: the published committed end covers X+length on that inode and
  the bytes at X are the record -> COMMITTED, else FAILED (the catch-up cuts what lies past the committed end).
  It runs at every acquisition of the store lock, before anything (a compaction) could replace the journal;
* any -> EMPTY: the owner, holding the store lock (:meth:`Slots.take_back`: what happened to its offer), or
  cancelled while OFFERED (:meth:`Slots.withdraw`); a cancelled owner that finds CLAIMED must settle first.

One journal line per commit, not one per record: the holder's record and the claimed ones become one record
(their operations in one JSON array), so a power loss during its fsync leaves one torn line at the end, as today,
never a torn record before a whole one (what blocked the ``XLogFlush`` design: the reader takes that for damage).
Order is the journal's: a follower applies its own operations when it catches up to the committed end, after
everything committed before them (as ``apply_after`` does), so it never acknowledges a write its view lacks.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import NamedTuple

try:  # pragma: no cover - platform switch
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Slots", "Claim", "Offer", "EMPTY", "OFFERED", "CLAIMED", "COMMITTED", "FAILED", "MAX_RECORD", "COUNT"]

#: How many writers can offer at once (more wait and commit as before).
COUNT = 16
#: The largest record a writer offers (larger ones, and batches, commit the usual way).
MAX_RECORD = 4096
_HEAD = struct.Struct("<BxxxIQQ")  # state, length, journal inode, X
_STRIDE = 32  # one header every 32 bytes in the first page
_ROOM = 4096  # then one page of record room a slot: slot i's record at (1 + i) * _ROOM
_OWNER = 1 << 30  # the owner bytes: _OWNER + i (OFD locks past the file's end are fine)
_MUTEX = (1 << 30) + 4096  # the mutex bytes: _MUTEX + i

EMPTY, OFFERED, CLAIMED, COMMITTED, FAILED = 0, 1, 2, 3, 4

_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None) if fcntl is not None else None
_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None) if fcntl is not None else None
_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None) if fcntl is not None else None


class Claim(NamedTuple):
    """A slot the holder claimed: its number, the record's operations (the bytes inside the record's brackets) and
    where they go."""

    slot: int
    inner: bytes
    at: int


class Offer(NamedTuple):
    """What became of a writer's offer (:meth:`Slots.take_back`)."""

    state: int
    ino: int
    at: int
    length: int


def _flock_struct(kind: int, byte: int) -> bytes:
    return struct.pack("hhqqi", kind, os.SEEK_SET, byte, 1, 0)


def inner(record: bytes) -> bytes | None:
    """A journal record's operations without the enclosing brackets and newline (None: not such a record)."""
    if len(record) < 4 or record[:1] != b"[" or record[-2:] != b"]\n":
        return None
    return record[1:-2]


def combine(own: bytes, claims: list[Claim]) -> bytes:
    """One journal line: ``own``'s operations, then each claimed record's (X computed by :meth:`Slots.claim`)."""
    return b"".join([own[:-2], *(b"," + claim.inner for claim in claims), b"]\n"])


class Slots:
    """One store's view of ``storage.slots`` (see the module doc). Not thread-safe: the store's event loop (or the
    thread it waits on) uses it, holding the store's mutex."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self.index = -1  # our slot (-1: none; we then never offer)
        self.available = _OFD_SETLK is not None and _OFD_GETLK is not None and _OFD_SETLKW is not None

    def _file(self) -> bool:
        """Open the file (False: no OFD locks here, or it cannot be opened: offers are off)."""
        if self._fd >= 0:
            return True
        if not self.available:
            return False
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            self.available = False
            return False
        return True

    def _open(self) -> bool:
        """Open the file and own a free slot (False: none free or no OFD locks: offers are off)."""
        if self.index >= 0:
            return True
        if not self._file():
            return False
        try:
            for index in range(COUNT):
                try:
                    fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_WRLCK, _OWNER + index))  # type: ignore[arg-type]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (11, 13):  # EAGAIN / EACCES: owned by another
                        continue
                    raise
                self.index = index
                self._write_head(index, EMPTY, 0, 0, 0)  # whatever a previous owner left
                return True
        except OSError:
            self.available = False
            self.close()
        return False

    # -- the slot mutex --------------------------------------------------------------------------------------------
    def _lock(self, index: int) -> None:
        fcntl.fcntl(self._fd, _OFD_SETLKW, _flock_struct(fcntl.F_WRLCK, _MUTEX + index))  # type: ignore[arg-type]

    def _unlock(self, index: int) -> None:
        fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, _MUTEX + index))  # type: ignore[arg-type]

    def _owned(self, index: int) -> bool:
        """Whether a live store owns slot ``index`` (one ``F_OFD_GETLK``)."""
        found = fcntl.fcntl(self._fd, _OFD_GETLK, _flock_struct(fcntl.F_WRLCK, _OWNER + index))  # type: ignore[arg-type]
        kind: int = struct.unpack_from("h", found)[0]
        return kind != fcntl.F_UNLCK

    def _read_head(self, index: int) -> tuple[int, int, int, int]:
        raw = os.pread(self._fd, _HEAD.size, index * _STRIDE)
        if len(raw) < _HEAD.size:
            return EMPTY, 0, 0, 0
        state, length, ino, at = _HEAD.unpack(raw)
        return state, length, ino, at

    def _write_head(self, index: int, state: int, length: int, ino: int, at: int) -> None:
        os.pwrite(self._fd, _HEAD.pack(state, length, ino, at), index * _STRIDE)

    # -- the owner's side ------------------------------------------------------------------------------------------
    def offer(self, record: bytes) -> bool:
        """Before waiting for the store lock: offer ``record`` (one journal line) to its holder. False: not offered
        (too large, no slot): the caller commits it itself as before."""
        ops = inner(record)
        if ops is None or len(ops) > MAX_RECORD or not self._open():
            return False
        index = self.index
        self._lock(index)
        try:
            os.pwrite(self._fd, ops, (1 + index) * _ROOM)
            self._write_head(index, OFFERED, len(ops), 0, 0)
        finally:
            self._unlock(index)
        return True

    def take_back(self) -> Offer:
        """Holding the store lock, after :meth:`settle_orphans`: what became of our offer; the slot is EMPTY
        after. COMMITTED: the record is in the journal before the committed end (catch up to apply it); anything
        else: it is not, commit it yourself."""
        index = self.index
        self._lock(index)
        try:
            state, length, ino, at = self._read_head(index)
            self._write_head(index, EMPTY, 0, 0, 0)
        finally:
            self._unlock(index)
        return Offer(state, ino, at, length)

    def withdraw(self) -> Offer:
        """A cancelled owner, not holding the store lock: OFFERED becomes EMPTY (returned as OFFERED: nothing of it
        was written); CLAIMED stays (a holder is writing it: the caller settles it under the store lock with
        :meth:`take_back`); COMMITTED / FAILED are taken back as :meth:`take_back` does."""
        index = self.index
        self._lock(index)
        try:
            state, length, ino, at = self._read_head(index)
            if state != CLAIMED:
                self._write_head(index, EMPTY, 0, 0, 0)
        finally:
            self._unlock(index)
        return Offer(state, ino, at, length)

    # -- the holder's side -----------------------------------------------------------------------------------------
    def claim(self, ino: int, at: int, room: int) -> list[Claim]:
        """Holding the store lock, before writing a record whose operations' end lands at ``at`` of journal
        ``ino`` (the record's closing bracket not counted): claim every live offered slot, up to ``room`` bytes of
        operations in all. Each slot is CLAIMED with where its operations will lie before this returns."""
        if not self._file():
            return []
        heads = os.pread(self._fd, COUNT * _STRIDE, 0)
        claims: list[Claim] = []
        for index in range(min(COUNT, len(heads) // _STRIDE)):
            if index == self.index or heads[index * _STRIDE] != OFFERED:
                continue
            if not self._owned(index):
                continue  # its writer died: nobody would acknowledge it
            self._lock(index)
            try:
                state, length, _ino, _at = self._read_head(index)
                if state != OFFERED or length > room:
                    continue
                ops = os.pread(self._fd, length, (1 + index) * _ROOM)
                if len(ops) != length:
                    continue
                place = at + 1  # after the comma
                self._write_head(index, CLAIMED, length, ino, place)
            finally:
                self._unlock(index)
            claims.append(Claim(index, ops, place))
            at = place + length
            room -= length
        return claims

    def mark(self, claims: list[Claim], state: int) -> None:
        """Holding the store lock: the claimed records are COMMITTED (fsynced and published) or FAILED."""
        for claim in claims:
            self._lock(claim.slot)
            try:
                _s, length, ino, at = self._read_head(claim.slot)
                self._write_head(claim.slot, state, length, ino, at)
            finally:
                self._unlock(claim.slot)

    def settle_orphans(self, journal_path: str, committed: Callable[[], tuple[int, int] | None]) -> None:
        """Holding the store lock, before anything else: a slot still CLAIMED was claimed by a holder that died
        (a live holder marks its claims before letting go). COMMITTED when ``committed`` (inode, end) covers it on
        its inode and the bytes there are its record, FAILED otherwise (then it was never published: the catch-up
        cuts it, and its writer commits it itself)."""
        if not self._file():
            return
        heads = os.pread(self._fd, COUNT * _STRIDE, 0)
        end: tuple[int, int] | None = None
        for index in range(min(COUNT, len(heads) // _STRIDE)):
            if heads[index * _STRIDE] != CLAIMED:
                continue
            if end is None:
                end = committed() or (0, 0)
            self._lock(index)
            try:
                state, length, ino, at = self._read_head(index)
                if state != CLAIMED:
                    continue
                verdict = FAILED
                if end[0] == ino and end[1] >= at + length:
                    ops = os.pread(self._fd, length, (1 + index) * _ROOM)
                    if _journal_bytes(journal_path, ino, at, length) == ops:
                        verdict = COMMITTED
                self._write_head(index, verdict, length, ino, at)
            finally:
                self._unlock(index)

    def close(self) -> None:
        """Give the slot up (closing the descriptor drops every OFD lock of it)."""
        if self._fd >= 0:
            try:
                if self.index >= 0:
                    self._write_head(self.index, EMPTY, 0, 0, 0)
            except OSError:
                pass
            os.close(self._fd)
        self._fd = -1
        self.available = False  # closed for good: a store is not reopened
        self.index = -1


def _journal_bytes(path: str, ino: int, at: int, length: int) -> bytes | None:
    """``length`` bytes at ``at`` of the journal at ``path`` when it is the file of inode ``ino``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_ino != ino:
            return None
        return os.pread(fd, length, at)
    finally:
        os.close(fd)
