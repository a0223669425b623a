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
* none for the holder: it holds the store lock (``flock``), which is what makes it the only claimer;
* and the *since* bytes, one a journal generation: a writer read-locks the byte of its journal's generation from
  its offer until it empties its slot, and a compaction keeps every generation from the lowest one locked
  (json/journal.py ``keep_previous``, :meth:`Slots.kept_needed`): unlike the header, a truncation of the file does
  not wipe them, and a writer whose slot then says nothing can read everything committed since its offer.

States and who moves them (every change under the slot's mutex):

* EMPTY -> OFFERED: the owner, before it waits for the store lock (its record, at most :data:`MAX_RECORD` bytes);
* OFFERED -> CLAIMED(inode, X, length): the holder, before its ``pwrite``: the record's operations will lie at
  bytes X..X+length of the journal of that inode (inside the holder's record: one journal line, see below);
* CLAIMED -> COMMITTED / FAILED: the holder, after its fsync and publish (or after its write or fsync failed),
  before it lets go of the store lock. That write may fail (``storage.slots`` refusing a ``pwrite``): the slot
  then stays CLAIMED, the holder lets go at the end of that commit and the next holder settles it as below; until
  then the holder must not replace the journal (:meth:`Slots.settle_unmarked` retries first);
* CLAIMED left by a holder that died or could not mark it (the next holder finds it):
  :meth:`Slots.settle_orphans` reads the journal: the published committed end covers X+length on that inode and
  the bytes at X are the record -> COMMITTED, else FAILED (the catch-up cuts what lies past the committed end).
  It runs at every acquisition of the store lock, before anything (a compaction) could replace the journal. A
  verdict it cannot write is kept in memory for that holding, as a failed mark is (writes go on; compactions wait
  for a COMMITTED one to be written), and derived again from the same journal by the next holder;
* any -> EMPTY: the owner, holding the store lock (:meth:`Slots.take_back`: what happened to its offer), or
  cancelled while OFFERED (:meth:`Slots.withdraw`); a cancelled owner that finds CLAIMED must settle first. An
  owner that cannot empty its slot gives it up (its owner byte let go: never claimed again) rather than leave an
  offer a later holder would commit after its writer committed it itself or reported it failed.

Not part of the protocol: the file truncated or overwritten while writers wait (the README warns against it). A
writer whose slot then says nothing asks the journal since its offer (:meth:`Slots.found_in_journal`), through
every generation a compaction started meanwhile: the since bytes keep them on disk while it waits.

One journal line per commit, not one per record: the holder's record and the claimed ones become one record
(their operations in one JSON array), so a power loss during its fsync leaves one torn line at the end, as today,
never a torn record before a whole one (what blocked the ``XLogFlush`` design: the reader takes that for damage).
Order is the journal's: a follower applies its own operations when it catches up to the committed end, after
everything committed before them (as ``apply_after`` does), so it never acknowledges a write its view lacks.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from . import offer_search

try:  # pragma: no cover - platform switch
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Slots", "Claim", "Offer", "EMPTY", "OFFERED", "CLAIMED", "COMMITTED", "FAILED", "MAX_RECORD", "COUNT"]

log = logging.getLogger("storage.json")

#: How many writers can offer at once (more wait and commit as before).
COUNT = 16
#: The largest record a writer offers (larger ones, and batches, commit the usual way).
MAX_RECORD = 4096
_HEAD = struct.Struct("<BBxxIQQ")  # state, generation (0/1: which door its writer waits at), length, inode, X
_STRIDE = 32  # one header every 32 bytes in the first page
_ROOM = 4096  # then one page of record room a slot: slot i's record at (1 + i) * _ROOM
_OWNER = 1 << 30  # the owner bytes: _OWNER + i (OFD locks past the file's end are fine)
_MUTEX = (1 << 30) + 4096  # the mutex bytes: _MUTEX + i
_DOOR = (1 << 30) + 8192  # the doors: _DOOR + 2 * i + generation
_SINCE = 1 << 40  # _SINCE + g: read-locked by each writer whose offer stands, g its journal's generation then

EMPTY, OFFERED, CLAIMED, COMMITTED, FAILED = 0, 1, 2, 3, 4

#: How long a writer whose door opened tries for its slot's mutex before it asks the store lock instead (the holder
#: that opened the door has let go of the mutex already, see :meth:`Slots.mark`: this covers a descheduled holder
#: on a busy host), and the pause between tries. On the event loop's thread: kept far under its 20 ms budget.
PEEK_WAIT = 0.002
_RETRY = 0.00005

_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None) if fcntl is not None else None
_OFD_SETLKW: int | None = getattr(fcntl, "F_OFD_SETLKW", None) if fcntl is not None else None
_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None) if fcntl is not None else None


