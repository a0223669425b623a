"""Being woken when ``storage.lock`` is written (Linux inotify), so a watcher need not poll often.

Why: a JSON store learns of another process's commit by looking at the journal. Looking every few milliseconds
costs an idle watching process about 2% of a core (measured: a timer wake-up, a ``pread``, 200 times a second).
Every commit, and every compaction, ends by publishing the journal's committed end in ``storage.lock`` (a
``pwrite``: json/lock.py), and readers never read past it, so a write to that one file is exactly when there is
something new to read: inotify wakes the watcher then, once per commit. (If someone deletes ``storage.lock`` by
hand, the watch stays on the old file and the slow look below takes over.)

Not everywhere: inotify is Linux-only and not in the standard library (called here through ``ctypes``), the number
of inotify instances per user is limited (128 by default), and it does not see writes made by another *host*
through a network file system. So it only makes the looks prompt: the caller keeps looking at a slow interval
too, and :func:`open_dirwatch` returns None wherever inotify cannot be used (then the caller polls fast).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from pathlib import Path

__all__ = ["DirWatch", "open_dirwatch"]

_IN_MODIFY = 0x2
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)


class DirWatch:
    """An inotify descriptor watching one file for writes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def drain(self) -> None:
        """Read (and forget) the pending events: the caller only needs to know that something changed."""
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        except OSError as exc:  # pragma: no cover - the descriptor was closed meanwhile
            if exc.errno != errno.EBADF:
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_dirwatch(path: Path) -> DirWatch | None:
    """A :class:`DirWatch` on the file ``path``, or None where inotify cannot be used (see the module doc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None  # EMFILE: the per-user limit of instances is reached
    if add(fd, os.fsencode(path), _IN_MODIFY) < 0:
        os.close(fd)
        return None
    return DirWatch(fd)
