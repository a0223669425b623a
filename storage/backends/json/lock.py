"""The cross-process lock of the JSON backend, and the journal's published *committed end*.

The lock
    On POSIX we keep one descriptor of ``storage.lock`` open for the store's lifetime and ``flock`` it per commit (a
    few microseconds; filelock re-opens and re-checks the file on every acquire). Two things can go wrong with a
    sidecar file, and both are handled here:

    * A person deletes ``storage.lock`` ("remove the stale lock") while processes have the store open. The running
      process would keep locking the unlinked inode while a new process locks a new file: two writers at once
      (3000 acknowledged increments ended at 2230). So after every ``flock`` the lock checks that the path still
      names the file it locked (device and inode) and, if not, reopens the path and tries again.
    * The deletion can happen while a process *holds* the lock: a newcomer could then take the new file's lock in
      the middle of that commit. So where the platform allows it, the data *folder* itself is ``flock``ed too
      (after the sidecar). A folder cannot be swapped out from under an open store, so two processes that can both
      lock it exclude each other whatever happens to ``storage.lock``. Where folders cannot be locked (NFS, some
      FUSE file systems, Windows), the sidecar alone is used, as before.

    ``flock`` locks belong to the open file description: two stores on one folder in one process exclude each other
    as two processes do. Windows uses filelock on the sidecar (its portable semantics; no folder lock there).

The committed end
    Readers in other processes follow the journal without the lock. They must never apply a record that is not
    durable yet: its fsync may still fail, and the writer then cuts it back (a reader that applied it would serve a
    write reported as failed, then misread the writer's next record as a torn tail). So after each fsync the writer
    *publishes* ``(journal inode, committed end)`` in the first bytes of ``storage.lock`` and readers read no
    further than that. The state is read with ``pread`` (never ``mmap``: truncating a mapped file kills every
    process that maps it with SIGBUS) and carries a crc, so a torn, truncated or zeroed lock file only reads as
    "unknown", never as a wrong end. It also carries the boot id: what a previous boot published may not have
    reached the disk, so it is never used to decide which journal bytes were committed.

Who waits
    A writer of another process that waits for the lock (:meth:`SidecarLock.wait_free`, or an open polling in
    :meth:`SidecarLock.acquire`) says so with a *shared*
    open-file-description lock on one byte of ``storage.lock`` (Linux ``F_OFD_SETLK``, the byte after the one
    json/presence.py uses), held while it waits and dropped once it has the lock (or by the kernel, if it dies).
    The holder asks with one ``F_OFD_GETLK`` (:meth:`SidecarLock.waited_for`, about 0.5 us): a store that keeps the
    lock across back-to-back commits (json/lease.py) gives it up when someone waits. Byte-range locks and ``flock``
    do not interact on Linux; the sign is only given where the folder can be locked too (so not where ``flock`` is
    emulated with byte-range locks, as on NFS), and where it cannot be given no lock is ever kept between commits.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

try:  # pragma: no cover - platform switch
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import filelock

__all__ = ["SidecarLock", "LockBusy", "Committed", "boot_id"]

_MAGIC = b"SLK2"
_STATE = struct.Struct("<4sIQQQ")  # magic, crc32 of the rest, boot id, journal inode, committed end
_HEAD, _BODY = struct.Struct("<4sI"), struct.Struct("<QQQ")  # its two parts, packed apart by publish()
#: errnos that say "this file system cannot flock a directory": the sidecar alone is used there.
_NO_DIR_LOCK = frozenset({errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EISDIR})
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None) if fcntl is not None else None
_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None) if fcntl is not None else None
#: The byte whose shared locks say "a writer waits for the lock" (json/presence.py uses the one before it).
_WANT_BYTE = (1 << 40) + 1


def _want_struct(kind: int) -> bytes:
    """A ``struct flock`` for the wait sign's byte (l_type, l_whence, l_start, l_len, l_pid=0 as OFD locks need)."""
    return struct.pack("hhqqi", kind, os.SEEK_SET, _WANT_BYTE, 1, 0)


if fcntl is not None and _OFD_SETLK is not None:  # pragma: no branch - platform switch
    _WANT = _want_struct(fcntl.F_RDLCK)
    _UNWANT = _want_struct(fcntl.F_UNLCK)
    _ASK = _want_struct(fcntl.F_WRLCK)


