"""A lazy collection's next snapshot, streamed from its current file and the changes made since the open.

Why: compaction used to read a lazy collection whole (every document's bytes in a dict) and then render every
line again, so a store that opened in 50 MiB briefly held the snapshot three times over: 100k members took the
process from 67 to 160 MiB at its closing compaction (``bench_peers.py``'s whole-run peak, 4.5x SQLite's), and a
million members would have needed about a gigabyte for a moment. Most documents of a big collection did not change
since the open, and their lines are already in the file exactly as a new snapshot writes them (snapshot.py's
layout, ``  "<key>": <document>``, joined by ``,\\n``): they are copied as runs of bytes, a chunk at a time, and
only the changed lines are rendered. Memory is then what changed plus a chunk, and no document is parsed.

Order: the new file lists the documents as an eager compaction of the same collection would (the old file's
order with replaced documents in place and deleted ones left out, then the new keys in the order they were first
written), so the two ways give the same bytes (tests/test_json_merged_snapshot.py checks it).

Trust: the old file's bytes are checked as they are read (crc32 of the whole file against the sidecar table it
was opened with, and its inode, size and mtime unchanged), exactly what a whole read checks; a mismatch raises
before the new file replaces anything (``atomic_write`` removes its temp file). The spans of the new sidecar table
come out of the same pass, and the caller builds the table from them.
"""

from __future__ import annotations

import os
import zlib
from bisect import bisect_right
from collections.abc import Iterator

import orjson

from ...errors import ExternalChangeError
from .lazy import SnapshotFile
from .offsets import Spans, new_spans

__all__ = ["MergedSnapshot", "PART_BYTES"]

#: Bytes of unchanged lines copied per part written, and of changed lines gathered before a write: the buffer.
PART_BYTES = 1 << 18


