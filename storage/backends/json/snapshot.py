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
from collections.abc import Iterator, Mapping, MutableMapping
from itertools import chain
from pathlib import Path

import orjson

from ...codec import dumps_kept
from ...errors import CorruptDataError, DatabaseError
from .offsets import Spans, new_spans

__all__ = ["Collection", "Documents", "render_collection", "render_parts", "render_with_spans", "read_snapshot",
           "parse_lines"]

Collection = dict[str, bytes]
#: A collection as the store holds it: a :data:`Collection`, or one read lazily from its snapshot (json/lazy.py).
Documents = MutableMapping[str, bytes]
#: Per-document bookkeeping bytes in a snapshot (quotes, colon, comma, newline, indent): for compaction sizing.
OVERHEAD = 8
_NEEDS_FULL_PARSE = re.compile(rb'[\x00-\x1f\\"]')


#: Documents per part of :func:`render_parts`.
RENDER_PART = 2000


def render_collection(coll: Mapping[str, bytes]) -> bytes:
    """A snapshot file's bytes: the seed's shape, one document per line."""
    return b"".join(render_parts(coll))


def render_parts(coll: Mapping[str, bytes]) -> list[bytes]:
    """:func:`render_collection`'s bytes in parts of :data:`RENDER_PART` documents, to be written one after the
    other: compaction runs in a worker thread, but joining a 30 MB snapshot is one C call that holds the GIL (and
    with it a bot's event loop) for 20-40 ms; parts of a few hundred KB are joined in well under a ms each."""
    if not coll:
        return [b"{}\n"]
    dumps = orjson.dumps
    return _parts([b"  " + dumps(k) + b": " + v for k, v in coll.items()])


def _parts(lines: list[bytes]) -> list[bytes]:
    """A non-empty snapshot's lines joined :data:`RENDER_PART` at a time, with the braces: the file's parts."""
    parts = [(b"{\n" if start == 0 else b",\n") + b",\n".join(lines[start:start + RENDER_PART])
             for start in range(0, len(lines), RENDER_PART)]
    parts.append(b"\n}\n")
    return parts


def render_with_spans(coll: Mapping[str, bytes]) -> tuple[list[bytes], Spans | None]:
    """:func:`render_parts` plus each line's span for the key -> offset sidecar (offsets.py); no spans when a
    key needs a JSON escape (its bytes in the file would not be the key's UTF-8: such a file is read eagerly)."""
    if not coll:
        return [b"{}\n"], new_spans()
    dumps, crc32 = orjson.dumps, zlib.crc32
    hashes, offsets, lengths, key_ends, keys = spans = new_spans()
    lines = []
    pos = 2
    escaped = False
    for k, v in coll.items():
        quoted = dumps(k)
        line = b"  " + quoted + b": " + v
        lines.append(line)
        if b"\\" in quoted:
            escaped = True
        kb = quoted[1:-1]
        hashes.append(crc32(kb))
        keys += kb
        key_ends.append(len(keys))
        offsets.append(pos)
        lengths.append(len(line))
        pos += len(line) + 2  # ",\n" (the last line's "\n}" counts the same)
    return _parts(lines), None if escaped else spans


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


def _read_lines(raw: bytes, validate: bool, spans: Spans | None = None) -> tuple[Collection, int] | None:
    """The fast path for files in :func:`render_collection`'s layout; None means "use the general path".

    ``validate=False`` (the file's checksum matches what compaction wrote) skips parsing each document. ``spans``
    (when given) receives each line's key crc32, offset and length, for the key -> offset sidecar (offsets.py).
    """
    if raw == b"{}\n":
        return {}, 2
    if not (raw.startswith(b'{\n  "') and raw.endswith(b"\n}\n")):
        return None
    lines = _split_lines(raw, 2, len(raw) - 3)  # lazily: a list of every line held ~35 MB more at 100k members
    docs: Collection = {}
    size = 2
    loads = orjson.loads
    crc32 = zlib.crc32
    pos = 2
    line = next(lines)
    for following in chain(lines, (None,)):
        step = len(line) + 1
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
        if spans is not None:
            kb = line[3:end]
            spans[0].append(crc32(kb))
            spans[1].append(pos)
            spans[2].append(len(line))
            spans[4].extend(kb)
            spans[3].append(len(spans[4]))
        pos += step
        if following is not None:
            line = following
    return docs, size


def read_snapshot(path: Path, trusted_crc: int | None = None,
                  spans: Spans | None = None) -> tuple[Collection, int, int] | str:
    """A collection file's documents (encoded), approximate size and crc32, or why it is not a collection.

    Invalid JSON, an empty or a truncated file raises :class:`CorruptDataError` with the byte position: the file
    is left untouched for a human to look at, never replaced by ``{}`` (TinyDB #67). Valid JSON of another shape
    (a list, an object whose values are not objects: a bot's ``version.json``) is not an error, just not ours.
    ``trusted_crc`` is the crc32 compaction recorded for this file: when it matches, the documents are not
    re-parsed one by one (they are exactly the bytes this library wrote). ``spans`` receives the lines' spans
    (see :func:`_read_lines`) when the file is in compaction's layout, and is left empty otherwise.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatabaseError(f"cannot read {path}: {exc}") from exc
    if not raw or raw.isspace():
        raise CorruptDataError(f"{path} is empty ({len(raw)} bytes): expected a JSON object; the file was "
                               "left as it is", path=str(path), position=0)
    crc = zlib.crc32(raw)
    loaded = _read_lines(raw, validate=crc != trusted_crc, spans=spans)
    if loaded is None:
        if spans is not None:
            for column in spans:
                del column[:]
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


def parse_lines(raw: bytes) -> Collection | None:
    """The documents of a snapshot in compaction's layout whose documents were all checked before (the lazy
    collection's full read, json/lazy.py): None when ``raw`` is not in that layout."""
    loaded = _read_lines(raw, validate=False)
    return None if loaded is None else loaded[0]
