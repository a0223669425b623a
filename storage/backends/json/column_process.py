"""The column cache's first parse of large message files, in a child process (storage/child.py).

Why: the cache parses every line of a file it has not seen (:func:`.message_files.parse_block`, a few us of
Python a line) in a worker thread, and a thread running Python holds the GIL the event loop needs for up to a
switch interval at a time: at 1M messages the first query (or the ``status`` command's message summary) kept the
loop waiting 25-30 ms at a time for seconds (benchmarks/bench_stalls.py, benchmarks/README.md). The parse only reads
the files, so a child process does it with the same code; the worker thread only rebuilds each file's columns from
what the child sends, a few C calls a file.

The child answers each file, in order, with its inode, the bytes consumed (a torn last line is not: it is read
again in this process later, as before), the ``micros`` column as ``array("q")`` bytes and each other column as
its distinct values plus ``array("I")`` indexes into them. A file it cannot answer for (update lines, whose rows
the cache keeps by id; a corrupt line; an OS error) gets ``None``, and so does every file after a child that died:
the cache then parses those in its thread as before, which also raises the error with its position. The child's
answer is used only if the inode it read is the one the cache saw, so a file replaced meanwhile (a prune) is
parsed again here.

Spawning costs ~0.3 s of another core (the child imports the package), so only a batch of at least
:data:`ELSEWHERE_BYTES` goes there; the bytes appended later are parsed in the thread as before.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...child import ChildLost, child_items
from ...messages.columns import ColumnsBuilder
from .message_files import parse_block

__all__ = ["ELSEWHERE_BYTES", "parse_elsewhere", "answers"]

#: Unread bytes of fresh files from which a child process parses them (~40k lines, 0.2-0.4 s in a thread).
ELSEWHERE_BYTES = 8 << 20
_INDEX = "I"


class _Update(Exception):
    """An update line: the cache keeps such a file's rows by id, which only its own parse does."""


# ---------------------------------------------------------------------------------------------------------------
# in the child
def answers(files: list[tuple[str, int]]) -> Iterator[tuple[Any, ...] | None]:
    """Each of ``files`` (``[path, size]``) parsed from byte 0 up to ``size``, or None (module doc)."""
    for path, size in files:
        try:
            yield _parse(Path(path), size)
        except Exception:  # the parent parses this file itself, and says what is wrong
            yield None


def _parse(path: Path, size: int) -> tuple[Any, ...]:
    fd = os.open(path, os.O_RDONLY)
    try:
        ino = os.fstat(fd).st_ino
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    builder = ColumnsBuilder()

    def add(rec: dict[str, Any], update: bool) -> None:
        if update:
            raise _Update
        builder.add(rec)

    consumed = parse_block(path, data, 0, add)
    return (ino, consumed, builder.micros.tobytes(), *_indexed(builder.authors), *_indexed(builder.channels),
            *_indexed(builder.sentiments), *_indexed(builder.topics))


def _indexed(column: Sequence[Any]) -> tuple[list[Any], bytes]:
    """A column as its distinct values (in first-seen order) and each row's index among them."""
    table = list(dict.fromkeys(column))
    where = {value: i for i, value in enumerate(table)}
    return table, array(_INDEX, map(where.__getitem__, column)).tobytes()


# ---------------------------------------------------------------------------------------------------------------
# in the parent
def parse_elsewhere(files: Sequence[tuple[Path, int, int]]) -> Iterator[tuple[int, int, ColumnsBuilder]]:
    """``(index, bytes consumed, frozen columns)`` of each of ``files`` (``(path, inode, size)``, parsed from
    byte 0 up to ``size``) the child parsed, read as it answers; the others are left out, for the caller to parse
    (module doc). Call it in a worker thread."""
    got = child_items("storage.backends.json.column_process:answers", [[str(p), size] for p, _ino, size in files])
    try:
        for index, answer in enumerate(got):
            if answer is not None and answer[0] == files[index][1]:
                yield index, answer[1], _columns(answer[2:])
    except ChildLost:
        return


def _columns(answer: tuple[Any, ...]) -> ColumnsBuilder:
    """The builder of one file from the child's answer: a few C calls over the file's rows."""
    micros = array("q")
    micros.frombytes(answer[0])
    intern = sys.intern
    authors = _rows([intern(v) for v in answer[1]], answer[2])
    channels = _rows([intern(v) for v in answer[3]], answer[4])
    sentiments = _rows([v if v is None else intern(v) for v in answer[5]], answer[6])
    topics = _rows(answer[7], answer[8])
    return ColumnsBuilder.frozen(micros, authors, channels, sentiments, topics)


def _rows(table: list[Any], indexes: bytes) -> tuple[Any, ...]:
    return tuple(map(table.__getitem__, array(_INDEX, indexes)))
