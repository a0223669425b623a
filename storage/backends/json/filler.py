"""The journal's preallocated room: newline filler written ahead of the records, which later records overwrite.

Why: a durable save is one journal record and one ``fdatasync``. Appending grows the file, so every such fdatasync
must also commit the new size (a file system journal commit); overwriting bytes that were already written and
fsynced commits data only. Measured on this project's test machine (ext4, 2,000 records of 80 bytes, medians of 5
rounds; /tmp/prealloc/fsync_modes.py in the issue-15 notes): append + fdatasync 142-153 us, overwrite of written
bytes + fdatasync 90-100 us, ``fallocate``d (unwritten) extents + fdatasync 84-95 us. SQLite's WAL gets the
same effect by reusing its file. ``fallocate`` is not used: unwritten extents read back as NUL bytes, and the
journal must stay a text file a person can read; written newlines cost one extra write of each chunk and read
as blank lines, which the journal reader skips.

So when a record does not fit in the room left, the journal writes the record *and* a new chunk of filler in one
``pwrite`` and one fdatasync (that one commits the size, as an append did), and the next records overwrite the
filler in place. The filler is never read as a record: readers stop at the committed end (json/lock.py), and a
scan that does not know it (opening after a reboot) treats blank lines as nothing.

How much: chunks grow with the journal (a small store keeps a small file), and never take more than a small share
of the free space, so that a nearly full disk keeps its room for compaction's snapshot files (which must be written
before the journal can shrink) and appends behave there as they did before preallocation. A chunk that cannot be
written (ENOSPC, quota, file size limit) is given up and the record is appended alone.
"""

from __future__ import annotations

import errno
import os
import re

__all__ = ["FILL", "chunk_for", "is_blank", "next_nonblank", "NO_ROOM"]

#: The filler byte: a newline, so the filler is a run of blank lines (readable text, skipped by the reader).
FILL = b"\n"
#: Smallest and largest chunk of filler written at once.
MIN_CHUNK = 64 << 10
MAX_CHUNK = 1 << 20
#: A chunk never takes more than 1/FREE_SHARE of the file system's free space (a 4 MiB disk gets none).
FREE_SHARE = 256
#: The errnos that mean "no room for the filler": the record is then appended alone.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_NONBLANK = re.compile(rb"[^\n]")


def chunk_for(fd: int, journal_bytes: int) -> int:
    """Bytes of filler to write after the next record (0: append without filler).

    Grows with the journal (a quarter of its size, between MIN_CHUNK and MAX_CHUNK) and is capped by the free
    space (see the module doc). One ``fstatvfs`` per chunk."""
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return 0
    want = min(MAX_CHUNK, max(MIN_CHUNK, journal_bytes // 4), st.f_bavail * st.f_frsize // FREE_SHARE)
    return want if want >= MIN_CHUNK else 0


def is_blank(byte: bytes) -> bool:
    """Whether one byte read at a record boundary says "nothing there": end of file or filler."""
    return byte == b"" or byte == FILL


def next_nonblank(data: bytes, pos: int) -> int:
    """The position of the first byte at or after ``pos`` that is not filler; -1 when there is none."""
    found = _NONBLANK.search(data, pos)
    return -1 if found is None else found.start()
