"""Durable file operations: the temp-file, fsync, ``os.replace``, fsync-the-directory dance, written once.

A rename is only durable once the directory entry is flushed, and a file's data only once the file is; skipping
either is how TinyDB and the seed ended up with empty or torn files after a crash.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["fsync_dir", "atomic_write", "temp_name", "TEMP_MARK", "write_all", "pwrite_all", "sync_fd", "make_dirs",
           "pid_alive", "start_writeback"]

TEMP_MARK = ".tmp-"


def sync_fd(fd: int) -> None:
    """Flush a file's data to stable storage (``fdatasync`` where it exists: metadata we do not need is skipped)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS/Windows
        os.fsync(fd)


#: ``sync_file_range``'s flag that starts the writeback of the range's dirty pages without waiting for it.
SYNC_FILE_RANGE_WRITE = 2
#: What ``sync_file_range`` answers where it cannot be used (no such call, a seccomp filter refusing it, not a
#: regular file): then nothing was started, and the caller's fsync does all of the writing, as it always did.
_WRITEBACK_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EPERM, errno.ESPIPE, errno.EINVAL})


def start_writeback(fd: int) -> bool:
    """Start writing the file's dirty pages to the disk now, without waiting (Linux ``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``, over the whole file); False where that cannot be done (nothing started). Raises the
    call's ``OSError`` (EIO, ENOMEM...): treat it as the write's failure.

    Not a sync: only the :func:`sync_fd` that must follow makes anything durable. It does not wait for the
    writeback either, so it takes no write error of the file's pages for itself (Linux reports such an error once
    per open file, to the first call that *waits*): the following fsync still reports it. It may block while the
    disk's request queue is full; the fsync would have waited as long.

    Why: a commit's ``fdatasync`` of a 250 KB batch record spent 0.3-0.4 ms of its ~0.6 ms sending the data; the
    commit has CPU work that needs no disk before that fsync (planning its apply): with the writeback started
    first, that work runs while the disk writes, and the fsync is left with about the cache flush (0.15-0.25 ms
    here; benchmarks/README.md, issue 15's batch row)."""
    call = _sync_file_range()
    if call is None:
        return False
    if call(fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _WRITEBACK_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code))


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (the GIL released during the call, as for any ``ctypes.CDLL`` function); None
    off Linux or where libc lacks it. Looked up once, at import (:data:`_SYNC_FILE_RANGE`)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


#: The C function, resolved at import: a constant, not a cache filled on first use.
_SYNC_FILE_RANGE = _load_sync_file_range()


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """:data:`_SYNC_FILE_RANGE` (a function, so that tests can stand in another call or none)."""
    return _SYNC_FILE_RANGE


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames and creations inside ``path`` durable. A no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError):  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A temp file beside ``path`` whose name says what it is and who wrote it (cleaned up on the next open)."""
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until everything is written (a short write is legal for regular files near ENOSPC)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``os.pwrite`` at ``offset`` until everything is written (short writes happen near ENOSPC)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def atomic_write(path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o644, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` (bytes, or parts written one after the other: an iterator may produce them as
    they are written, and raise to abandon the file) so that a crash leaves either the old or the new file, never a
    mix."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            for part in (data,) if isinstance(data, bytes) else data:
                write_all(fd, part)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(path.parent)


def make_dirs(path: str | os.PathLike[str], mode: int = 0o777) -> None:
    """``mkdir -p`` that makes each new folder durable: its entry is fsynced in its parent (a crash right after
    creating a data or backup folder must not lose the folder, and with it everything written inside)."""
    path = Path(path)
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue
        fsync_dir(folder.parent)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (the writer named in a temp file's name) still runs on this machine: its leftovers
    are only removed once it is gone."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
