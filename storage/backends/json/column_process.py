"""The column cache's first parse of large message files, in a child process: off this process's GIL.

Why: the cache parses every line of a file it has not seen (:func:`.message_files.parse_block`, a few us of
Python a line) in a worker thread, and a thread running Python holds the GIL the event loop needs for up to a
switch interval at a time: at 1M messages the first query (or the ``status`` command's message summary) kept the
loop waiting 25-30 ms at a time for seconds (benchmarks/bench_stalls.py, benchmarks/README.md). The parse only reads
the files, so a child process can do it on another core, with the same code: the worker thread then waits on a
pipe (the GIL released) and only rebuilds each file's columns from what the child sends, a few C calls a file.

The child gets ``[[path, size], ...]`` (JSON, on stdin) and answers one frame per file, in order: an 8-byte length
and a :mod:`marshal` payload (core types only: nothing in it can run code) holding the file's inode, the bytes
consumed (a torn last line is not: it is read again in this process later, as before), the ``micros`` column as
``array("q")`` bytes and each other column as its distinct values plus ``array("I")`` indexes into them. A file the
child cannot answer for (update lines, whose rows the cache keeps by id; a corrupt line; an OS error) gets an empty
answer, and so does every file after a child that died: the cache then parses those in its thread as before, which
also raises the error with its position. The child's answer is used only if the inode it read is the one the cache
saw, so a file replaced meanwhile (a prune) is parsed again here.

Spawning costs ~0.3 s of another core (the child imports the package), so only a batch of at least
:data:`ELSEWHERE_BYTES` goes there; the bytes appended later are parsed in the thread as before.
"""

from __future__ import annotations

import contextlib
import gc
import marshal
import os
import struct
import subprocess
import sys
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from ...messages.columns import ColumnsBuilder
from .message_files import parse_block

__all__ = ["ELSEWHERE_BYTES", "parse_elsewhere", "serve"]

#: Unread bytes of fresh files from which a child process parses them (~40k lines, 0.2-0.4 s in a thread).
ELSEWHERE_BYTES = 8 << 20
#: The child's niceness above the parent's: on a host whose cores are all busy, the child competing with the
#: process it works for made the event loop's wake-ups late (1 ms ticker 28-41 ms late at load ~2.5 on 2 cores,
#: against 17-18 with the parse in a thread), though no thread of ours held the GIL meanwhile.
NICE = 10
_FRAME = struct.Struct("<Q")
_ROOT = str(Path(__file__).resolve().parents[3])  # the folder that holds this ``storage`` package
_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from storage.backends.json.column_process import serve; serve()")
_INDEX = "I"


class _Update(Exception):
    """An update line: the cache keeps such a file's rows by id, which only its own parse does."""


# ---------------------------------------------------------------------------------------------------------------
# the child
def serve() -> None:
    """The child's main: parse the files named on stdin, answer on stdout (module doc)."""
    gc.disable()  # a short-lived process of ours: nothing it makes is a cycle worth collecting
    with contextlib.suppress(OSError):
        os.nice(NICE)  # background work: where the cores are all busy, the parent's event loop goes first
    out = sys.stdout.buffer
    for path, size in orjson.loads(sys.stdin.buffer.read()):
        try:
            payload = marshal.dumps(_parse(Path(path), size))
        except Exception:  # the parent parses this file itself, and says what is wrong
            payload = b""
        out.write(_FRAME.pack(len(payload)) + payload)
        out.flush()


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
# the parent
def parse_elsewhere(files: Sequence[tuple[Path, int, int]]) -> Iterator[tuple[int, int, ColumnsBuilder]]:
    """``(index, bytes consumed, frozen columns)`` of each of ``files`` (``(path, inode, size)``, parsed from
    byte 0 up to ``size``) the child parsed, read as it answers; the others are left out (module doc). Nothing is
    left out silently that the caller would not parse itself: it goes on with every file it was not given."""
    try:
        proc = subprocess.Popen([sys.executable, "-s", "-c", _CHILD, _ROOT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
    except (OSError, ValueError):  # no interpreter to run (an embedded one), no process to spare
        return
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            proc.stdin.write(orjson.dumps([[str(path), size] for path, _ino, size in files]))
            proc.stdin.close()
        except OSError:  # the child is gone already
            return
        for index, (_path, ino, _size) in enumerate(files):
            payload = _read_frame(proc.stdout)
            if payload is None:
                return
            if payload:
                answer = marshal.loads(payload)
                if answer[0] == ino:
                    yield index, answer[1], _columns(answer[2:])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (length,) = _FRAME.unpack(head)
    payload = stream.read(length)
    return payload if len(payload) == length else None


def _columns(answer: tuple[Any, ...]) -> ColumnsBuilder:
    """The builder of one file from the child's answer: a few C calls over the file's rows."""
    micros = array("q")
    micros.frombytes(answer[0])
    intern = sys.intern
    authors = _rows([intern(v) for v in answer[1]], answer[2])
    channels = _rows([intern(v) for v in answer[3]], answer[4])
    sentiments = _rows([v if v is None else intern(v) for v in answer[5]], answer[6])
    topics = _rows([tuple(v) for v in answer[7]], answer[8])
    return ColumnsBuilder.frozen(micros, authors, channels, sentiments, topics)


def _rows(table: list[Any], indexes: bytes) -> tuple[Any, ...]:
    return tuple(map(table.__getitem__, array(_INDEX, indexes)))