class MergedSnapshot:
    """Iterate to get the new snapshot's bytes in parts (``atomic_write`` writes them one after the other); once
    exhausted, :attr:`size`, :attr:`crc` and :attr:`spans` describe what was produced.

    ``changes`` maps keys to their new encoded documents, None for a deleted key (``Lazy.changes``); it must
    not change while the parts are produced (the store lock is held, and the caller passes a copy).
    """

    def __init__(self, file: SnapshotFile, changes: dict[str, bytes | None]) -> None:
        self.file = file
        self.changes = changes
        self.size = 0
        self.crc = 0
        self.spans: Spans = new_spans()
        self._old = _Checked(file)

    @staticmethod
    def possible(changes: dict[str, bytes | None]) -> bool:
        """Whether the new file can have a sidecar table (no key needing a JSON escape; the old file's keys never
        do, since it has one): otherwise compaction takes the whole-read path, which writes no table."""
        dumps = orjson.dumps
        return not any(b"\\" in dumps(key) for key in changes)

    def __iter__(self) -> Iterator[bytes]:
        table = self.file.table
        changes = self.changes
        found = list(map(self.file.find, changes))  # each changed key's line in the old file, -1: a new key
        touched = sorted(i for i in found if i >= 0)
        appended = [key for key, at in zip(changes, found) if at < 0 and changes[key] is not None]
        count = table.count
        self._pos = 2
        self._first = True
        pending: list[bytes] = [b"{\n"]  # small pieces (changed lines, separators), written together
        held = 2
        start = 0
        for index in [*touched, count]:
            if start < index:  # the unchanged run [start, index): copied, a part at a time, each written as it is
                for sep, part in self._copy_run(start, index):
                    pending.append(sep)
                    yield from self._emit(pending)
                    pending, held = [], 0
                    yield from self._emit([part])
            if index < count:
                key = table.keys[table.key_ends[index - 1] if index else 0:table.key_ends[index]].decode()
                raw = changes[key]
                if raw is not None:
                    held += self._line(pending, key, raw)
            start = index + 1
            if held >= PART_BYTES:
                yield from self._emit(pending)
                pending, held = [], 0
        for key in appended:
            raw = changes[key]
            assert raw is not None
            held += self._line(pending, key, raw)
            if held >= PART_BYTES:
                yield from self._emit(pending)
                pending, held = [], 0
        self._old.finish()  # the rest of the old file read and the whole checked: before the last part
        if self._first:  # no document left: an empty collection's file, as snapshot.py writes it
            pending = [b"{}\n"]
        else:
            pending.append(b"\n}\n")
        yield from self._emit(pending)

    def _emit(self, pieces: list[bytes]) -> Iterator[bytes]:
        part = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if part:
            self.crc = zlib.crc32(part, self.crc)
            self.size += len(part)
            yield part

    def _separator(self) -> bytes:
        if self._first:
            self._first = False
            return b""
        self._pos += 2
        return b",\n"

    def _line(self, pending: list[bytes], key: str, raw: bytes) -> int:
        """A changed document's line (and the separator before it) added to ``pending``, its span noted; returns the
        bytes added."""
        sep = self._separator()
        kb = key.encode()
        line = b'  "' + kb + b'": ' + raw
        hashes, offsets, lengths, key_ends, keys = self.spans
        hashes.append(zlib.crc32(kb))
        offsets.append(self._pos)
        lengths.append(len(line))
        keys += kb
        key_ends.append(len(keys))
        self._pos += len(line)
        pending.append(sep)
        pending.append(line)
        return len(sep) + len(line)

    def _copy_run(self, start: int, stop: int) -> Iterator[tuple[bytes, bytes]]:
        """The old file's lines ``start`` to ``stop - 1`` as (separator before, bytes), a part of at most about
        :data:`PART_BYTES` at a time, their spans noted (shifted to where they land in the new file)."""
        table = self.file.table
        old_offsets, old_lengths, old_ends, old_keys = table.offsets, table.lengths, table.key_ends, table.keys
        hashes, offsets, lengths, key_ends, keys = self.spans
        crc32 = zlib.crc32
        while start < stop:
            first = old_offsets[start]
            # the lines starting within PART_BYTES of the first (at least one)
            end = max(start + 1, bisect_right(old_offsets, first + PART_BYTES, start, stop))
            last = end - 1
            sep = self._separator()
            shift = self._pos - first
            blob_at = old_ends[start - 1] if start else 0
            blob_shift = len(keys) - blob_at
            offsets.extend([old_offsets[i] + shift for i in range(start, end)])
            lengths.extend(old_lengths[start:end])
            key_ends.extend([old_ends[i] + blob_shift for i in range(start, end)])
            run_keys = old_keys[blob_at:old_ends[last]]
            ends = old_ends[start:end]
            hashes.extend([crc32(run_keys[(ends[j - 1] if j else blob_at) - blob_at:ends[j] - blob_at])
                           for j in range(len(ends))])
            keys += run_keys
            stop_byte = old_offsets[last] + old_lengths[last]
            self._pos += stop_byte - first
            yield sep, self._old.take(first, stop_byte)
            start = end


class _Checked:
    """The old snapshot read front to back once, with its crc32: :meth:`take` reads the ranges asked for (in
    increasing order) and checksums what lies between them as it skips it; :meth:`finish` reads the rest and checks
    the whole against the table. Nothing is kept between calls."""

    def __init__(self, file: SnapshotFile) -> None:
        self.file = file
        self.size = file.signature[1]
        self.crc = 0
        self.read_to = 0  # bytes read (and checksummed) so far

    def _read(self, n: int) -> bytes:
        chunk = os.pread(self.file.fd, n, self.read_to)
        if len(chunk) != n:
            raise ExternalChangeError(f"{self.file.path} got shorter while the store had it open; reopen the store",
                                      path=str(self.file.path))
        self.crc = zlib.crc32(chunk, self.crc)
        self.read_to += n
        return chunk

    def _skip_to(self, at: int) -> None:
        while self.read_to < at:
            self._read(min(PART_BYTES, at - self.read_to))  # gaps: deleted or replaced lines

    def take(self, start: int, stop: int) -> bytes:
        self._skip_to(start)
        return self._read(stop - start)

    def finish(self) -> None:
        self._skip_to(self.size)
        self.file.check_unchanged()
        if self.crc != self.file.table.snapshot_crc:
            raise ExternalChangeError(f"{self.file.path} was changed in place while the store had it open; reopen "
                                      "the store to read the edit", path=str(self.file.path))
