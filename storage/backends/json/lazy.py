"""A collection opened without parsing its snapshot: documents are read from the file on first use.

Why: an eager open reads every document of every snapshot into memory (100k members: a quarter of a second and
about 70 MiB), though a bot usually touches a fraction of them. With the key -> offset sidecar (offsets.py) an open
only checks the snapshot's crc32 (one pass, no Python object per document) and loads the table; :class:`Lazy`
then answers the store exactly as the ``{key: encoded document}`` dict of an eager load would:

* **point reads** (``get``, ``[]``: get, get_many, update, the journal replay) find the line through the table and
  ``pread`` it, check that the file was not changed in place since the open (fstat) and that the line starts with
  exactly ``  "<key>": ``, and keep the document's bytes (memory grows with what is used);
* **presence and sizes** (``in``, :meth:`Lazy.size_of`, and what :meth:`Lazy.swap`, :meth:`Lazy.replaced` and
  :meth:`Lazy.remove` need for the count and the size accounting) come from the table alone: it holds every key
  and its line's length, so a write of a key not read yet reads nothing from the file (a batch of 1,000 upserts
  paid a pread and an fstat per key before: 3.4-20 us each). A probe of the table still costs about 2 us of Python
  per key, so the first batch write lays a placeholder of each unread document's length over the known documents
  once (:meth:`Lazy.build_sizes`, in a worker thread; 15 MiB at 100k members) and a batch then sizes its keys
  with one C-level pass over that one dict (:meth:`Lazy.replaced`);
* **writes** (the journal's records applied in memory) go into the same dict of known documents, a delete as None;
* **compaction** merges the file with what changed (:meth:`Lazy.changes`, json/merged.py): the unchanged lines are
  copied as bytes, nothing is read whole;
* **everything that walks the collection** (``items``/``keys``/``values``/iteration: scans, queries, indexes,
  backups, forget, digests) first reads the whole file once into a plain dict (:meth:`Lazy.whole`), the
  changes laid over it; from then on the collection is that dict. The store does this in a worker thread before
  any walk on the event loop (JsonStore._whole) and then swaps the dict in (Tables.settle), so the loop never
  parses a snapshot and reads are back to a bare dict lookup.

Threads: the store's writes happen under its lock or on the loop; a worker thread may call :meth:`Lazy.whole`
meanwhile. A mutex makes each change and the final swap atomic with respect to one another; reads take no lock (a
read racing the swap sees the documents as they were just before it, which are the same).

The snapshot's descriptor stays open while the collection is lazy: a compaction by another process replaces the
file (a new inode), and this process goes on reading the bytes it checked, which is what its view is built on.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, MutableMapping, ValuesView
from collections.abc import Set as AbstractSet
from itertools import compress, islice, repeat
from operator import is_, is_not
from pathlib import Path
from typing import Any

from ...errors import CorruptDataError, ExternalChangeError
from .offsets import Offsets, document_sizes
from .snapshot import Collection, parse_lines

__all__ = ["SnapshotFile", "Lazy", "crc_of_fd", "replaced_in", "SIZES_AFTER"]

log = logging.getLogger("storage.json")

#: Bytes read per step when checksumming a snapshot (a read buffer, not the whole file, stays in memory).
READ_CHUNK = 1 << 20
#: A write of at least this many documents (a batch) into a lazy collection first has the snapshot's ``{key:
#: document length}`` built (:meth:`Lazy.build_sizes`), once.
SIZES_AFTER = 256
_MISSING: Any = object()
#: :meth:`Lazy.replaced`'s default for a key not known: false (documents are true), and never a known value.
_UNKNOWN: Any = ()
#: The type of the placeholder that stands for a document of the snapshot not read yet in ``Lazy._known`` once the
#: sizes are laid over it (:meth:`Lazy.build_sizes`): a ``range`` as long as the document (``len`` of it and of a
#: document's bytes are the same C-level call, and a document is never empty, so it is true like one); one object
#: per distinct length. Nothing else in that dict is a ``range``.
_UNREAD = range
#: Entries of the known documents filtered per step when the placeholders are left out (_without_placeholders).
PLACEHOLDER_STEP = 8192
crc32 = zlib.crc32
#: Lazy._sizes_state: not built, being built, built, and never (the collection is being read whole).
_NO_SIZES, _BUILDING, _BUILT, _NEVER = 0, 1, 2, 3


def crc_of_fd(fd: int, size: int) -> int:
    """The crc32 of the first ``size`` bytes of ``fd``, read a chunk at a time into one reused buffer."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    crc, at = 0, 0
    while at < size:
        n = os.preadv(fd, [buf], at)
        if n <= 0:
            break
        crc = zlib.crc32(view[:n], crc)
        at += n
    return crc


