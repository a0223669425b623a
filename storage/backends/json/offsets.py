"""The key -> offset sidecar of a snapshot: ``storage.<collection>.offsets``, a cache that lets a store open without
parsing the snapshot.

A snapshot in compaction's layout (snapshot.py: one document per line) is found again line by line from this table:
for each document in file order, where its line starts and how long it is (without the comma and newline), and its
key (one blob of every key's UTF-8 plus where each ends), plus an open-addressing hash table of slots over them
(placed by the crc32 of the key) (built by a plain loop, not one long sort: a
C call that sorts 100k entries holds the GIL, and with it a bot's event loop, for tens of ms). Opening a collection
then costs a read of this table (12-16 bytes a document plus its key, and 4 bytes a slot) and one checksum pass over
the snapshot, instead of a parse of every document (json/lazy.py reads them on first use). Offsets are 4 bytes when
the snapshot is under 4 GiB (8 above); no per-document hash is kept, the key itself decides a probe.

Why the keys are in the table: a write needs to know whether its key is present and how long the document it
replaces is (the count and the size accounting), never the old document itself. With the keys in memory both are
answered exactly with no file read; a table of key hashes alone can only say "maybe" and each such answer cost a
``pread`` and an ``fstat`` (3.4 us quiet, up to 20 us on a loaded machine: a batch of 1,000 upserts of members not
read yet got 1.5-2.5x slower). A 64-bit hash would make a wrong "present" unlikely, not impossible.

It is only a cache, never the truth, so it can never make a wrong answer possible:

* It records the snapshot's size and crc32 it was built from, and carries a crc32 of its own bytes: a truncated,
  corrupt or hand-edited sidecar, or one left over from another snapshot (a hand edit of ``members.json``, a
  compaction that crashed between the two files, a restore) fails :func:`read_offsets` and is rebuilt from the
  snapshot by a full read.
* It is built only from a snapshot whose every document was checked (snapshot.py's fast path, or compaction's own
  rendering), and only when no key needs a JSON escape, so a document found through it is exactly the bytes an
  eager load would have kept, and its keys and line lengths are the snapshot's: presence and sizes are answered
  from the table alone (its keys compared byte for byte, never a hash), which the two checksums bind to the bytes
  of the snapshot opened. (A sidecar forged on purpose with a correct checksum is outside what a checksum guards.)
* Every document read through it is checked again: its line must start with exactly ``  "<key>": `` (lazy.py).

Written atomically (temp file, fsync, rename): a crash while writing leaves the old sidecar (stale: rebuilt) or a
temp file (removed at the next open), never a torn file that passes the checks. A person reading ``config/`` sees
the same JSON files as before; this file is the store's own (every ``storage.*`` entry is), not data: backups skip
it and deleting it only makes the next open slower. Only a snapshot of :data:`MIN_SNAPSHOT_BYTES` or more gets one
(:func:`wants_sidecar`): a small bot's folder holds none.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from operator import sub
from pathlib import Path
from typing import Any, BinaryIO

from ...fsutil import atomic_write

__all__ = ["Offsets", "Spans", "new_spans", "offsets_name", "build_offsets", "render_parts", "render_offsets",
           "read_offsets", "write_offsets", "document_sizes", "SIZES_STEP", "MIN_SNAPSHOT_BYTES", "wants_sidecar"]

#: A snapshot smaller than this gets no sidecar (see :func:`wants_sidecar` for the figures).
MIN_SNAPSHOT_BYTES = 256 * 1024

MAGIC = b"storage offsets 2\n"
#: snapshot size, snapshot crc32, documents, slots, approximate collection size (snapshot.py's accounting), bytes of
#: the keys blob
_HEADER = struct.Struct("<QIIIQQ")
_TRAILER = struct.Struct("<I")
#: :func:`document_sizes` works this many keys per step (its C-level passes hold the GIL about 1 ms).
SIZES_STEP = 4096
#: bytes of the table per document besides its offset: line length (4), end of its key in the blob (4); per slot (4);
#: then the keys blob
ENTRY_BYTES = 8
SLOT_BYTES = 4

#: Per document, in file order: key crc32, offset of its line, length of its line (comma and newline excluded), end
#: of its key in the keys blob; and the blob (every key's UTF-8, in file order).
Spans = tuple["array[int]", "array[int]", "array[int]", "array[int]", bytearray]


def new_spans() -> Spans:
    return array("I"), array("Q"), array("I"), array("I"), bytearray()


if array("I").itemsize != 4 or array("Q").itemsize != 8:  # pragma: no cover - every supported platform
    raise ImportError("storage: array('I') must be 4 bytes and array('Q') 8 bytes")


@dataclass(frozen=True)
class Offsets:
    """A validated sidecar's table: the documents' spans in file order, their keys (document ``i``'s key is
    ``keys[key_ends[i - 1]:key_ends[i]]``, from 0 for the first), and ``slots`` (a power of two of them, at least
    twice the documents): slot ``crc32(key) & (len(slots) - 1)`` and the ones after it, up to an empty one (0), hold
    the 1-based indexes of the documents whose key may be that key."""

    offsets: array[int]
    lengths: array[int]
    key_ends: array[int]
    keys: bytes | bytearray
    slots: array[int]
    snapshot_size: int
    snapshot_crc: int
    approx_size: int

    @property
    def count(self) -> int:
        return len(self.lengths)


def document_sizes(table: Offsets, go_on: Callable[[], bool] = lambda: True,
                   unit: Callable[[int], Any] = int) -> dict[str, Any] | None:
    """``{key: length of its document}`` for every document of the table: what :meth:`SnapshotFile.size_of` answers
    per key by a probe of the slots (about 2 us of Python each), as one dict a batch can look up with C-level
    ``map`` calls (json/lazy.py). About 150 bytes a document (100k members: 15 MiB; the key's str is most of it), so
    it is built only for a collection that takes batch writes, in a worker thread, :data:`SIZES_STEP` keys at a
    time (each step's C-level passes hold the GIL, and with it a bot's event loop); None as soon as ``go_on()``,
    asked after each step, says to stop. ``unit``: what stands for a length (one object per distinct length; a
    lazy collection's placeholders, json/lazy.py, are ``range`` objects as long as the document)."""
    blob = bytes(table.keys)
    ends = table.key_ends
    lengths = table.lengths
    ascii_keys = blob.isascii()
    text = blob.decode("ascii") if ascii_keys else ""
    shared: dict[int, Any] = {}  # one object per distinct length, not one per document
    out: dict[str, Any] = {}
    for lo in range(0, len(ends), SIZES_STEP):
        hi = min(len(ends), lo + SIZES_STEP)
        stops = ends[lo:hi]
        starts = array("I", [ends[lo - 1] if lo else 0])
        starts.extend(stops[:-1])
        # (slice objects made and dropped one at a time: held in a list, 100k of them set off the garbage collector,
        # whose full pass then walked everything the process holds, for tens of ms)
        if ascii_keys:  # a character per byte: the key's str sliced from the text at the same spans
            keys = list(map(text.__getitem__, map(slice, starts, stops)))
            key_bytes = list(map(len, keys))
        else:
            raw = list(map(blob.__getitem__, map(slice, starts, stops)))
            keys = list(map(bytes.decode, raw))
            key_bytes = list(map(len, raw))
        # a line is '  "<key>": <document>': its length less the key's bytes and the 6 around them
        sizes = list(map(sub, map(sub, lengths[lo:hi], key_bytes), repeat(6)))
        fresh = set(sizes).difference(shared)
        shared.update(zip(fresh, map(unit, fresh)))
        out.update(zip(keys, map(shared.__getitem__, sizes)))
        if not go_on():
            return None
    return out


def offsets_name(collection: str) -> str:
    """``storage.<collection>.offsets``: ``storage.`` marks the store's own files; no collection file ends so."""
    return f"storage.{collection}.offsets"


def wants_sidecar(snapshot_size: int) -> bool:
    """Whether a snapshot of ``snapshot_size`` bytes gets a sidecar. Below :data:`MIN_SNAPSHOT_BYTES` (256 KiB,
    about 870 seed-shaped members) it is read whole at open, no sidecar is written, and one left from when it was
    larger (or by an older version, which wrote one beside every snapshot) is removed by the next writable open
    or compaction (tables.py).

    Why there: a lazy open is faster than a whole read from about 60 KiB on, but by under 2 ms up to 256 KiB, while
    the sidecar is one more file in the folder a person reads and one more fsynced write at every compaction. From
    256 KiB up the gap grows with the size, and so does the memory a whole read holds. Measured with
    ``benchmarks/bench_offsets_threshold.py --reps 31`` (one store per size, the two ways alternated in one process,
    medians; load 1.9; 2-core VM), open + first get, then one save + ``compact()``, sidecar -> whole:

    ==========  ========  ===================  ===============
    members     snapshot  open + get, ms       compact, ms
    ==========  ========  ===================  ===============
    10          2.9 KiB   0.86 -> 0.59         1.58 -> 1.19
    100         29 KiB    0.76 -> 0.70         1.86 -> 1.36
    200         59 KiB    0.76 -> 0.89         2.63 -> 1.50
    600         177 KiB   0.97 -> 2.26         5.43 -> 3.20
    900         265 KiB   1.05 -> 2.86         6.53 -> 3.49
    3,000       887 KiB   1.82 -> 8.79         19.9 -> 9.57
    10,000      2.9 MiB   3.54 -> 31.8         66.6 -> 29.8
    ==========  ========  ===================  ===============

    (A lazy collection's compaction then read it whole first, hence the right column; json/merged.py now copies
    its unchanged lines instead; at 100k members the lazy
    open is 18 ms against 184 ms, and 48 against 112 MiB of RSS: ``bench_peers.py``, the issue 15 note.)"""
    return snapshot_size >= MIN_SNAPSHOT_BYTES


def build_offsets(spans: Spans, snapshot_size: int, snapshot_crc: int, approx_size: int) -> Offsets:
    """The table of a snapshot from its spans in file order (the slots built here)."""
    hashes, offsets, lengths, key_ends, keys = spans
    size = 8
    while size < 2 * len(hashes):
        size *= 2
    mask = size - 1
    slots = array("I", bytes(SLOT_BYTES * size))
    for index, h in enumerate(hashes, 1):
        at = h & mask
        while slots[at]:
            at = (at + 1) & mask
        slots[at] = index
    if _offset_type(snapshot_size) != offsets.typecode:
        offsets = array(_offset_type(snapshot_size), offsets)
    return Offsets(offsets, lengths, key_ends, keys, slots, snapshot_size, snapshot_crc, approx_size)


def _offset_type(snapshot_size: int) -> str:
    """The array type of the offsets column: 4 bytes while every offset fits (a snapshot under 4 GiB)."""
    return "I" if snapshot_size < 1 << 32 else "Q"


def _little(values: array[int]) -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array(values.typecode, values)  # pragma: no cover - big-endian machines
    swapped.byteswap()  # pragma: no cover
    return swapped.tobytes()  # pragma: no cover


def render_parts(table: Offsets) -> list[bytes]:
    """The sidecar file's bytes in parts (header, each column, keys, trailer): written one after the other, so the
    file is never held whole a second time (a compaction's memory, json/merged.py)."""
    parts = [MAGIC + _HEADER.pack(table.snapshot_size, table.snapshot_crc, table.count, len(table.slots),
                                  table.approx_size, len(table.keys)),
             _little(table.offsets), _little(table.lengths), _little(table.key_ends), _little(table.slots),
             bytes(table.keys)]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_TRAILER.pack(crc))
    return parts


def render_offsets(table: Offsets) -> bytes:
    return b"".join(render_parts(table))


def write_offsets(path: Path, table: Offsets, *, sync_dir: bool) -> None:
    atomic_write(path, render_parts(table), sync_dir=sync_dir)


def read_offsets(path: Path, snapshot_size: int) -> Offsets | str:
    """The sidecar's table if it is whole and was built for a snapshot of ``snapshot_size`` bytes, else why not.
    (The caller then checks the snapshot's crc32 against :attr:`Offsets.snapshot_crc`.) The columns are read
    straight into their arrays: no second copy of the file in memory, even for a moment."""
    try:
        with open(path, "rb") as f:
            return _read_table(f, os.fstat(f.fileno()).st_size, snapshot_size)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc})"