class Claim(NamedTuple):
    """A slot the holder claimed: its number, the record's operations (the bytes inside the record's brackets) and
    where they go (byte ``at`` of the journal of inode ``ino``)."""

    slot: int
    inner: bytes
    at: int
    ino: int


class Offer(NamedTuple):
    """What became of a writer's offer (:meth:`Slots.take_back`)."""

    state: int
    gen: int
    ino: int
    at: int
    length: int


def _flock_struct(kind: int, byte: int, length: int = 1) -> bytes:
    return struct.pack("hhqqi", kind, os.SEEK_SET, byte, length, 0)


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

    def __init__(self, path: str, committed: Callable[[], tuple[int, int] | None] | None = None) -> None:
        self.path = path
        #: the published (journal inode, committed end), or None when unknown (json/lock.py, trusted only)
        self._committed = committed
        #: our last offer's operations and the committed end read just before it (:meth:`found_in_journal`)
        self.offered: tuple[bytes, tuple[int, int] | None] | None = None
        self._fd = -1
        self._wait_fd = -1  # a second description, for the door waits (its locks are not the holder's)
        self.index = -1  # our slot (-1: none; we then never offer)
        self.standing = False  # our last offer is not taken back yet (its since byte is locked: _waiting)
        self._since = -1  # the generation whose since byte we lock (-1: none)
        self.doors_closed = False  # we hold the lock and every door (see close_doors)
        #: claims of this holding whose verdict could not be written (:meth:`mark`): settled before the journal is
        #: replaced (:meth:`settle_unmarked`), forgotten when the store lock is let go (:meth:`open_doors`)
        self.unmarked: list[tuple[Claim, int]] = []
        #: claims whose unwritable verdict :meth:`settle_orphans` reported (:meth:`_report`: once each)
        self._reported: set[tuple[int, int, int]] = set()
        self.available = _OFD_SETLK is not None and _OFD_GETLK is not None and _OFD_SETLKW is not None

    def _file(self, create: bool) -> bool:
        """Open the file (False: no OFD locks here, or it cannot be opened: offers are off). It is created at open
        (:meth:`settle_orphans`, ``create``); a holder's commit only uses the descriptor it has (no ``open`` or
        ``stat`` per commit)."""
        if self._fd >= 0:
            return True
        if not self.available:
            return False
        try:
            self._fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return False
        except OSError:
            self.available = False
            return False
        return True

    def _open(self) -> bool:
        """Open the file and own a free slot (False: none free, no OFD locks, or the file refused: offers are off;
        tried again at the next acquisition of the store lock, :meth:`settle_orphans`).

        A refusal other than the locks' absence keeps the descriptor: a store whose file was closed for good
        would no longer settle other writers' claims (:meth:`settle_orphans`), nor refuse to replace the journal
        while one it knows committed waits for its verdict (:meth:`settle_unmarked`)."""
        if self.index >= 0:
            return True
        if not self._file(create=True):
            return False
        for index in range(COUNT):
            owner = _flock_struct(fcntl.F_WRLCK, _OWNER + index)
            try:
                fcntl.fcntl(self._fd, _OFD_SETLK, owner)  # type: ignore[arg-type]
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):  # owned by another
                    continue
                if exc.errno == errno.EINVAL:  # no OFD locks on this kernel or file system
                    self.available = False
                    self.close()
                return False
            try:
                self._write_head(index, EMPTY, 0, 0, 0, 0)  # whatever a previous owner left
            except OSError:
                try:
                    fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, _OWNER + index))  # type: ignore[arg-type]
                except OSError:  # pragma: no cover - an unlock is not refused
                    pass
                return False
            self.index = index
            return True
        return False

    # -- the slot mutex --------------------------------------------------------------------------------------------
    # Who blocks on it: only a holder of the store lock settling or marking a slot, or an owner taking its slot back
    # under that lock (:meth:`_lock`): the other party is then an owner inside a few syscalls that never wait. Every
    # other step takes it only if it is free (:meth:`_try_lock`, :meth:`_lock_within`) and otherwise falls back to
    # the store lock, which is bounded by the lock timeout: a process frozen (or descheduled) holding a slot's mutex
    # or a door must never stop another process's event loop.
    def _lock(self, index: int) -> None:
        fcntl.fcntl(self._fd, _OFD_SETLKW, _flock_struct(fcntl.F_WRLCK, _MUTEX + index))  # type: ignore[arg-type]

    def _try_lock(self, index: int) -> bool:
        """Take slot ``index``'s mutex if it is free (one ``F_OFD_SETLK``)."""
        try:
            fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_WRLCK, _MUTEX + index))  # type: ignore[arg-type]
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _lock_within(self, index: int, seconds: float) -> bool:
        """Take slot ``index``'s mutex, trying for up to ``seconds`` (its holders keep it a few syscalls)."""
        deadline = time.monotonic() + seconds
        while not self._try_lock(index):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_RETRY)
        return True

    def _unlock(self, index: int) -> None:
        fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, _MUTEX + index))  # type: ignore[arg-type]

    def _owned(self, index: int) -> bool:
        """Whether a live store owns slot ``index`` (one ``F_OFD_GETLK``)."""
        found = fcntl.fcntl(self._fd, _OFD_GETLK, _flock_struct(fcntl.F_WRLCK, _OWNER + index))  # type: ignore[arg-type]
        kind: int = struct.unpack_from("h", found)[0]
        return kind != fcntl.F_UNLCK

    def _read_head(self, index: int) -> tuple[int, int, int, int, int]:
        raw = os.pread(self._fd, _HEAD.size, index * _STRIDE)
        if len(raw) < _HEAD.size:
            return EMPTY, 0, 0, 0, 0
        state, gen, length, ino, at = _HEAD.unpack(raw)
        return state, gen & 1, length, ino, at

    def _write_head(self, index: int, state: int, length: int, ino: int, at: int, gen: int = -1) -> None:
        if gen < 0:
            gen = self._read_head(index)[1]
        os.pwrite(self._fd, _HEAD.pack(state, gen, length, ino, at), index * _STRIDE)

    # -- the doors -------------------------------------------------------------------------------------------------
    # Why: a writer that offered must learn that its record was committed without waiting for the store lock (a
    # holder keeps it for a lease of many commits, json/lease.py: waiting for the lock, a writer contributed one
    # record per lease). While a store holds the lock it holds a write lock on every door byte (two a slot); a
    # writer that offered with generation g waits for a read lock on its door g; the holder, marking the slot,
    # closes door 1-g (which the writer's next offer will use) and opens door g. Letting go of the store lock
    # opens every door (so does the holder's death: the kernel drops its locks); a writer that finds its slot
    # still OFFERED then waits for the lock as before.
    def close_doors(self) -> None:
        """Just after taking the store lock: close every door that is free (a waiter holds its read lock only for
        a moment, but a frozen one would hold it for ever: never waited for). A door left open lets its writer
        through at once; it finds its slot still offered and waits for the store lock as before.

        Nothing at all when no other store owns a slot (one ``F_OFD_GETLK``; issue 15: a lone save paid a
        ``pread`` of the headers in every commit's :meth:`claim`, and a door lock and unlock in every holding):
        the doors stay open and :meth:`claim` does not look, for as long as we hold the lock. A store that takes
        a slot meanwhile and offers passes its open door at once, finds its offer standing and waits for the
        lock, giving the wait sign (json/lock.py), as when a holder leaves an offer unclaimed: it commits its
        record itself, once (take_back says OFFERED)."""
        if not self._file(create=False) or not self._others_own():
            return
        try:
            fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_WRLCK, _DOOR, 2 * COUNT))  # type: ignore[arg-type]
        except OSError:
            for door in range(_DOOR, _DOOR + 2 * COUNT):  # one is held this moment: the others one by one
                self._try_door(door)
        self.doors_closed = True
        try:
            self._reopen_decided()
        except OSError:  # pragma: no cover - best effort: such a writer waits for the lock's letting go, as before
            pass

    def _reopen_decided(self) -> None:
        """Part of :meth:`close_doors`: open again the door of each slot a holder marked (COMMITTED / FAILED) whose
        writer has not taken its verdict back yet.

        Why: an unlock does not hand an OFD lock to the process blocked on it; it only wakes it, and the woken
        thread takes the lock when it next runs. A writer descheduled between the mark that opened its door and
        that moment found the door closed again by the next holder (this one, just now), and waited there while
        its slot said COMMITTED. Nothing opened it again until the lock was let go, and a hot lease (json/lease.py)
        whose other writers' records all came through the slots never saw a wait sign: one of four writer
        processes made 1 save in a 2 s window while the others made thousands (benchmarks/README.md). A marked
        slot's writer waits at the door before the one its header names (:meth:`mark` flips the generation); that
        door stays closed only until the writer's next offer, which waits at the other one. A door opened too
        early is harmless: the writer reads its slot and asks for the lock when it is not decided."""
        heads = os.pread(self._fd, COUNT * _STRIDE, 0)
        for index in range(len(heads) // _STRIDE):
            if heads[index * _STRIDE] in (COMMITTED, FAILED):
                door = _DOOR + 2 * index + 1 - (heads[index * _STRIDE + 1] & 1)
                fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, door))  # type: ignore[arg-type]

    def _others_own(self) -> bool:
        """Whether a store other than this one (another descriptor: our own slot's lock does not count) owns a
        slot; True when that cannot be asked."""
        try:
            found = fcntl.fcntl(self._fd, _OFD_GETLK, _flock_struct(fcntl.F_WRLCK, _OWNER, COUNT))  # type: ignore[arg-type]
        except OSError:
            return True
        kind: int = struct.unpack_from("h", found)[0]
        return kind != fcntl.F_UNLCK

    def _try_door(self, door: int) -> bool:
        try:
            fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_WRLCK, door))  # type: ignore[arg-type]
        except OSError:
            return False
        return True

    def open_doors(self) -> None:
        """Just after letting go of the store lock: open every door. Claims left unmarked (:meth:`mark`) are
        forgotten: from now on only a holder's :meth:`settle_orphans` may settle them (from the journal), since
        a slot may change once the lock is free (settled, taken back, offered again)."""
        if self.unmarked:
            self.unmarked.clear()
        if self.doors_closed and self._fd >= 0:
            self.doors_closed = False
            try:
                fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, _DOOR, 2 * COUNT))  # type: ignore[arg-type]
            except OSError:  # pragma: no cover - an unlock is not refused; closing the descriptor opens them too
                pass

    def wait_door(self, gen: int) -> None:
        """In a thread, after :meth:`offer` returned ``gen``: block until our door ``gen`` is open (the holder
        marked our slot, let go of the store lock, or died; or nobody held the lock). Then read :meth:`peek`."""
        if self._wait_fd < 0:
            self._wait_fd = os.open(self.path, os.O_RDWR)
        door = _DOOR + 2 * self.index + gen
        fcntl.fcntl(self._wait_fd, _OFD_SETLKW, _flock_struct(fcntl.F_RDLCK, door))  # type: ignore[arg-type]
        fcntl.fcntl(self._wait_fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, door))  # type: ignore[arg-type]

    def peek(self) -> Offer:
        """Our slot as it is now (no change; read under its mutex: the holder's header write is not atomic). When
        the mutex stays taken (PEEK_WAIT), reported CLAIMED: not known here, the caller asks the store lock."""
        if not self._lock_within(self.index, PEEK_WAIT):
            return Offer(CLAIMED, 0, 0, 0, 0)
        try:
            state, gen, length, ino, at = self._read_head(self.index)
        finally:
            self._unlock(self.index)
        return Offer(state, gen, ino, at, length)

    # -- the owner's side ------------------------------------------------------------------------------------------
    def offer(self, record: bytes, generation: int) -> int:
        """Before waiting for the store lock: offer ``record`` (one journal line) to its holder; returns the
        generation (the door to wait at, :meth:`wait_door`). -1: not offered (too large, no slot): the caller
        commits it itself as before. ``generation``: of the journal this store read last (at most that of the
        committed end read here: the since byte it locks keeps that generation on, :meth:`_waiting`)."""
        ops = inner(record)
        if ops is None or len(ops) > MAX_RECORD or not self._open():
            return -1
        index = self.index
        since = self._committed() if self._committed is not None else None  # before: a holder writes it past this
        if not self._try_lock(index):  # a holder settling our last offer this moment: commit it ourselves
            return -1
        try:
            state, gen = self._read_head(index)[:2]
            if state == CLAIMED:  # an earlier offer given up unsettled (a lock timeout): its holder may still mark
                return -1  # it, which must never be taken for this record's fate
            os.pwrite(self._fd, ops, (1 + index) * _ROOM)
            self.offered = (ops, since)
            self._waiting(generation)  # before the header: what the journal search needs is kept from now on
            try:
                self._write_head(index, OFFERED, len(ops), 0, 0, gen)
            except OSError:
                self._waiting(-1)
                raise
            self.standing = True
        finally:
            self._unlock(index)
        return gen

    def _waiting(self, generation: int) -> None:
        """Read-lock the since byte of journal ``generation`` (-1: let go of ours). Why: it survives what a
        truncation of ``storage.slots`` wipes (the header); while it is locked no compaction removes that
        generation or a later one (:meth:`kept_needed`), so :meth:`found_in_journal` can read them all."""
        if self._since >= 0:
            fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, _SINCE + self._since))  # type: ignore[arg-type]
            self._since = -1
        if generation >= 0:
            fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_RDLCK, _SINCE + generation))  # type: ignore[arg-type]
            self._since = generation

    def kept_needed(self, generation: int) -> bool:
        """In a compaction (json/journal.py ``keep_previous``, under the store lock): whether a writer waiting for
        its offer's fate may need journal ``generation`` (it locked the since byte of that one or an earlier one).
        One ``F_OFD_GETLK``; True when that cannot be asked (a kept file costs only disk until the next one)."""
        if self._fd < 0:
            return False
        try:
            found = fcntl.fcntl(self._fd, _OFD_GETLK,  # type: ignore[arg-type]
                                _flock_struct(fcntl.F_WRLCK, _SINCE, generation + 1))
        except OSError:
            return True
        kind: int = struct.unpack_from("h", found)[0]
        return kind != fcntl.F_UNLCK

    def found_in_journal(self, journal_path: str, now: tuple[int, int] | None) -> bool:
        """Holding the store lock, when :meth:`take_back` found our slot neither OFFERED, FAILED nor COMMITTED
        (``storage.slots`` truncated or overwritten while we waited; the README warns against it): whether the
        journal proves our last offer committed, i.e. a record published since the offer (between the committed
        end read just before it and ``now``) holds its operations, in order. Then the caller must not commit it
        again: a second copy would undo a later write of its keys. Were they another writer's identical
        operations, acknowledging ours as committed there is still true to the order (ours was in flight
        meanwhile, and the same puts and deletes give the same state).

        Reads up to 64 MB: json/holding.py calls it in a worker thread (it touches nothing of this object but
        :attr:`offered`). Compactions since the offer are looked through: every generation they started is kept
        while we wait (:meth:`kept_needed`; json/offer_search.py). Not provable (False: the caller commits it
        itself, as before): the committed end unknown at the offer or now (not published this boot), more than
        64 MB committed since, or a generation in between gone (removed by hand)."""
        if self.offered is None:
            return False
        ops, since = self.offered
        return offer_search.found(journal_path, ops, since, now)

    def take_back(self) -> Offer:
        """Holding the store lock, after :meth:`settle_orphans`: what became of our offer; the slot is EMPTY
        after. COMMITTED: the record is in the journal before the committed end (catch up to apply it); anything
        else: it is not, commit it yourself.

        Never raises. A slot that cannot be emptied (``storage.slots`` refusing the ``pwrite``) is given up
        (:meth:`_abandon`): left OFFERED and owned, a later holder would claim it and commit, after the caller
        committed it itself (or reported it failed), a record its writer no longer waits for, undoing later
        writes of its keys. A state that cannot be read at all is returned as -1 (the caller asks the journal,
        :meth:`found_in_journal`)."""
        index = self.index
        if index < 0:
            return Offer(-1, 0, 0, 0, 0)
        ours = [(claim, state) for claim, state in self.unmarked if claim.slot == index]
        if ours:  # settle_orphans derived its verdict but could not write it: decided here
            self.unmarked = [(claim, state) for claim, state in self.unmarked if claim.slot != index]
        head: tuple[int, int, int, int, int] = (-1, 0, 0, 0, 0)
        try:
            self._lock(index)
            try:
                head = self._read_head(index)
                self._write_head(index, EMPTY, 0, 0, 0, head[1])
                self._waiting(-1)
            finally:
                self._unlock(index)
        except OSError as exc:
            self._abandon(exc)
        self.standing = False
        state, gen, length, ino, at = head
        for claim, verdict in ours:
            if state == CLAIMED and (ino, at, length) == (claim.ino, claim.at, len(claim.inner)):
                state = verdict
        return Offer(state, gen, ino, at, length)

    def withdraw(self) -> Offer:
        """A cancelled owner, not holding the store lock: OFFERED becomes EMPTY (returned as OFFERED: nothing of it
        was written); CLAIMED stays (a holder is writing it: the caller settles it under the store lock with
        :meth:`take_back`); COMMITTED / FAILED are taken back as :meth:`take_back` does. A slot that cannot be
        emptied is given up, as in :meth:`take_back` (the holders' claim looks at the owner under the mutex)."""
        index = self.index
        if index < 0:
            return Offer(-1, 0, 0, 0, 0)
        if not self._try_lock(index):  # a holder is claiming or marking it: settled under the store lock
            return Offer(CLAIMED, 0, 0, 0, 0)
        try:
            state, gen, length, ino, at = self._read_head(index)
            if state != CLAIMED:
                try:
                    self._write_head(index, EMPTY, 0, 0, 0, gen)
                    self._waiting(-1)
                    self.standing = False
                except OSError as exc:
                    self._abandon(exc)  # under the mutex: no claim of it is under way
        finally:
            if self._fd >= 0:
                self._unlock(index)
        return Offer(state, gen, ino, at, length)

    def forget_offer(self) -> None:
        """A writer that gave up waiting for its claimed offer's fate (a lock timeout: it was told the write may
        still be committed) no longer asks the journal about it: its waiting byte is let go, so a wiped header does
        not keep journal generations (:meth:`kept_needed`). The slot stays CLAIMED for its holder to mark."""
        if self.standing:
            self.standing = False
            try:
                self._waiting(-1)
            except OSError:  # pragma: no cover - an unlock is not refused
                pass

    def abandon_offer(self, exc: OSError) -> None:
        """Holding the store lock, when taking it failed before our standing offer was taken back (the slots'
        headers unreadable): give the slot up (:meth:`_abandon`): the caller reports the write failed, and no
        later holder may claim and commit it."""
        if self.standing and self.index >= 0:
            self._abandon(exc)

    def _abandon(self, exc: OSError) -> None:
        """Give our slot up without emptying it (its header could not be written): its owner byte's lock is let
        go, so no holder claims what it says (:meth:`_claim_one` asks for the owner under the slot's mutex). This
        store offers nothing until it takes a slot again (:meth:`settle_orphans` tries at each acquisition of the
        store lock; taking one writes its header first)."""
        index, self.index = self.index, -1
        self.standing = False
        log.warning("%s: this store's slot %d could not be emptied (%s): given up, its writes are committed "
                    "without offers until a slot can be taken again", self.path, index, exc.strerror or exc)
        try:
            self._waiting(-1)
            fcntl.fcntl(self._fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK, _OWNER + index))  # type: ignore[arg-type]
        except OSError:  # pragma: no cover - an unlock is not refused; if it were, closing the file is the way
            os.close(self._fd)
            self._fd = -1
            self.available = False

    # -- the holder's side -----------------------------------------------------------------------------------------
    def claim(self, ino: int, at: int, room: int) -> list[Claim]:
        """Holding the store lock, before writing a record whose operations' end lands at ``at`` of journal
        ``ino`` (the record's closing bracket not counted): claim every live offered slot, up to ``room`` bytes of
        operations in all. Each slot is CLAIMED with where its operations will lie before this returns.

        Never raises: the slots are an optimization of the holder's commit, which a failing ``storage.slots``
        must not fail. A slot whose claim fails is left out (still OFFERED: its writer commits it itself once the
        lock is free; or CLAIMED if only the mutex's unlock failed: its operations are then not where the header
        says, and :meth:`settle_orphans` finds it FAILED)."""
        if not self.doors_closed:  # no other store owned a slot when we took the lock (see close_doors)
            return []
        try:
            heads = os.pread(self._fd, COUNT * _STRIDE, 0)
        except OSError:
            return []
        if OFFERED not in heads[::_STRIDE]:  # the usual case with others: nobody offers (one pread, about 1 us)
            return []
        claims: list[Claim] = []
        for index in range(min(COUNT, len(heads) // _STRIDE)):
            if index == self.index or heads[index * _STRIDE] != OFFERED:
                continue
            try:
                ops = self._claim_one(index, ino, at + 1, room)  # after the comma
            except OSError:
                continue
            if ops is None:
                continue
            claims.append(Claim(index, ops, at + 1, ino))
            at += 1 + len(ops)
            room -= len(ops)
        return claims

    def _claim_one(self, index: int, ino: int, place: int, room: int) -> bytes | None:
        """:meth:`claim` of slot ``index`` (its operations at ``place``): its operations, or None (not claimed)."""
        if not self._try_lock(index):
            return None  # its owner is busy with it (withdrawing): not claimed, it waits for the lock
        try:
            if not self._owned(index):  # under the mutex: an owner gives its slot up under it (_abandon)
                return None  # its writer died: nobody would acknowledge it
            state, gen, length, _ino, _at = self._read_head(index)
            if state != OFFERED or length > room:
                return None
            ops = os.pread(self._fd, length, (1 + index) * _ROOM)
            if len(ops) != length:
                return None
            self._write_head(index, CLAIMED, length, ino, place, gen)
        finally:
            self._unlock(index)
        return ops

    def mark(self, claims: list[Claim], state: int) -> None:
        """Holding the store lock: the claimed records are COMMITTED (fsynced and published) or FAILED; each
        writer's door opens (the other door of its slot closes first, if it is free: its next offer waits there),
        once the slot's mutex is let go (the writer reads its slot under it at once: :meth:`peek`).

        Never raises (issue 15: a COMMITTED mark comes after the record is published, and a caller that took its
        failure for a failed append rewrote the files from memory without a record other processes had read). A
        claim whose verdict cannot be written stays CLAIMED and is kept in :attr:`unmarked`: the store lets go of
        the lock at the end of that commit (json/holding.py), its writer's door then opens, and whoever takes
        the lock next settles it from the journal's bytes (:meth:`settle_orphans`: committed end covers it ->
        COMMITTED, else FAILED, its writer then commits it itself); nothing may replace the journal meanwhile
        (:meth:`settle_unmarked`)."""
        for claim in claims:
            try:
                self._mark_one(claim, state)
            except OSError as exc:
                self.unmarked.append((claim, state))
                log.warning("%s: marking slot %d %s failed (%s): left claimed, settled from the journal by the "
                            "next holder", self.path, claim.slot, "committed" if state == COMMITTED else "failed",
                            exc.strerror or exc)

    def _mark_one(self, claim: Claim, state: int) -> None:
        """:meth:`mark` of one claim: only while its slot still says CLAIMED where :meth:`claim` put it, or says
        nothing at all (``storage.slots`` truncated or zeroed meanwhile: its writer still waits for the verdict;
        both its doors open, since which one it waits at is lost). A slot found otherwise is left alone: not ours
        to change (a new offer there must never read as committed); its writer asks the journal (json/holding.py
        ``_offer_committed``)."""
        index = claim.slot
        self._lock(index)
        written = wiped = False
        try:
            now, gen, length, ino, at = self._read_head(index)
            wiped = (now, gen, length, ino, at) == (EMPTY, 0, 0, 0, 0)
            if not wiped and (now != CLAIMED or (length, ino, at) != (len(claim.inner), claim.ino, claim.at)):
                return
            if self.doors_closed and not wiped:
                self._try_door(_DOOR + 2 * index + 1 - gen)  # left open if not: that offer asks the lock
            self._write_head(index, state, len(claim.inner), claim.ino, claim.at, 1 - gen)
            written = True
        finally:
            try:
                self._unlock(index)
            except OSError:
                if not written:
                    raise
                # the verdict is written: its writer reads it once the mutex is free (closing our descriptor)
        if self.doors_closed:
            try:
                fcntl.fcntl(self._fd, _OFD_SETLK,  # type: ignore[arg-type]
                            _flock_struct(fcntl.F_UNLCK, _DOOR + 2 * index + (0 if wiped else gen), 2 if wiped else 1))
            except OSError:
                pass  # the door opens when we let go of the store lock

    def settle_unmarked(self) -> None:
        """Holding the store lock, before anything replaces the journal (a compaction, json/store.py): write the
        verdicts :meth:`mark` could not. Why: a claim left CLAIMED is settled from the journal's bytes, and once
        the journal is another file that says FAILED, so a record committed in the old one would be committed a
        second time by its writer (after a later write of its key: that write undone). Raises OSError when a
        COMMITTED verdict still cannot be written (the caller must not replace the journal then); a FAILED one
        that cannot is dropped (any later settle says FAILED too: its bytes were never published)."""
        pending, self.unmarked = self.unmarked, []
        error: OSError | None = None
        for claim, state in pending:
            try:
                self._mark_one(claim, state)
            except OSError as exc:
                if state == COMMITTED:
                    self.unmarked.append((claim, state))
                    error = exc
        if error is not None:
            raise error

    def settle_orphans(self, journal_path: str, committed: Callable[[], tuple[int, int] | None]) -> None:
        """Holding the store lock, before anything else: a slot still CLAIMED was claimed by a holder that died,
        or whose mark failed (:meth:`mark`; it let go at the end of that commit). COMMITTED when ``committed``
        (inode, end) covers it on its inode and the bytes there are its record, FAILED otherwise (then it was never
        published: the catch-up cuts it, and its writer commits it itself).

        A verdict that cannot be written (``storage.slots`` refusing a ``pwrite`` or its mutex) does not fail the
        acquisition: the verdict is derived from the journal, not from the file, and is kept in :attr:`unmarked`
        as :meth:`mark` keeps its own (reported once, :meth:`_report`). Why: every write of the store used to fail
        for as long as the file kept failing, though only replacing the journal depends on that verdict (a
        COMMITTED one must be written first, :meth:`settle_unmarked`, or its writer, settled FAILED against the
        new journal, commits it again); appends leave the bytes the verdict was read from as they are. The slot
        stays CLAIMED: its writer, whose door opens when we let go, asks the store lock and settles it itself
        (from the same journal: the same verdict), and every holder tries again at its acquisition, so it heals
        as soon as the file works. Raises OSError (a clear StorageIOError in the caller) only when the headers
        cannot be read at all: then whether anything waits is unknown."""
        if not self._file(create=True):  # at open (json/store.py): every writable store has the file from then on
            return
        heads = os.pread(self._fd, COUNT * _STRIDE, 0)
        end: tuple[int, int] | None = None
        for index in range(min(COUNT, len(heads) // _STRIDE)):
            if heads[index * _STRIDE] != CLAIMED:
                continue
            if end is None:
                end = committed() or (0, 0)
            claim: Claim | None = None
            verdict = FAILED
            try:
                self._lock(index)
                try:
                    state, gen, length, ino, at = self._read_head(index)
                    if state != CLAIMED:
                        continue
                    ops = os.pread(self._fd, length, (1 + index) * _ROOM)
                    claim = Claim(index, ops, at, ino)
                    if end[0] == ino and end[1] >= at + length and len(ops) == length:
                        if offer_search.journal_bytes(journal_path, ino, at, length) == ops:
                            verdict = COMMITTED
                    if self.doors_closed:
                        self._try_door(_DOOR + 2 * index + 1 - gen)  # as mark does: its next offer waits there
                    self._write_head(index, verdict, length, ino, at, 1 - gen)
                finally:
                    self._unlock(index)
            except OSError as exc:
                if claim is None:
                    self._report(index, None, verdict, exc)  # not even read: the next holder tries again
                    continue
                if self._read_verdict(index) != verdict:  # an unlock that failed after the verdict is harmless
                    self.unmarked.append((claim, verdict))
                    self._report(index, claim, verdict, exc)
                    continue
            if self.doors_closed:
                # Its writer may still wait at door ``gen``: the dead holder's locks went with it, but a writer not
                # scheduled since found it closed again by our close_doors (as :meth:`_reopen_decided` explains),
                # and would wait there, its slot decided, for as long as our lease stays hot.
                try:
                    fcntl.fcntl(self._fd, _OFD_SETLK,  # type: ignore[arg-type]
                                _flock_struct(fcntl.F_UNLCK, _DOOR + 2 * index + gen))
                except OSError:
                    pass  # the verdict is written: the door opens when we let go of the store lock, as in mark
        if self.index < 0:
            # Our slot, taken under the store lock (at open): a holder that finds no other owner when it takes the
            # lock neither closes the doors nor looks for offers (close_doors), so a slot taken later, outside the
            # lock, would see its first offers left to it to commit.
            self._open()

    def _read_verdict(self, index: int) -> int:
        """Slot ``index``'s state now (-1 when it cannot be read): whether a verdict whose unlock failed landed."""
        try:
            return self._read_head(index)[0]
        except OSError:
            return -1

    def _report(self, index: int, claim: Claim | None, verdict: int, exc: OSError) -> None:
        """Log a verdict :meth:`settle_orphans` could not write, once per claim (every acquisition retries it)."""
        key = (index, -1, -1) if claim is None else (index, claim.ino, claim.at)
        if key in self._reported:
            return
        self._reported.add(key)
        log.warning("%s: settling slot %d (claimed by a holder that died or could not mark it) failed (%s): this "
                    "process %s, and tries again at each acquisition of the store lock; no compaction replaces "
                    "the journal before it is written", self.path, index, exc.strerror or exc,
                    "could not read it" if claim is None else
                    f"knows it {'committed' if verdict == COMMITTED else 'failed'} from the journal")

    def close(self) -> None:
        """Give the slot up (closing the descriptor drops every OFD lock of it)."""
        if self._fd >= 0:
            try:
                if self.index >= 0:
                    self._write_head(self.index, EMPTY, 0, 0, 0)
            except OSError:
                pass
            os.close(self._fd)
        if self._wait_fd >= 0:
            os.close(self._wait_fd)
        self._fd = self._wait_fd = -1
        self.doors_closed = False
        self.available = False  # closed for good: a store is not reopened
        self.index = -1
