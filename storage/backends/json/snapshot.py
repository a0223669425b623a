"""The snapshot files of the JSON backend: ``<collection>.json``, the seed's shape, one document per line.

Written by compaction as::

    {
      "987654321_123456789": {"user_id":"123456789",...},
      "987654321_42": {...}
    }

which is plain JSON (``json.load`` reads it, as the seed did), readable and diffable, and, because every document
sits on a line of its own, can be loaded without building the whole file as Python objects: each document's bytes
are checked with ``orjson.loads`` and kept as they are. Any file not in exactly that layout (the seed's own
``indent=2`` file, a hand edit) takes the general path: one full parse, then each document re-encoded.
"""

from __future__ import annotations

import gc
import re
import zlib
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import orjson

from ...codec import dumps_kept
from ...errors import CorruptDataError, DatabaseError

__all__ = ["Collection", "render_collection", "render_parts", "read_snapshot"]

Collection = dict[str, bytes]
#: Per-document bookkeeping bytes in a snapshot (quotes, colon, comma, newline, indent): for compaction sizing.
OVERHEAD = 8
_NEEDS_FULL_PARSE = re.compile(rb'[\x00-\x1f\\"]')


#: Documents per part of :func:`render_parts`.
RENDER_PART = 2000


def render_collection(coll: Collection) -> bytes:
    """A snapshot file's bytes: the seed's shape, one document per line."""
    return b"".join(render_parts(coll))


def render_parts(coll: Collection) -> list[bytes]:
    """:func:`render_collection`'s bytes in parts of :data:`RENDER_PART` documents, to be written one after the
    other: compaction runs in a worker thread, but joining a 30 MB snapshot is one C call that holds the GIL (and
    with it a bot's event loop) for 20-40 ms; parts of a few hundred KB are joined in well under a ms each."""
    if not coll:
        return [b"{}\n"]
    dumps = orjson.dumps
    lines = [b"  " + dumps(k) + b": " + v for k, v in coll.items()]
    parts = [(b"{\n" if start == 0 else b",\n") + b",\n".join(lines[start:start + RENDER_PART])
             for start in range(0, len(lines), RENDER_PART)]
    parts.append(b"\n}\n")
    return parts


#: Bytes split per C call when loading (see _split_lines).
SPLIT_CHUNK = 1 << 18


def _split_lines(raw: bytes, start: int, stop: int) -> Iterator[bytes]:
    """``raw[start:stop].split(b"\\n")``, a slice of about SPLIT_CHUNK bytes at a time: the store opens in a worker
    thread, but one split (or slice) of a 30 MB snapshot is a single C call that holds the GIL, and with it a
    bot's event loop, for 20 ms and more; between slices the loop gets the GIL back."""
    while True:
        end = raw.find(b"\n", start + SPLIT_CHUNK, stop) if start + SPLIT_CHUNK < stop else -1
        if end < 0:
            yield from raw[start:stop].split(b"\n")
            return
        yield from raw[start:end].split(b"\n")
        start = end + 1


def _read_lines(raw: bytes, validate: bool) -> tuple[Collection, int] | None:
    """The fast path for files in :func:`render_collection`'s layout; None means "use the general path".

    ``validate=False`` (the file's checksum matches what compaction wrote) skips parsing each document.
    """
    if raw == b"{}\n":
        return {}, 2
    if not (raw.startswith(b'{\n  "') and raw.endswith(b"\n}\n")):
        return None
    lines = _split_lines(raw, 2, len(raw) - 3)  # lazily: a list of every line held ~35 MB more at 100k members
    docs: Collection = {}
    size = 2
    loads = orjson.loads
    line = next(lines)
    for following in chain(lines, (None,)):
        if following is not None:  # every line but the last ends with a comma
            if not line.endswith(b","):
                return None
            line = line[:-1]
        end = line.find(b'": ', 3)
        if end < 0 or not line.startswith(b'  "') or _NEEDS_FULL_PARSE.search(line, 3, end):
            return None  # escapes in the key, or not our layout
        doc = line[end + 3:]
        try:
            key = line[3:end].decode("utf-8")
            if validate and type(loads(doc)) is not dict:
                return None
        except (UnicodeDecodeError, orjson.JSONDecodeError):
            return None  # the general path reports the exact position
        docs[key] = doc
        size += len(key) + len(doc) + OVERHEAD
        if following is not None:
            line = following
    return docs, size


def read_snapshot(path: Path, trusted_crc: int | None = None) -> tuple[Collection, int, int] | str:
    """A collection file's documents (encoded), approximate size and crc32, or why it is not a collection.

    Invalid JSON, an empty or a truncated file raises :class:`CorruptDataError` with the byte position: the file
    is left untouched for a human to look at, never replaced by ``{}`` (TinyDB #67). Valid JSON of another shape
    (a list, an object whose values are not objects: a bot's ``version.json``) is not an error, just not ours.
    ``trusted_crc`` is the crc32 compaction recorded for this file: when it matches, the documents are not
    re-parsed one by one (they are exactly the bytes this library wrote).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatabaseError(f"cannot read {path}: {exc}") from exc
    if not raw or raw.isspace():
        raise CorruptDataError(f"{path} is empty ({len(raw)} bytes): expected a JSON object; the file was "
                               "left as it is", path=str(path), position=0)
    crc = zlib.crc32(raw)
    loaded = _read_lines(raw, validate=crc != trusted_crc)
    if loaded is None:
        collecting = gc.isenabled()
        gc.disable()  # a big parse allocates millions of objects: the cyclic GC would rescan them again and again
        try:
            general = _read_general(path, raw)
        finally:
            if collecting:
                gc.enable()
        if isinstance(general, str):
            return general
        loaded = general
    return loaded[0], loaded[1], crc


def _read_general(path: Path, raw: bytes) -> tuple[Collection, int] | str:
    """Any valid JSON file: one full parse, then each document re-encoded."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptDataError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}, byte {exc.pos}): {exc.msg}; "
            "the file was left as it is", path=str(path), position=exc.pos) from exc
    if type(obj) is not dict:
        return f"it holds a JSON {type(obj).__name__}, not an object of documents"
    docs: Collection = {}
    size = 2
    for key, doc in obj.items():
        if type(doc) is not dict:
            return f"its value for {key!r} is not an object, so it is not a collection of documents"
        encoded = dumps_kept(doc)
        docs[key] = encoded
        size += len(key) + len(encoded) + OVERHEAD
    return docs, size