class LockBusy(Exception):
    """Raised by :meth:`SidecarLock.acquire` when the lock was not free within the timeout."""


class Committed(NamedTuple):
    """What the last commit published: the journal it went to (inode) and where its committed records end."""

    ino: int
    end: int


def boot_id() -> int:
    """A number that changes with every boot of the machine (0 where the platform does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return zlib.crc32(f.read().strip()) or 1
    except OSError:
        return 0


class SidecarLock:
    """An exclusive, non-reentrant inter-process lock on ``path`` (and its folder), plus the published state.

    Not thread-safe by itself: the store serializes its use with an ``asyncio.Lock``; a blocking :meth:`acquire`
    may run in a worker thread while the event loop waits for it.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self._path = os.fspath(path)  # stat()ed at every acquire: no Path-to-str conversion each time
        self.read_only = read_only
        self._fd = -1
        self._dir_fd = -1
        self._dir_lockable = True
        self._held = False
        self._ident: tuple[int, int] | None = None  # (device, inode) of _fd: fixed for the descriptor's life
        #: What this process last published into the file it holds open (None once that file was replaced):
        #: while the journal has not moved since, re-reading the state would only find the same values.
        self.published: tuple[int, int] | None = None
        self._boot = boot_id()
        self._fallback = filelock.FileLock(str(path), thread_local=False) if fcntl is None else None
        #: called just after the lock is taken, and just before it is let go (json/slots.py: the doors of the
        #: writers that offered their records to the holder); they must not raise
        self.on_taken: Callable[[], None] | None = None
        self.on_release: Callable[[], None] | None = None

    @property
    def held(self) -> bool:
        return self._held

    def _descriptor(self) -> int:
        if self._fd < 0:
            if self.read_only:
                self._fd = os.open(self.path, os.O_RDONLY)
            else:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                mine = os.fstat(self._fd)
            except BaseException:
                os.close(self._fd)
                self._fd = -1
                raise
            self._ident = (mine.st_dev, mine.st_ino)
        return self._fd

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._ident = None
            self.published = None

    def _same_file(self) -> bool:
        """Does the path still name the file we locked? (Someone may have deleted or replaced it.)"""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def _lock_folder(self, blocking: bool) -> bool:
        """The folder lock (see the module doc); True when taken or when this file system cannot lock folders."""
        if not self._dir_lockable:
            return True
        if self._dir_fd < 0:
            self._dir_fd = os.open(self.path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_DIR_LOCK:
                raise
            self._dir_lockable = False
            os.close(self._dir_fd)
            self._dir_fd = -1
        return True

    def try_acquire(self) -> bool:
        """Take the lock if it is free right now; never blocks."""
        if self._fallback is not None:  # pragma: no cover - Windows
            try:
                self._fallback.acquire(timeout=0)
            except filelock.Timeout:
                return False
            self._held = True
            return True
        for _attempt in range(100):
            fd = self._descriptor()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if self._same_file():
                break
            fcntl.flock(fd, fcntl.LOCK_UN)  # we locked a file that is no longer storage.lock: take the new one
            self._reopen()
        else:
            raise OSError(f"{self.path} keeps being replaced while we lock it")
        try:
            if not self._lock_folder(blocking=False):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                return False
        except BaseException:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            raise
        self._held = True
        if self.on_taken is not None:
            self.on_taken()
        return True

    @property
    def can_wait(self) -> bool:
        """Whether :meth:`wait_free` / :meth:`adopt` work here (POSIX ``flock``; not the Windows fallback)."""
        return fcntl is not None and self._fallback is None and not self.read_only

    def wait_free(self, abandoned: threading.Event, behind: float = 0.0) -> int:
        """In a dedicated thread: block in ``flock`` on a fresh descriptor of the sidecar until it is ours.

        Why: a poll with a growing sleep (:meth:`acquire`) lost the lock, again and again, to a process saving in
        a loop (it locks again within 0.1 ms of letting go, the poller looked every 5 ms); a waiter blocked in the
        kernel is woken when the holder lets go. A blocked ``flock`` cannot time out, so the caller gives up by
        setting ``abandoned`` and leaving the thread: if the lock comes later, the thread lets go at once (closing
        the descriptor releases it). Returns the descriptor, holding the sidecar's lock, for :meth:`adopt` on
        the caller's thread (the descriptor in use is never swapped from here), or -1 when abandoned.

        ``behind`` > 0: we just let go because others waited (json/lease.py), so do not take the lock back before
        one of them could: ``flock`` wakes the waiters when the lock is let go but does not hand it over, and a
        waiter woken on a loaded machine could take over a millisecond to run, while our own next ``flock`` came
        first (a writer here waited two of the holder's leases instead of one, about every third time). For up
        to ``behind`` seconds, while the lock is free and another writer still gives the wait sign, it is left
        to them (checked after 0.1 ms, then less and less often, up to every 1 ms); once another holds it, we
        wait in the kernel's queue behind it. A writer gives no wait sign while it steps back (only once it blocks
        in ``flock``): when every waiter was stepping back, each saw the others' signs and left the free lock to
        them until its own ``behind`` ran out (4 writer processes with a 1 ms fsync: 18 gaps of 2-162 ms, 0.48 s
        of a 2 s window with the lock free; benchmarks/README.md). The holder cannot miss such a writer: it polls
        only while the lock is free, and waits (with the sign) as soon as anyone holds it.
        """
        while not abandoned.is_set():
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self.can_sign:
                    if behind > 0:  # before the sign: a writer that steps back leaves the lock to no other such
                        _leave_to_others(fd, time.monotonic() + behind, abandoned)
                    _sign(fd, _WANT)  # "a writer waits" (see the module doc), dropped by adopt() or the close
                fcntl.flock(fd, fcntl.LOCK_EX)
                mine = os.fstat(fd)
                try:
                    st: os.stat_result | None = os.stat(self._path)
                except FileNotFoundError:
                    st = None
            except BaseException:
                os.close(fd)
                raise
            if st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and not abandoned.is_set():
                return fd
            os.close(fd)  # abandoned, or the file was deleted or replaced while we waited: wait on the new one
        return -1

    def adopt(self, fd: int) -> bool:
        """Make ``fd`` (from :meth:`wait_free`, holding the sidecar's lock) this lock's descriptor and take the
        folder lock; False, holding nothing, when another holds the folder (its sidecar was deleted)."""
        old, self._fd = self._fd, fd
        try:
            if self.can_sign:
                _sign(fd, _UNWANT)  # we no longer wait (a holder that kept a wait sign would look waited for)
            mine = os.fstat(fd)
            self._ident = (mine.st_dev, mine.st_ino)
            self.published = None  # another description of the file: read it again once
            if old >= 0:
                os.close(old)  # it holds no lock: taking it with that one just failed
            if not self._lock_folder(blocking=False):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise
        self._held = True
        if self.on_taken is not None:
            self.on_taken()
        return True

    @property
    def can_sign(self) -> bool:
        """Whether waiting writers give the wait sign here and a holder can see it (see the module doc): Linux OFD
        locks, and the folder lockable (so ``flock`` is the kernel's own, not emulated with byte-range locks)."""
        return _OFD_GETLK is not None and self._fallback is None and self._dir_lockable and not self.read_only

    def waited_for(self) -> bool:
        """Whether a writer (of this or another process, through another descriptor) waits for the lock. Call
        holding it. Where nobody can tell, or the question fails: True (the caller then lets go, as it would
        without this)."""
        if _OFD_GETLK is None or not self.can_sign or self._fd < 0:
            return True
        try:
            found = fcntl.fcntl(self._fd, _OFD_GETLK, _ASK)
        except OSError:
            return True
        kind: int = struct.unpack_from("h", found)[0]
        return kind != fcntl.F_UNLCK

    def acquire(self, timeout: float, cancel: threading.Event | None = None) -> None:
        """Wait up to ``timeout`` seconds for the lock (polling with a short, growing sleep, giving the wait sign
        meanwhile), or raise LockBusy.

        ``cancel`` lets the event loop abandon a wait running in a worker thread: the thread stops within one poll.
        """
        deadline = time.monotonic() + timeout
        pause = 0.0001
        signed = -1  # the descriptor that gives the wait sign while we poll (see below)
        try:
            while not self.try_acquire():
                if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                    raise LockBusy(str(self.path))
                if signed != self._fd and self._fd >= 0 and self.can_sign:
                    # Say we wait, as wait_free() does: a store saving in a loop keeps the lock leased for as
                    # long as nobody seems to wait (json/lease.py), and an open polling here would wait forever.
                    _sign(self._fd, _WANT)
                    signed = self._fd
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
        finally:
            if signed >= 0 and signed == self._fd:
                _sign(signed, _UNWANT)  # (a descriptor closed meanwhile took its sign with it)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fallback is not None:  # pragma: no cover - Windows
            self._fallback.release()
            return
        try:
            if self._dir_fd >= 0:
                fcntl.flock(self._dir_fd, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            if self.on_release is not None:  # after: nothing may run between the flag and the unlocks
                self.on_release()

    def hand_over(self) -> None:
        """:meth:`release` when another writer waits for the lock, then give this thread's CPU up once
        (``sched_yield``; nothing where there is none).

        Why (issue 15, 4 writer processes on 2 cores): the unlock only wakes the waiter, whose thread and then
        event loop must still be scheduled, while the thread that let go goes on running (a deferred commit's
        apply of hundreds of records, json/store.py) and the scheduler lets a woken task preempt a running one
        only after about a millisecond: the lock sat free for a median 1.2-1.9 ms after each deferred commit
        (0.35-0.43 s of every 2 s window), against 0.24-0.26 ms with the yield (benchmarks/README.md)."""
        self.release()
        _yield_cpu()

    # -- the published committed end -------------------------------------------------------------------------------
    def publish(self, ino: int, end: int) -> None:
        """Tell readers that journal ``ino`` is committed up to byte ``end``. Call holding the lock, after fsync."""
        body = _BODY.pack(self._boot, ino, end)
        self.published = None  # unknown until the write is done
        os.pwrite(self._fd if self._fd >= 0 else self._descriptor(), _HEAD.pack(_MAGIC, zlib.crc32(body)) + body, 0)
        self.published = (ino, end)

    def committed(self, *, trusted_only: bool = False) -> Committed | None:
        """The last published state, or None when unknown (never published, damaged, truncated, replaced).

        ``trusted_only``: also None when it was published before this boot (or the boot is unknown): such a
        state may be older than what reached the disk, so it cannot say which bytes were never committed.
        """
        try:
            fd = self._descriptor()
            # Deleted or replaced: what we would read is someone's old state. Not while we hold the lock: taking it
            # checked the path names our file, and nobody else can publish meanwhile (nor may the descriptor that
            # holds the lock be closed: json/lease.py may let go of it from its keeper thread).
            if not self._held and not self._same_file():
                self._reopen()
                fd = self._descriptor()
            raw = os.pread(fd, _STATE.size, 0)
        except FileNotFoundError:
            return None
        if len(raw) != _STATE.size:
            return None
        magic, crc, boot, ino, end = _STATE.unpack(raw)
        if magic != _MAGIC or crc != zlib.crc32(raw[8:]):
            return None
        if trusted_only and (boot != self._boot or not boot):
            return None
        return Committed(ino, end)

    def close(self) -> None:
        self.release()
        for name in ("_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._ident = None
        self.published = None


#: ``os.sched_yield`` where the platform has it (see SidecarLock.hand_over).
_yield_cpu: Callable[[], None] = getattr(os, "sched_yield", lambda: None)


def _others_wait(fd: int) -> bool:
    """Whether a writer other than ``fd``'s gives the wait sign (``fd``'s own sign does not count)."""
    try:
        found = fcntl.fcntl(fd, _OFD_GETLK, _ASK)  # type: ignore[arg-type]
    except OSError:
        return False
    kind: int = struct.unpack_from("h", found)[0]
    return kind != fcntl.F_UNLCK


def _leave_to_others(fd: int, deadline: float, abandoned: threading.Event) -> None:
    """:meth:`SidecarLock.wait_free`'s ``behind``: return once another writer holds the lock, nobody else waits
    for it, or ``deadline`` (monotonic) has passed."""
    pause = 0.0001  # growing to 1 ms: each look takes the lock for a moment, and a woken waiter that finds it
    while time.monotonic() < deadline and not abandoned.is_set():  # taken then goes back to sleep
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another writer has it: wait behind it
        waiting = _others_wait(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        if not waiting:
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.001)


def _sign(fd: int, request: bytes) -> None:
    """Give or drop the wait sign on ``fd`` (best effort: without it a holder only lets go later)."""
    try:
        fcntl.fcntl(fd, _OFD_SETLK, request)  # type: ignore[arg-type]
    except OSError:
        pass
