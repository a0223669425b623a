"""Whether the journal holds a writer's offered record: what a writer asks when it finds its slot of
``storage.slots`` emptied (the file truncated or overwritten while it waited; json/slots.py ``found_in_journal``).

Why a module of its own, run in a worker thread (json/holding.py ``_offer_committed``): the answer reads everything
committed while the offer waited, up to :data:`SEARCH_MAX` bytes, under the store lock. Read and scanned on the
event loop's thread, 64 MB took far more than the loop's 20 ms budget; in a thread it costs the loop nothing, and
it is read a chunk at a time (:data:`CHUNK`), so its memory is one chunk plus the longest record, not the window.

Why it also looks at kept generations (``storage.journal.<N>``, json/journal.py ``keep_previous``): compactions by
other processes while the offer waited replaced the journal; the record, committed in an older file, was folded
into the snapshots. Each file's header says where its predecessor's committed records ended (``previous_end``), and
every generation from the waiting writer's own stays linked while its offer stands (json/slots.py
``kept_needed``), so the window is the offer's file from the offer's committed end, each later one from its header
to the end its successor names, and the current one to the committed end now.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import orjson

from ...errors import CorruptDataError
from .journal import SEARCH_MAX, read_header

__all__ = ["found", "journal_bytes", "SEARCH_MAX", "CHUNK"]

#: How much of the journal is read at a time.
CHUNK = 1 << 20


def found(journal_path: str, ops: bytes, since: tuple[int, int] | None, now: tuple[int, int] | None) -> bool:
    """Whether a record committed between ``since`` and ``now`` (each a journal inode and its committed end, as
    json/lock.py publishes it) holds the operations ``ops`` (a record's inside), in order, parsed as operations.
    False when that cannot be proven: either end unknown, the window too large, a file of it gone."""
    if since is None or now is None:
        return False
    if since[0] == now[0]:
        if not since[1] < now[1] <= since[1] + SEARCH_MAX:
            return False
        return _search([(journal_path, now[0], since[1], now[1])], ops)
    spans = _across_compactions(journal_path, since, now)
    return spans is not None and _search(spans, ops)


def _across_compactions(journal_path: str, since: tuple[int, int],
                        now: tuple[int, int]) -> list[tuple[str, int, int, int]] | None:
    """The spans to search when the journal was replaced since the offer, newest first: the current file from its
    header to the committed end now, then each kept generation (``<journal>.<N>``) from its header to the end its
    successor's header names, down to the offer's file, from the offer's committed end. None: a file missing, or
    not what the chain says, or more than :data:`SEARCH_MAX` bytes."""
    spans: list[tuple[str, int, int, int]] = []
    path, ino, end, total = journal_path, now[0], now[1], 0
    while True:
        head = _header(path, ino)
        if head is None:
            return None
        header_end, generation, previous_end = head
        start = since[1] if ino == since[0] else header_end
        if end < start:
            return None
        spans.append((path, ino, start, end))
        total += end - start
        if total > SEARCH_MAX:
            return None
        if ino == since[0]:
            return spans
        if previous_end is None or generation <= 1:
            return None
        path, end = f"{journal_path}.{generation - 1}", previous_end
        try:
            ino = os.stat(path).st_ino
        except OSError:
            return None


def _header(path: str, ino: int) -> tuple[int, int, int | None] | None:
    """The journal file at ``path`` when it is inode ``ino``: where its header ends, its generation and the
    previous generation's committed end its header names (None: not said). None: not that file, or no header."""
    fd = _open_if(path, ino)
    if fd is None:
        return None
    try:
        header_end, generation, _snapshots, previous_end, _copied = read_header(fd, path)
    except (OSError, CorruptDataError):
        return None
    finally:
        os.close(fd)
    return header_end, generation, previous_end


def _open_if(path: str, ino: int) -> int | None:
    """A descriptor of the file at ``path`` when it is inode ``ino`` (None: gone, unreadable, or another file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        same = os.fstat(fd).st_ino == ino
    except OSError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def journal_bytes(path: str, ino: int, at: int, length: int) -> bytes | None:
    """``length`` bytes at ``at`` of the journal at ``path`` when it is the file of inode ``ino`` (json/slots.py
    ``settle_orphans``: whether a dead holder's claimed record is where it claimed it)."""
    fd = _open_if(path, ino)
    if fd is None:
        return None
    try:
        return os.pread(fd, length, at)
    finally:
        os.close(fd)


def _search(spans: list[tuple[str, int, int, int]], ops: bytes) -> bool:
    try:
        wanted = orjson.loads(b"[" + ops + b"]")
    except orjson.JSONDecodeError:
        return False
    for path, ino, start, end in spans:
        try:
            for line in _lines(path, ino, start, end):
                if _holds(line, ops, wanted):
                    return True
        except _NotThatFile:
            return False
    return False


class _NotThatFile(Exception):
    """The path names another file than the inode the span was measured on (replaced again, or gone)."""


def _lines(path: str, ino: int, start: int, end: int) -> Iterator[bytes]:
    """The whole lines of bytes ``start``..``end`` of the file at ``path`` (inode ``ino``), a chunk at a time."""
    fd = _open_if(path, ino)
    if fd is None:
        raise _NotThatFile
    try:
        rest = b""
        while start < end:
            chunk = os.pread(fd, min(CHUNK, end - start), start)
            if not chunk:
                break
            start += len(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest
    finally:
        os.close(fd)


def _holds(line: bytes, ops: bytes, wanted: list[object]) -> bool:
    """Whether journal ``line`` holds ``wanted`` (the operations ``ops`` parsed) as a run of its operations (parsed:
    bytes alike inside a document's value do not count)."""
    if ops not in line:  # a holder writes the offered bytes as they are
        return False
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    count = len(wanted)
    return type(record) is list and any(record[i:i + count] == wanted for i in range(len(record) - count + 1))