class SnapshotFile:
    """An open snapshot whose bytes were checked against its sidecar table; reads lines by key."""

    def __init__(self, path: Path, fd: int, st: os.stat_result, table: Offsets) -> None:
        self.path = path
        self.fd = fd
        self._stat = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.table = table
        # the table's columns, one attribute away (lookup is on the path of every first read and write of a key)
        self._offsets, self._lengths, self._slots = table.offsets, table.lengths, table.slots
        self._key_ends, self._keys = table.key_ends, table.keys
        self._mask = len(table.slots) - 1

    @classmethod
    def open(cls, path: Path, table_of: Any) -> tuple[SnapshotFile | None, str]:
        """The snapshot at ``path`` with the table ``table_of(size)`` returns, if that table was built for exactly
        these bytes (size and crc32); else (None, why). ``table_of`` returns an :class:`Offsets` or a reason."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            table = table_of(st.st_size)
            if isinstance(table, str):
                os.close(fd)
                return None, table
            if crc_of_fd(fd, st.st_size) != table.snapshot_crc:
                os.close(fd)
                return None, "built for another snapshot (checksum differs)"
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                os.close(fd)
                return None, "the snapshot changed while it was checked"
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        return cls(path, fd, st, table), ""

    @classmethod
    def adopt(cls, path: Path, table: Offsets) -> SnapshotFile:
        """The snapshot compaction just wrote from ``table``'s rendering (under the lock: nobody else writes it)."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if st.st_size != table.snapshot_size:
                raise CorruptDataError(f"{path} is not the file just written", path=str(path))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, st, table)

    @property
    def signature(self) -> tuple[int, int, int]:
        """The file's stat signature at the open, as Tables records it (``_signature``)."""
        return self._stat

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def crc(self) -> int:
        return self.table.snapshot_crc

    def check_unchanged(self) -> None:
        st = os.fstat(self.fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stat:
            raise ExternalChangeError(
                f"{self.path} was changed in place while the store had it open (the library owns its files while "
                "a store is open: stop the bot to edit them); reopen the store to read the edit",
                path=str(self.path))

    def find(self, key: str) -> int:
        """The index of ``key``'s document in this snapshot (file order), or -1: decided from the table alone (the
        keys are in it, offsets.py), so exactly and with no file read."""
        try:
            kb = key.encode()
        except UnicodeEncodeError:
            return -1  # a lone surrogate: no key in a UTF-8 file is that
        return self._find(kb)

    def _find(self, kb: bytes) -> int:
        slots, mask = self._slots, self._mask
        at = crc32(kb) & mask
        index = slots[at]
        if not index:
            return -1  # the usual answer for an absent key
        ends, keys, n = self._key_ends, self._keys, len(kb)
        for _probe in range(mask + 1):  # bounded: a slot table is never full (checked when read)
            index -= 1
            start = ends[index - 1] if index else 0
            if ends[index] - start == n and keys.startswith(kb, start):  # the key itself, not a hash: exact
                return index
            at = (at + 1) & mask
            index = slots[at]
            if not index:
                break
        return -1

    def size_of(self, key: str) -> int | None:
        """The length of the document stored under ``key`` (its encoded bytes), or None: no file read."""
        try:
            kb = key.encode()
        except UnicodeEncodeError:
            return None
        index = self._find(kb)
        if index < 0:
            return None
        return self._lengths[index] - len(kb) - 6  # the line less '  "<key>": '

    def lookup(self, key: str) -> bytes | None:
        """The document stored under ``key`` in this snapshot (its encoded bytes), or None."""
        index = self.find(key)
        if index < 0:
            return None
        line = os.pread(self.fd, self._lengths[index], self._offsets[index])
        self.check_unchanged()  # after the read: what it returned is what the file held at the open
        return self._document(key, line)

    def lookup_many(self, keys: list[str]) -> dict[str, bytes]:
        """``{key: document}`` of those of ``keys`` stored in this snapshot: a pread each, one fstat for all (after
        the last read, so every line returned is what the file held at the open)."""
        found: dict[str, bytes] = {}
        lines = []
        find, lengths, offsets, fd, pread = self.find, self._lengths, self._offsets, self.fd, os.pread
        for key in keys:
            index = find(key)
            if index >= 0:
                lines.append((key, pread(fd, lengths[index], offsets[index])))
        if lines:
            self.check_unchanged()
            for key, line in lines:
                found[key] = self._document(key, line)
        return found

    def _document(self, key: str, line: bytes) -> bytes:
        """The document of ``key``'s line, checked to be that key's: a table can never hand out another's."""
        prefix = b'  "' + key.encode() + b'": '
        if not line.startswith(prefix):  # the table was checked against these bytes: only a damaged disk gets here
            raise CorruptDataError(f"{self.path} does not match its offsets sidecar although their checksums do; "
                                   "delete the sidecar and reopen", path=str(self.path))
        return line[len(prefix):]

    def read_all(self) -> Collection:
        """Every document of the snapshot, in file order (one read; checked again by crc32).

        One ``pread`` of the whole file (it gives the GIL back while it reads), not 16 MB parts joined: the ``join``
        of a 30 MB snapshot kept the GIL, so a bot's event loop, 5-15 ms (``refresh_member_statistics``, issue 15).
        """
        size = self._stat[1]
        parts = []
        at = 0
        while at < size:
            chunk = os.pread(self.fd, min(size - at, 1 << 30), at)
            if not chunk:
                break
            parts.append(chunk)
            at += len(chunk)
        raw = b"".join(parts) if len(parts) != 1 else parts[0]
        del parts
        self.check_unchanged()
        if zlib.crc32(raw) != self.table.snapshot_crc:
            raise ExternalChangeError(f"{self.path} was changed in place while the store had it open; reopen the "
                                      "store to read the edit", path=str(self.path))
        docs = parse_lines(raw)
        if docs is None or len(docs) != self.table.count:
            raise CorruptDataError(f"{self.path} does not match its offsets sidecar although their checksums do; "
                                   "delete the sidecar and reopen", path=str(self.path))
        return docs


class Lazy(MutableMapping[str, bytes]):
    """``{key: encoded document}`` over a :class:`SnapshotFile`: see the module doc."""

    __slots__ = ("_count", "_known", "_mutex", "_sizes_state", "_whole", "file")

    def __init__(self, file: SnapshotFile) -> None:
        self.file = file
        #: documents read or written since the open (None: deleted); empty once whole. Once the sizes are laid over
        #: it (build_sizes) it holds every key of the snapshot too: an unread document as a placeholder (_UNREAD)
        #: of its length. Swapped for a new dict, never changed, outside the mutex.
        self._known: dict[str, bytes | range | None] = {}
        self._count = file.table.count
        #: the whole collection as a plain dict, once something walked it
        self._whole: dict[str, bytes] | None = None
        #: _BUILT: every key of the snapshot is in _known (a key absent from it has no document)
        self._sizes_state = _NO_SIZES
        self._mutex = threading.Lock()

    @property
    def is_whole(self) -> bool:
        return self._whole is not None

    def whole(self) -> dict[str, bytes]:
        """The collection as a plain dict (read once; then every call of this object goes to it). Long: in a worker
        thread, or under the store lock in one."""
        whole = self._whole
        if whole is not None:
            return whole
        with self._mutex:  # no sizes built from now on (placeholders already laid stay true: their lengths)
            self._sizes_state = _NEVER
        try:
            docs = self.file.read_all()
        except BaseException:
            with self._mutex:
                if self._whole is None:
                    self._sizes_state = _NO_SIZES  # a later batch may build them again
            raise
        with self._mutex:
            if self._whole is None:
                known = _without_placeholders(self._known)
                docs.update(known)  # type: ignore[arg-type]  # Nones removed just below
                for key in [key for key, raw in known.items() if raw is None]:
                    del docs[key]
                self._whole = docs
                self._known = {}
            return self._whole

    def changes(self) -> dict[str, bytes | None] | None:
        """A copy of what was read or written since the open (None: deleted), or None once the collection is
        whole: what a compaction merges with the file (json/merged.py). The copy is taken under the mutex, so a
        read on the loop adding a document meanwhile cannot disturb the worker thread that walks it (those are
        the file's own bytes, which the merge would write the same either way). The placeholders of unread
        documents are left out (in steps: the GIL, but not the mutex, is let go between them)."""
        with self._mutex:
            return None if self._whole is not None else _without_placeholders(self._known)

    # the snapshot's document sizes --------------------------------------------------------------------------------
    def _snapshot_size(self, key: str) -> int | None:
        """The length of ``key``'s document in the snapshot (None: not there), for a key not in the known
        documents: None once the sizes are laid over them (every key of the snapshot is), else by a probe of the
        table (about 2 us). Under the mutex (the state and the dict read together)."""
        if self._sizes_state == _BUILT:
            return None
        return self.file.size_of(key)

    @property
    def wants_sizes(self) -> bool:
        """Whether :meth:`build_sizes` would build anything (not built, not being built, not read whole)."""
        return self._sizes_state == _NO_SIZES

    def build_sizes(self) -> None:
        """Lay a placeholder of each document's length (the snapshot's ``{key: document length}``,
        offsets.document_sizes, each length as a shared ``range``: _UNREAD) under the known documents, as one dict
        that from now on answers every key's size and presence with one lookup. Why one dict: a batch's plan then
        probes one 100k-key dict per key and its apply updates that same dict, where a separate sizes dict cost
        a probe of the known documents, one of the sizes and the update (each a cache miss at 100k keys; 1,000
        keys: ~0.3 ms a pass, benchmarks/README.md). Long (20-40 ms of CPU at 100k documents): in a worker thread,
        which the store runs before a batch write (JsonBackend._put_encoded); its steps hold the GIL about a
        millisecond each (laying the known documents over the placeholders: a C-level update as long as they are).

        Why: a batch of 1,000 upserts of keys not read yet probed the table key by key (2 us each: 2 ms of the
        batch's 4.7 ms at 100k members); with the dict its sizes are a few C-level ``map`` calls (0.2 ms). Why not
        at open: the dict costs about 150 bytes a document (15 MiB at 100k members, against the 170 MiB of an
        eager open), which a bot that never writes a batch does not pay, and an open must stay cheap. Why not on
        single writes: a probe costs 2 us there, and building would take the GIL from their event loop."""
        with self._mutex:
            if self._sizes_state != _NO_SIZES:
                return
            self._sizes_state = _BUILDING
        try:
            laid = document_sizes(self.file.table, lambda: self._sizes_state == _BUILDING, _UNREAD)
        except Exception:  # MemoryError above all: the probes go on answering, exactly and slower
            log.warning("%s: could not build the document sizes of its table", self.file.path, exc_info=True)
            with self._mutex:
                if self._sizes_state == _BUILDING:
                    self._sizes_state = _NEVER
            return
        if laid is None:
            return
        with self._mutex:
            if self._sizes_state == _BUILDING:  # not once the collection is being read whole
                known = self._known
                items = iter(known.items())
                for _ in range(0, len(known), PLACEHOLDER_STEP):  # (C-level steps: the GIL let go between them)
                    laid.update(islice(items, PLACEHOLDER_STEP))  # what was read or written since the open wins
                self._known, self._sizes_state = laid, _BUILT

    @property
    def has_sizes(self) -> bool:
        return self._sizes_state == _BUILT

    def replaced(self, keys: AbstractSet[str]) -> tuple[int, int]:
        """What a put of each of ``keys`` replaces: (the sum of ``len(key) + len(document)`` over the keys that
        have a document, how many have one), for the size accounting and the count, with no file read, in C-level
        passes (``map`` of the known documents' ``get``, then the table's probe where needed). Reads only: a worker
        thread or the loop may call it while the store lock keeps the documents still (Tables.plan).

        Once the sizes are laid (:meth:`build_sizes`): one probe of the known documents per key, nothing else
        (a document, a placeholder as long as one, None or absent: no document). Before: one probe of the known
        documents per key, then one of the table per key not known; a batch none of whose keys were read or
        written since the open (``isdisjoint``, which stops at the first known key) skips to the table."""
        whole = self._whole
        if whole is not None:
            return replaced_in(whole, keys)
        if self._sizes_state == _BUILT:  # first: the state is set after its dict (build_sizes)
            return replaced_in(self._known, keys)  # type: ignore[arg-type]  # (placeholders: lengths, as documents)
        known = self._known
        size_of = self.file.size_of
        if known.keys().isdisjoint(keys):
            total = count = 0
            cold: Iterable[str] = keys
        else:
            held = list(map(known.get, keys, repeat(_UNKNOWN)))  # a document (or placeholder), None or _UNKNOWN
            warm = list(compress(keys, held))  # a document is never empty ("{}" at least): only documents select
            total, count = sum(map(len, warm)) + sum(map(len, filter(None, held))), len(warm)
            cold = list(compress(keys, map(is_, held, repeat(_UNKNOWN))))
            if not cold:
                return total, count
        olds = list(map(size_of, cold))
        found = list(compress(cold, olds))  # a size is never 0 (a document is at least "{}")
        return total + sum(map(len, found)) + sum(filter(None, olds)), count + len(found)

    # reads ----------------------------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        whole = self._whole
        if whole is not None:
            return whole.get(key, default)
        raw = self._known.get(key, _MISSING)
        if raw is _MISSING or type(raw) is _UNREAD:
            raw = self.file.lookup(key)
            if raw is not None:
                with self._mutex:
                    if self._whole is not None:
                        return self._whole.get(key, default)
                    raw = _keep(self._known, key, raw)
        return default if raw is None else raw

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """``{key: document}`` of the present ones among ``keys``: those not read yet in one
        :meth:`SnapshotFile.lookup_many` (one fstat for the lot, not one per key), then kept like :meth:`get`'s."""
        whole = self._whole
        if whole is not None:
            return {key: whole[key] for key in keys if key in whole}
        known = self._known
        out: dict[str, bytes] = {}
        cold = []
        for key in keys:
            raw = known.get(key, _MISSING)
            if raw is _MISSING or type(raw) is _UNREAD:
                cold.append(key)
            elif raw is not None:
                out[key] = raw
        if cold:
            read = self.file.lookup_many(cold)
            with self._mutex:
                if self._whole is not None:
                    return self.get_many(keys)
                known = self._known
                for key, raw in read.items():
                    raw = _keep(known, key, raw)
                    if raw is not None:
                        out[key] = raw
            if read:
                out = {key: out[key] for key in keys if key in out}  # in the order asked, like the dict's
        return out

    def __getitem__(self, key: str) -> bytes:
        raw = self.get(key)
        if raw is None:
            raise KeyError(key)
        result: bytes = raw
        return result

    def __contains__(self, key: object) -> bool:
        """Presence without reading the document (the table holds the keys): a change feed's delete, ``in``."""
        if type(key) is not str:
            return False
        whole = self._whole
        if whole is not None:
            return key in whole
        built = self._sizes_state == _BUILT  # first: the state is set after its dict (build_sizes)
        raw = self._known.get(key, _MISSING)
        if raw is _MISSING:
            return not built and self.file.find(key) >= 0
        return raw is not None

    def size_of(self, key: str) -> int | None:
        """The length of the document under ``key`` (its encoded bytes), or None when there is none: what the size
        accounting needs of the old document (Tables.plan), answered from the table for a key not read yet."""
        built = self._sizes_state == _BUILT  # first: the state is set after its dict (build_sizes)
        whole = self._whole
        raw = whole.get(key) if whole is not None else self._known.get(key, _MISSING)
        if raw is _MISSING:
            return None if built else self.file.size_of(key)
        return None if raw is None else len(raw)

    def __len__(self) -> int:
        whole = self._whole
        return len(whole) if whole is not None else self._count

    def __iter__(self) -> Iterator[str]:
        return iter(self.whole())

    def keys(self) -> KeysView[str]:
        return self.whole().keys()

    def items(self) -> ItemsView[str, bytes]:
        return self.whole().items()

    def values(self) -> ValuesView[bytes]:
        return self.whole().values()

    # writes ---------------------------------------------------------------------------------------------------------
    def __setitem__(self, key: str, raw: bytes) -> None:
        self.swap(key, raw)

    def swap(self, key: str, raw: bytes) -> int | None:
        """``self[key] = raw``, returning the length of the document it replaced (None: there was none): Tables.apply's
        put, which needs only that for its size accounting, so a key not read yet costs no file read."""
        with self._mutex:
            whole = self._whole
            if whole is not None:
                old = whole.get(key)
                whole[key] = raw
                return None if old is None else len(old)
            known = self._known
            held = known.get(key, _MISSING)  # a document, a placeholder as long as one, None or _MISSING
            known[key] = raw
            if held is _MISSING:
                size = self._snapshot_size(key)
                if size is None:
                    self._count += 1
                return size
            if held is None:
                self._count += 1
                return None
            return len(held)

    def put_planned(self, puts: Mapping[str, bytes], added: int) -> None:
        """``update(puts)`` in one step under the mutex, ``added`` of whose keys had no document (worked out by
        :meth:`replaced` or a probe per key, under the same store lock: Tables.plan): one C-level ``dict.update``
        (a batch: Tables.apply_plan, on the loop)."""
        with self._mutex:
            whole = self._whole
            if whole is not None:
                whole.update(puts)
            else:
                self._known.update(puts)
                self._count += added

    def remove(self, key: str) -> int | None:
        """``del self[key]`` if it is there, returning the length of the document removed (None: there was none,
        nothing changed): Tables.apply's delete, no file read."""
        with self._mutex:
            whole = self._whole
            if whole is not None:
                old = whole.pop(key, None)
                return None if old is None else len(old)
            known = self._known
            held = known.get(key, _MISSING)  # a document, a placeholder as long as one, None or _MISSING
            if held is _MISSING:
                size = self._snapshot_size(key)
            else:
                size = None if held is None else len(held)
            if size is not None:
                known[key] = None
                self._count -= 1
            return size

    def __delitem__(self, key: str) -> None:
        if self.remove(key) is None:
            raise KeyError(key)

    def __repr__(self) -> str:
        state = "whole" if self._whole is not None else f"{len(self._known)} known"
        return f"<Lazy {self.file.path} {len(self)} documents, {state}>"


def _keep(known: dict[str, bytes | range | None], key: str, raw: bytes) -> bytes | None:
    """Keep ``raw``, just read from the file, as ``key``'s document unless a write came first (under the mutex):
    the document to answer with."""
    held = known.get(key, _MISSING)
    if held is _MISSING or type(held) is _UNREAD:
        known[key] = raw
        return raw
    kept: bytes | None = held  # type: ignore[assignment]  # a document or None: a write's
    return kept


def _without_placeholders(known: dict[str, bytes | range | None]) -> dict[str, bytes | None]:
    """``known`` without the placeholders of unread documents, in C-level steps of PLACEHOLDER_STEP entries (each
    step one call that holds the GIL, and with it a bot's event loop, a fraction of a millisecond: the whole of a
    100k-key dict in one call held it 10-15 ms)."""
    values, items = iter(known.values()), iter(known.items())
    out: dict[str, bytes | None] = {}
    for _ in range(0, len(known), PLACEHOLDER_STEP):
        keep = list(map(is_not, map(type, islice(values, PLACEHOLDER_STEP)), repeat(_UNREAD)))
        out.update(compress(islice(items, PLACEHOLDER_STEP), keep))  # type: ignore[arg-type]
    return out


def replaced_in(docs: Mapping[str, bytes | None], keys: Iterable[str]) -> tuple[int, int]:
    """:meth:`Lazy.replaced` over a dict of documents (None: deleted), in C-level passes (a plain collection's
    batch, Tables.apply)."""
    keys = list(keys)
    olds = list(map(docs.get, keys))
    # a document is never empty (at least b"{}"): each old one is true, None (absent, deleted) false, so the olds
    # themselves select (one pass fewer than a list of ``is not None``)
    found = list(filter(None, olds))
    return sum(map(len, compress(keys, olds))) + sum(map(len, found)), len(found)  # type: ignore[arg-type]