def _read_table(f: BinaryIO, file_size: int, snapshot_size: int) -> Offsets | str:
    head = f.read(len(MAGIC) + _HEADER.size)
    if len(head) < len(MAGIC) + _HEADER.size or not head.startswith(MAGIC):
        return "not a sidecar of this version"
    size, crc, count, nslots, approx, keys_size = _HEADER.unpack_from(head, len(MAGIC))
    offset_type = _offset_type(size)
    entry = ENTRY_BYTES + array(offset_type).itemsize
    if file_size != len(head) + count * entry + nslots * SLOT_BYTES + keys_size + _TRAILER.size:
        return "truncated or padded"
    if nslots < 2 * count or nslots < 8 or nslots & (nslots - 1):
        return "its slot table has the wrong size"
    if size != snapshot_size:
        return "built for another snapshot (size differs)"
    own = zlib.crc32(head)
    columns = []
    for typecode, n in ((offset_type, count), ("I", count), ("I", count), ("I", nslots)):
        column = array(typecode)
        try:
            column.fromfile(f, n)
        except EOFError:
            return "truncated"
        own = zlib.crc32(column, own)  # the bytes as stored (little-endian), before any swap
        if sys.byteorder != "little":  # pragma: no cover - big-endian machines
            column.byteswap()
        columns.append(column)
    keys = f.read(keys_size)
    own = zlib.crc32(keys, own)
    trailer = f.read(_TRAILER.size)
    if len(keys) != keys_size or len(trailer) != _TRAILER.size or _TRAILER.unpack(trailer)[0] != own:
        return "its checksum does not match"
    key_ends = columns[2]
    if (key_ends[-1] if count else 0) != keys_size:
        return "its keys do not add up"
    return Offsets(columns[0], columns[1], key_ends, keys, columns[3], size, crc, approx)
