"""The JSON message log's files: where they are, what a line is, and how to read many lines fast.

Layout, under the store's folder::

    messages/<guild_id>/<YYYY-MM>.jsonl   one line per record, in the order they were written
    messages/rewrites.generation          a token that changes whenever a file is rewritten or removed (prune)

A record line is the normalized record itself, ``message_id`` first; an update line is ``{"update": <record>}``.
Both are written by this module only, so the format is ours, and both directions lean on it. Writing: a batch is
encoded with one ``orjson.dumps`` and split at the record boundaries (:func:`encode_bodies`). Reading: a line starts
with one of two fixed prefixes followed by the id's digits, which lets the id index be built with one regular
expression over a whole block of lines (:func:`block_ids`: two to three times faster than line by line, see
benchmarks/README.md, "Design measurements"). Anything else in a file is either a torn last line (a crash mid-append,
never acknowledged) or corruption, and the slower per-line path (:func:`parse_line`) says which, and where.

Nothing here holds state: the writer (:mod:`.json_messages`) and the query cache (:mod:`.json_message_cache`) both
build on these functions.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ... import cancellation
from ...errors import CorruptDataError, StorageIOError
from ...fsutil import TEMP_MARK

__all__ = [
    "MESSAGES_DIR", "GENERATION_NAME", "FileKey", "Record", "encode_line", "encode_bodies", "join_lines",
    "encode_update", "parse_line", "parse_record", "parse_block", "block_ids", "block_line_ids", "line_id", "corrupt",
    "iter_blocks", "split_lines", "PIECE", "ENCODE_SLICE",
    "iter_lines", "order", "order_key", "ORDER_TS", "ORDER_ID", "month_range", "file_path", "list_files",
    "list_months", "read_generation",
    "is_temp_file", "run_in_thread", "run_holding",
]

log = logging.getLogger("storage.json.messages")

MESSAGES_DIR = "messages"
GENERATION_NAME = "rewrites.generation"
BLOCK = 8 << 20  # read files in blocks of this size (plus one line)
#: Bytes of lines one C call takes at a time in a worker thread (a regular expression over them, a split, a join):
#: such a call keeps the GIL, so the event loop waits for all of it. A 4 MB month file at once held it 5-9 ms per
#: call (benchmarks/README.md, "Design measurements"); this much, under half a ms.
PIECE = 256 << 10
#: Records encoded by one :func:`encode_bodies` call, and lines joined by one ``join`` (see :func:`join_lines`):
#: about 300 KB, under half a ms of GIL each, where 10,000 records at once held it 3 ms per call.
ENCODE_SLICE = 1000

Record = dict[str, Any]
FileKey = tuple[str, str]  # (guild_id, "YYYY-MM")
T = TypeVar("T")

_MONTH_FILE = re.compile(r"(\d{4}-\d{2})\.jsonl\Z")
_GUILD_DIR = re.compile(r"(?:0|[1-9]\d{0,19})\Z")
_TEMP_FILE = re.compile(r".+" + re.escape(TEMP_MARK) + r"\d+-[0-9a-f]{8}\Z")
_RECORD_PREFIX = b'{"message_id":"'
_UPDATE_PREFIX = b'{"update":{"message_id":"'
# A raw newline only ever separates lines (JSON escapes it inside strings), so "newline + prefix" finds exactly
# the starts of lines; a literal start also lets the regex engine skip ahead fast.
_RECORD_IDS = re.compile(rb'\n\{"message_id":"(\d+)"')
_UPDATE_IDS = re.compile(rb'\n\{"update":\{"message_id":"(\d+)"')
_ID_KEY = b'"message_id":"'
_FIRST = b"[" + _RECORD_PREFIX  # what a list of records starts with, when the first starts with message_id
_SEPARATOR = b"}," + _RECORD_PREFIX  # between two such records in a list
_JOINER = b"}\n" + _RECORD_PREFIX  # between two such lines in a file


# -------------------------------------------------------------------------------------------------------------------
# writing lines
def encode_line(record: Record) -> bytes:
    """A record's line, without its newline, ``message_id`` first (validate_message keeps the caller's order)."""
    line = orjson.dumps(record)
    if not line.startswith(_RECORD_PREFIX):
        line = orjson.dumps({"message_id": record["message_id"], **record})
    return line


def encode_bodies(records: list[Record]) -> list[bytes]:
    """The lines of ``records`` without what every line has: the ``{"message_id":"`` before and ``}`` after.

    :func:`join_lines` puts them back, for the lines of one file. Why so: one ``orjson.dumps`` of the whole list,
    split at the record boundaries, costs a fraction of a ``dumps`` per record (mostly allocator work: orjson's
    result starts as a 1 KiB buffer, and keeping thousands of them alive defeats the allocator; benchmarks/README.md,
    "Design measurements"), and the pieces are small enough for Python's own allocator.
    The split is exact when every record starts with ``message_id`` and the separator occurs nowhere else, which
    is checked on the output (two ``count``); otherwise each record is encoded alone.
    """
    n = len(records)
    blob = orjson.dumps(records)
    # ``"message_id":"`` is a message_id key with a text value (quotes inside strings are escaped): n of them
    # means no nested object has one, and then n - 1 separators means every record starts with its own.
    if blob.startswith(_FIRST) and blob.count(_ID_KEY) == n and blob.count(_SEPARATOR) == n - 1:
        bodies = blob.split(_SEPARATOR)  # then trim the ends of the first and the last (not a copy of it all)
        bodies[0] = bodies[0][len(_FIRST):]
        bodies[-1] = bodies[-1][:-2]
        return bodies
    return [encode_line(record)[len(_RECORD_PREFIX):-1] for record in records]


def join_lines(bodies: Sequence[bytes]) -> bytes:
    """The lines (each with its newline) of some bodies from :func:`encode_bodies`: joined :data:`ENCODE_SLICE`
    at a time, then the parts in one copy (a ``join`` of 10,000 small pieces holds the GIL for milliseconds)."""
    if len(bodies) == 1:
        return _RECORD_PREFIX + bodies[0] + b"}\n"
    if len(bodies) > ENCODE_SLICE:
        return b"".join([join_lines(bodies[i:i + ENCODE_SLICE]) for i in range(0, len(bodies), ENCODE_SLICE)])
    return _JOINER.join([_RECORD_PREFIX + bodies[0], *bodies[1:-1], bodies[-1] + b"}\n"])


def encode_update(record: Record) -> bytes:
    """An update line, with its newline."""
    return b'{"update":' + encode_line(record) + b"}\n"


# -------------------------------------------------------------------------------------------------------------------
# reading lines
def parse_record(line: bytes) -> Record:
    """The record a line holds (a record or an update); ValueError when the line is not one this module wrote."""
    return parse_line(line)[0]


def parse_line(line: bytes) -> tuple[Record, bool]:
    """``(record, is_update)``: :func:`parse_record` that also says which kind of line it was."""
    obj = orjson.loads(line)
    if type(obj) is not dict:
        raise ValueError(f"a line must be a JSON object, got {type(obj).__name__}")
    update = "message_id" not in obj
    rec = obj.get("update") if update and len(obj) == 1 else obj
    if type(rec) is not dict:
        raise ValueError("neither a message record nor an update")
    for name in ("message_id", "guild_id", "channel_id", "author_id"):
        value = rec.get(name)
        if type(value) is not str or not value.isdigit():
            raise ValueError(f"{name} is missing or not a decimal string")
    ts = rec.get("timestamp")
    if type(ts) is not str or len(ts) not in (20, 27):
        raise ValueError("timestamp is missing or not canonical")
    analysis = rec.get("analysis")
    if type(analysis) is not dict:
        raise ValueError("analysis is missing or not an object")
    sentiment, topics = analysis.get("sentiment"), analysis.get("topics")
    if sentiment is not None and type(sentiment) is not str:
        raise ValueError("analysis.sentiment is not a string")
    if topics is not None and (type(topics) is not list or not all(type(t) is str for t in topics)):
        raise ValueError("analysis.topics is not a list of strings")
    return rec, update


def line_id(line: bytes) -> int:
    """A line's message id: read from the fixed prefix of lines this module wrote, else by parsing the line."""
    start = 15 if line.startswith(_RECORD_PREFIX) else 25 if line.startswith(_UPDATE_PREFIX) else 0
    if start:
        end = line.find(b'"', start)
        digits = line[start:end]
        if end > start and digits.isdigit():
            return int(digits)
    return int(parse_record(line)["message_id"])


def block_ids(block: bytes) -> list[bytes] | None:
    """The ids (as digits) of the lines of ``block`` (complete lines, each ending in a newline), in any order.

    None when some line does not start with one of our prefixes: the caller then goes line by line
    (:func:`line_id`), which finds out whether that is corruption and where.
    """
    text = b"\n" + block
    lines = block.count(b"\n")
    ids: list[bytes] = _RECORD_IDS.findall(text)
    if len(ids) != lines:
        ids += _UPDATE_IDS.findall(text)
        if len(ids) != lines:
            return None
    return ids


def block_line_ids(path: Path, offset: int, block: bytes) -> list[int]:
    """The ids of ``block``'s complete lines (read at ``offset`` of ``path``), one per line: by :func:`block_ids`,
    or line by line to name the corrupt line and its position."""
    digits = block_ids(block)
    if digits is not None:
        return list(map(int, digits))
    ids = []
    for line in block[:-1].split(b"\n"):
        try:
            ids.append(line_id(line))
        except ValueError as exc:
            raise corrupt(path, offset, exc) from None
        offset += len(line) + 1
    return ids


def corrupt(path: Path, position: int, why: object) -> CorruptDataError:
    return CorruptDataError(
        f"{path}: message line at byte {position} is corrupt ({why}); later lines exist, so this is not a torn "
        "write; the file was left as it is", path=str(path), position=position)


def parse_block(path: Path, data: bytes, base: int, sink: Callable[[Record, bool], None]) -> int:
    """Hand ``sink(record, is_update)`` the record of each complete line in ``data`` (read at offset ``base``).

    Returns how many bytes were consumed. A last line that does not parse is not: it is being written right now,
    or was torn by a crash (a writer truncates it under the lock). Any other bad line raises
    :class:`CorruptDataError` with its position. Records go to the sink one by one, so that a caller that keeps
    only a few fields never holds a whole file of dicts (the garbage collector would walk them all, repeatedly).
    """
    end = data.rfind(b"\n") + 1
    offset = 0
    for line in split_lines(data, end):
        try:
            rec, update = parse_line(line)
        except ValueError as exc:
            if offset + len(line) + 1 == end:  # the last line
                log.debug("%s: leaving an incomplete last line at byte %d for later", path, base + offset)
                return offset
            raise corrupt(path, base + offset, exc) from None
        sink(rec, update)
        offset += len(line) + 1
    return offset


def split_lines(data: bytes, end: int) -> Iterator[bytes]:
    """The lines of ``data[:end]`` (``end`` just after a newline), newlines stripped, split :data:`PIECE` bytes
    at a time (one ``split`` of a whole file kept the GIL for milliseconds)."""
    start = 0
    while start < end:
        stop = data.rfind(b"\n", start, min(end, start + PIECE)) + 1
        if stop <= start:  # a line longer than a piece
            stop = data.find(b"\n", start) + 1
        yield from data[start:stop - 1].split(b"\n")
        start = stop


def iter_blocks(fd: int, start: int, end: int, size: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """``(offset, block)`` for the complete lines in ``[start, end)``, in blocks of about ``size`` bytes (more for
    a longer line) ending in a newline.

    An incomplete last line is not included: the caller sees where the complete lines stop from the offsets.
    """
    pos = start
    while pos < end:
        block = os.pread(fd, min(size, end - pos), pos)
        if not block:
            return
        cut = block.rfind(b"\n") + 1
        while cut == 0 and pos + len(block) < end:  # a single line longer than the block
            more = os.pread(fd, min(size, end - pos - len(block)), pos + len(block))
            if not more:
                return
            block += more
            cut = block.rfind(b"\n") + 1
        if cut == 0:
            return
        yield pos, block if cut == len(block) else block[:cut]
        pos += cut


def iter_lines(fd: int, start: int, end: int, size: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for the complete lines in ``[start, end)``, newline stripped (read ``size`` bytes at a
    time, see :func:`iter_blocks`)."""
    for offset, block in iter_blocks(fd, start, end, size):
        for line in block[:-1].split(b"\n"):
            yield offset, line
            offset += len(line) + 1


def order(rec: Record) -> tuple[str, int, str]:
    """Scan order: timestamp, then message id as a number (shorter decimal strings are smaller numbers)."""
    ts, mid = rec["timestamp"], rec["message_id"]
    return (ts if len(ts) == 27 else ts[:19] + ".000000Z", len(mid), mid)


def order_key(rec: Record) -> str:
    """:func:`order` as one string that sorts the same: the 27-character timestamp, the id's length in two digits,
    the id (a checked message id: at most 20 digits). Its timestamp is ``key[:ORDER_TS]``, its id
    ``key[ORDER_ID:]``.

    Why a string: a scan holds a month's keys (83k at 1M messages) while it reads the month, and a tuple is a
    container the collector counts: each 700 more alive ran a young collection, 12 of which moved whatever else was
    alive then (the loop's handles and futures) to the oldest generation; a string is not tracked at all."""
    ts, mid = rec["timestamp"], rec["message_id"]
    return f"{ts if len(ts) == 27 else ts[:19] + '.000000Z'}{len(mid):02d}{mid}"


#: Where :func:`order_key`'s parts are.
ORDER_TS = 27
ORDER_ID = 29


def month_range(month: str) -> tuple[str, str]:
    """The ``timestamp_key`` bounds ``[first instant, first instant of the next month)`` of a month file."""
    year, mon = int(month[:4]), int(month[5:7])
    nxt = f"{year + 1:04d}-01" if mon == 12 else f"{year:04d}-{mon + 1:02d}"
    return f"{month}-01T00:00:00.000000Z", f"{nxt}-01T00:00:00.000000Z"


# -------------------------------------------------------------------------------------------------------------------
# the folder
def file_path(root: Path, key: FileKey) -> Path:
    return root / key[0] / f"{key[1]}.jsonl"


def read_generation(root: Path) -> bytes:
    try:
        return (root / GENERATION_NAME).read_bytes()
    except FileNotFoundError:
        return b""


def is_temp_file(name: str) -> bool:
    return _TEMP_FILE.match(name) is not None


def _guilds(root: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and _GUILD_DIR.match(e.name))
    except FileNotFoundError:
        return []


def list_files(root: Path) -> Iterator[tuple[FileKey, Path, os.stat_result]]:
    """Every month file, with its ``stat``, by guild then month."""
    for guild in _guilds(root):
        try:
            entries = sorted(os.scandir(root / guild), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for entry in entries:
            match = _MONTH_FILE.match(entry.name)
            if match and entry.is_file():
                yield (guild, match.group(1)), Path(entry.path), entry.stat()


def list_months(root: Path, guild_id: str | None, lo: str | None, hi: str | None) -> list[tuple[str, list[str]]]:
    """``[(month, [guilds with a file for it])]`` for the months that overlap ``[lo, hi)``, ascending."""
    guilds = [guild_id] if guild_id is not None else _guilds(root)
    months: dict[str, list[str]] = {}
    for guild in guilds:
        try:
            names = [e.name for e in os.scandir(root / guild) if e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            match = _MONTH_FILE.match(name)
            if not match:
                continue
            month = match.group(1)
            start, end = month_range(month)
            if (lo is None or end > lo) and (hi is None or start < hi):
                months.setdefault(month, []).append(guild)
    return [(m, sorted(g)) for m, g in sorted(months.items())]


# -------------------------------------------------------------------------------------------------------------------
async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a thread that cancellation does not abandon (see storage.cancellation); an OSError becomes a
    :class:`StorageIOError`. A caller holding a lock must not release it while its thread is still writing."""
    try:
        return await cancellation.run_in_thread(fn, *args)
    except OSError as exc:
        raise StorageIOError(f"{exc}", errno=exc.errno, path=None if exc.filename is None else str(exc.filename)) \
            from exc


async def run_holding(lock: AbstractAsyncContextManager[Any], fn: Callable[..., T], *args: Any) -> T:
    """:func:`run_in_thread` while holding ``lock``."""
    async with lock:
        return await run_in_thread(fn, *args)
