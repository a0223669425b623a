"""Which stores have a JSON folder open for writing: a shared byte-range lock on ``storage.lock``, held while open.

Why: closing a store folds the journal into the snapshot files, which at 100k members rewrites about 60 MB under
the store lock. With several processes on one folder, every other process's next write waited for all of it (4
writer processes, one closing: the others' last saves took 1-4 s). Folding is only needed once the last writer is
gone, so a close leaves it to the stores still open, and the last one to close does it, which still leaves plain
JSON files once every process has closed.

How: every writable store holds a *shared* open-file-description lock (Linux ``F_OFD_SETLK``: owned by the
descriptor, not the process, so two stores in one process count as two, and closing an unrelated descriptor of
the file never drops it) on one byte far past the lock file's state; the kernel drops it when the process dies.
At close a store lets go of its share and asks for an *exclusive* lock on that byte without waiting: granted means
nobody else has the folder open for writing. Two stores closing at once cannot both be refused: each lets go
before it asks, so the later one to ask is granted. Byte-range locks and ``flock`` (json/lock.py) do not interact
on Linux. Where OFD locks are missing (other systems) or the lock file cannot be opened, every close folds, as
before. Read-only stores take no share: they never fold, so they must not make a writer leave it to them.

The last close also removes the journal generation a compaction kept for followers (``storage.journal.<N>``,
json/journal.py ``keep_previous``): it can only help a store that is still open, and only a granted exclusive lock
(:attr:`Presence.alone`) proves that no writer is. A read-only follower still open then reloads its snapshots if it
missed that whole generation (its watchers get a ``resync``), which is always correct; without this, a store
closed after a bulk load kept a second copy of its whole journal on disk (100k members: 28 MB beside a 30 MB
snapshot).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from pathlib import Path

try:  # pragma: no cover - platform switch
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Presence"]

log = logging.getLogger("storage.json")

_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None) if fcntl is not None else None
#: The byte whose locks say who is present: far past the published state at the start of the file (never written).
_BYTE = 1 << 40
_REFUSED = frozenset({errno.EAGAIN, errno.EACCES})


def _flock_struct(kind: int) -> bytes:
    """A ``struct flock`` for one byte at _BYTE (l_type, l_whence, l_start, l_len, l_pid=0 as OFD locks require)."""
    return struct.pack("hhqqi", kind, os.SEEK_SET, _BYTE, 1, 0)


class Presence:
    """This store's share of the folder (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        #: Set by :meth:`leave`: True only when the exclusive lock was granted (no other writer has the folder
        #: open); False when refused or when it cannot be known.
        self.alone = False

    def enter(self) -> None:
        """Take a share; on any failure the store just folds at every close, as without this."""
        if _OFD_SETLK is None or self._fd >= 0:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.debug("%s: no presence lock (%s): every close folds the journal", self.path, exc)
            return
        try:
            fcntl.fcntl(fd, _OFD_SETLK, _flock_struct(fcntl.F_RDLCK))
        except OSError as exc:
            os.close(fd)
            log.debug("%s: no presence lock (%s): every close folds the journal", self.path, exc)
            return
        self._fd = fd

    def leave(self) -> bool:
        """Let go of the share; True when no other store has the folder open for writing (or it cannot be
        known: then folding is the safe answer)."""
        fd, self._fd = self._fd, -1
        self.alone = False
        if fd < 0 or _OFD_SETLK is None:
            return True
        try:
            fcntl.fcntl(fd, _OFD_SETLK, _flock_struct(fcntl.F_UNLCK))
            try:
                fcntl.fcntl(fd, _OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
            except OSError as exc:
                if exc.errno in _REFUSED:
                    return False
                raise
            self.alone = True
            return True
        except OSError as exc:
            log.debug("%s: presence lock failed at close (%s): folding the journal", self.path, exc)
            return True
        finally:
            os.close(fd)  # drops whatever this descriptor still holds

    def close(self) -> None:
        """Let go without asking (a store closed from another loop, or a failed open)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
