"""The append-only journal of the JSON backend: one fsynced line per committed change.

Why a journal: the seed (and Red's JSON driver) rewrote the whole file on every save, so a save cost grew with the
store (about 2 s at 100k members). Appending one line and fsyncing it costs the size of the change. The snapshot
files stay plain JSON in the seed's shape; the journal holds what happened since, and compaction folds it back in
(Redis AOF style).

Format: the first line is a header ``{"storage_journal": 1, "generation": N, "snapshots": {name: crc32}}`` (the
checksums of the snapshot files the compaction that started this generation left, so that opening can trust
them without re-validating every document); every other line is one committed
record, a JSON array of operations ``["p", collection, key, doc]`` (put), ``["p", collection, key, doc, expires]``
(a put of a document that expires at ``expires``, canonical UTC text; see storage/expiry.py) or
``["d", collection, key]`` (delete). A journal holding expiring puts is refused by library versions from before
expiry existed (a clear "bad operation" error; nothing is lost).
Every operation is a whole-document put or a delete, so replaying a journal onto a snapshot that already contains
some of it gives the same result: that is what makes a crash mid-compaction harmless.

The header may also say ``"previous_end"`` (where the previous generation's committed records end: followers
read the old file to there, then go on in this one) and ``"copied"`` (a rebase started this generation with that
many bytes of the previous one's records). A compaction keeps the file it replaces as ``storage.journal.<N>``
until the next one (:meth:`Journal.keep_previous`), for followers that miss a whole generation.

Preallocation (json/filler.py): past the last record the file may hold a run of newlines, written ahead so that
later records overwrite them instead of growing the file (an fdatasync that commits no size change is about 1.5x
faster). So records are written with ``pwrite`` at :attr:`Journal.offset`, never appended with ``O_APPEND``, and a
reader skips blank lines. The end of the records is the committed end published in ``storage.lock`` (json/lock.py)
or, when that is unknown (after a reboot), the end of the last record that parses.

Crash rules: one commit (a group of concurrent writers' changes) is one line written by one ``pwrite``; it is
acknowledged only after its fsync, and the next write starts only after that, so only the *last* record can be
torn. A torn last record (no newline, not parseable, or cut into pieces by filler the write did not reach) is
dropped with a warning and truncated away under the lock (the filler after it goes too: the next record grows the
file again); an unparseable line followed by a record that parses is real corruption and raises
:class:`CorruptDataError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import orjson

from ...codec import check_collection, check_key, dumps_kept
from ...errors import CorruptDataError, ValidationError
from ...expiry import from_micros, to_micros
from ...fsutil import atomic_write, pwrite_all, sync_fd
from ...models import iso_utc, parse_timestamp
from ...offload import Pacer
from .filler import FILL, MIN_CHUNK, NO_ROOM, chunk_for, is_blank, next_nonblank

__all__ = ["Journal", "Follow", "Op", "encode_record", "encode_puts", "encode_in_slices", "record_digest",
           "JOURNAL_FORMAT", "SEARCH_MAX", "read_header"]

log = logging.getLogger("storage.journal")

JOURNAL_FORMAT = 1
#: An operation as the store applies it: ``("p", collection, key, encoded_doc)``, ``("p", collection, key,
#: encoded_doc, expires)`` (expires: microseconds since the epoch, see storage/expiry.py) or ``("d", collection,
#: key)``.
Op = tuple[str, str, str, bytes] | tuple[str, str, str] | tuple[str, str, str, bytes, int]


def expiry_text(micros: int) -> bytes:
    """An expiry instant as it is written to disk (journal, ``storage.expires.json``): canonical UTC text."""
    return orjson.dumps(iso_utc(from_micros(micros)))


def parse_expiry(value: object) -> int:
    """An expiry read from disk as microseconds; ValueError when it is not a timestamp."""
    if type(value) is not str:
        raise ValueError(f"expiry {value!r:.40} is not a timestamp")
    try:
        return to_micros(parse_timestamp(value, "expires"))
    except (ValidationError, OverflowError):
        raise ValueError(f"expiry {value!r:.40} is not a timestamp") from None


#: orjson's already-serialized JSON (recent orjson versions; None in older ones): a whole record in one ``dumps``.
_FRAGMENT: Callable[[bytes], object] | None = getattr(orjson, "Fragment", None)


def encode_record(ops: Sequence[Op]) -> bytes:
    """One journal line; documents are spliced in already encoded (no second serialization).

    With ``orjson.Fragment`` the record is one ``dumps`` of the operations with the documents as fragments: for
    1,000 member puts 0.17 ms against 1.2 ms of concatenating each operation's parts (same bytes; older orjson
    versions take that way). When no operation carries an expiry (the usual record), the operation tuples are
    dumped as they are (a tuple is written as an array) and orjson hands each document's bytes, which it does not
    serialize itself, to ``default``: ``Fragment``, which splices them in. No list per operation: 0.19 -> 0.09 ms
    for 1,000 puts."""
    fragment = _FRAGMENT
    if fragment is not None:
        if type(ops) is list and max(map(len, ops), default=0) <= 4:  # puts without expiry and deletes
            return orjson.dumps(ops, fragment, orjson.OPT_APPEND_NEWLINE)
        return orjson.dumps([[op[0], op[1], op[2], fragment(op[3])] if len(op) == 4  # type: ignore[misc]
                             else _row(op, fragment) for op in ops], option=orjson.OPT_APPEND_NEWLINE)
    parts = []
    for op in ops:
        head = b'["' + op[0].encode() + b'",' + orjson.dumps(op[1]) + b"," + orjson.dumps(op[2])
        if op[0] != "p":
            parts.append(head + b"]")
        elif len(op) == 5:
            parts.append(head + b"," + op[3] + b"," + expiry_text(op[4]) + b"]")  # type: ignore[misc]
        else:
            parts.append(head + b"," + op[3] + b"]")  # type: ignore[misc]
    return b"[" + b",".join(parts) + b"]\n"


def encode_puts(ops: list[Op]) -> bytes:
    """:func:`encode_record` of puts without expiry (4-tuples: a :class:`~.put_run.PutRun`'s), without its check
    that every operation is one."""
    fragment = _FRAGMENT
    if fragment is not None:
        return orjson.dumps(ops, fragment, orjson.OPT_APPEND_NEWLINE)
    return encode_record(ops)


#: Operations per ``orjson.dumps`` when a large record is encoded (in a worker thread, :func:`encode_in_slices`).
ENCODE_SLICE = 2000


def encode_in_slices(ops: Sequence[Op], size: int = ENCODE_SLICE) -> bytes:
    """``encode_record(ops)``, byte for byte, one ``dumps`` per ``size`` operations. A JSON array's elements are
    encoded independently, so the record is each slice's record without its brackets, joined. Why: one ``dumps``
    of a restore's 150k operations (a ~45 MB record) held the GIL, and the event loop with it, ~39 ms in its worker
    thread (as did a refresh's 25k documents, json/store._prepare_large); a slice takes a fraction of a ms, and
    what stays one C call is the final join (a memcpy, which ``bytes.join`` does without the GIL when it is large).
    One join, the brackets and commas among its parts: ``b"[" + b",".join(inner) + b"]\n"`` copied the record twice
    more in ``bytes`` concatenations, which keep the GIL: 55-61 ms for a 45 MB restore record, against 3 ms for
    the one join (a 1 ms ticker thread's longest lateness), the JSON restore's remaining loop stall."""
    if len(ops) <= size:
        return encode_record(ops)
    # the slices are short C calls back to back: a thread running them keeps the GIL for whole switch intervals
    # (a restore's 150k operations: the loop waited 20-25 ms at a time), hence the pauses (never on the loop)
    pacer = Pacer()
    inner = []
    for start in range(0, len(ops), size):
        inner.append(encode_record(ops[start:start + size])[1:-2])
        pacer.tick()
    parts = [b","] * (2 * len(inner) + 1)
    parts[0], parts[-1] = b"[", b"]\n"
    parts[1::2] = inner
    return b"".join(parts)


def record_digest(record: bytes) -> str:
    """A record's digest, as an intent names it (json/forget_files.py: the record that decides a transaction's
    forget)."""
    return hashlib.blake2b(record, digest_size=16).hexdigest()


def _row(op: Op, fragment: Callable[[bytes], object]) -> list[object]:
    """:func:`encode_record`'s row of a delete, or of a put that expires."""
    if op[0] != "p":
        return list(op)
    return [op[0], op[1], op[2], fragment(op[3]), fragment(expiry_text(op[4]))]  # type: ignore[misc]


def _header(generation: int, snapshots: dict[str, int], previous_end: int | None, copied: int = 0) -> bytes:
    header: dict[str, object] = {"storage_journal": JOURNAL_FORMAT, "generation": generation, "snapshots": snapshots}
    if previous_end is not None:
        header["previous_end"] = previous_end
    if copied:
        header["copied"] = copied  # bytes of the previous generation's records it starts with: see Journal.repeats
    return orjson.dumps(header) + b"\n"


#: The most journal bytes a writer waiting for its offered record's fate reads (json/offer_search.py), and so
#: the most of the kept generations a compaction keeps for such a writer (:meth:`Journal.keep_previous`).
SEARCH_MAX = 1 << 26

#: What opening a journal file finds: (fd, inode, header end, generation, snapshots, previous_end, copied).
_Opened = tuple[int, int, int, int, dict[str, int], "int | None", int]


class _Invalid(Exception):
    """A record that parses as JSON but is not one this library writes: damage, never a torn write."""


def _parse_record(line: bytes) -> list[Op]:
    """Decode one record into ops.

    Raises ``orjson.JSONDecodeError`` (a ValueError) when the line is not JSON (a torn write, if it is the last), and
    :class:`_Invalid` when it is JSON of the wrong shape or names a collection or key that user input could not
    have: everything read from disk is checked like user input (a collection ``../../evil`` would otherwise become
    a file name outside the data folder at the next compaction).
    """
    raw = orjson.loads(line)
    if type(raw) is not list:
        raise _Invalid("record is not a list")
    ops: list[Op] = []
    for op in raw:
        if type(op) is list and len(op) == 4 and op[0] == "p" and type(op[3]) is dict:
            ops.append(("p", op[1], op[2], dumps_kept(op[3])))
        elif type(op) is list and len(op) == 5 and op[0] == "p" and type(op[3]) is dict:
            try:
                ops.append(("p", op[1], op[2], dumps_kept(op[3]), parse_expiry(op[4])))
            except ValueError as exc:
                raise _Invalid(str(exc)) from None
        elif type(op) is list and len(op) == 3 and op[0] == "d":
            ops.append(("d", op[1], op[2]))
        else:
            raise _Invalid(f"bad operation {op!r:.80}")
        try:
            check_collection(op[1])
            check_key(op[2])
        except ValidationError as exc:
            raise _Invalid(str(exc)) from None
    return ops


def parse_record(line: bytes) -> list[Op]:
    """:func:`_parse_record` for other modules: a record another process offered to this one (json/slots.py) is
    checked as one read from the journal is."""
    return _parse_record(line)


class Follow(NamedTuple):
    """What :meth:`Journal.follow` found: records to apply, where a new generation's start (an index into
    ``records``, or None), and whether the caller must catch up under the lock instead (``need_lock``: what is
    committed is unknown from here) or reload the snapshots (``reload``: it missed a whole generation)."""

    records: list[list[Op]]
    switched_at: int | None = None
    need_lock: bool = False
    reload: bool = False


def read_header(fd: int, path: str | os.PathLike[str]) -> tuple[int, int, dict[str, int], int | None, int]:
    """The header of the journal file ``fd`` (at ``path``, for the errors): ``(where it ends, generation,
    snapshots' checksums, previous_end, copied)``; CorruptDataError when it is missing, truncated or not ours."""
    head = os.pread(fd, 1 << 16, 0)
    end = head.find(b"\n")
    if end < 0 and len(head) == 1 << 16:  # a header naming very many collections
        head = os.pread(fd, 1 << 24, 0)
        end = head.find(b"\n")
    if end < 0:
        raise CorruptDataError(
            f"{path}: journal header is missing or truncated ({len(head)} bytes); "
            "the journal was damaged outside this library", path=str(path), position=0)
    try:
        header = orjson.loads(head[:end])
        generation = int(header["generation"])
        fmt = header["storage_journal"]
        snapshots = {check_collection(str(k)): int(v) for k, v in header.get("snapshots", {}).items()}
        previous = header.get("previous_end")
        previous_end = None if previous is None else int(previous)
        copied = int(header.get("copied", 0))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise CorruptDataError(f"{path}: journal header is not valid", path=str(path), position=0) from None
    if fmt != JOURNAL_FORMAT:
        raise CorruptDataError(f"{path}: journal format {fmt!r} is not supported (this library writes "
                               f"{JOURNAL_FORMAT})", path=str(path), position=0)
    return end + 1, generation, snapshots, previous_end, copied


class Journal:
    """One journal file: its descriptor, generation and how far this process has applied it.

    Not thread-safe and not async: the store serializes access (its mutex and file lock for writes; reads run on
    the event loop thread between awaits).

    ``end`` arguments are the *committed end* that writers publish (json/lock.py): a reader never reads past it, so
    it never applies a record whose fsync may yet fail. Under the lock, bytes past a trusted committed end were
    never acknowledged (a write that failed and could not be cut back, or a writer killed before it published),
    and are cut away.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.fd = -1
        self.ino: int | None = None
        self.generation = 0
        self.offset = 0  # end of the last record applied by this process
        #: crc32 of each snapshot file as compaction wrote it: a file that still matches needs no re-validation.
        self.snapshots: dict[str, int] = {}
        #: Where the previous generation's committed records ended (None in journals from before it was recorded).
        self.previous_end: int | None = None
        #: Where this file's copies of the previous generation's records end (a rebase starts a generation with
        #: them; 0: none): a follower that read them there reads them again here, harmless for the documents,
        #: but the change feed resyncs instead of repeating them (tables.py).
        self.repeats_until = 0
        #: The last :meth:`follow` went through a kept generation that started with such copies.
        self.crossed_copy = False
        #: The file's size as last seen: records up to there overwrite filler (json/filler.py). Another process
        #: may have cut the file shorter since: a record written past the real end then just grows the file,
        #: which its fdatasync commits like any append.
        self.allocated = 0
        #: Whether a generation's kept file must stay (a writer waiting for its offered record's fate may have to
        #: read it: json/slots.py ``kept_needed``); None: only the previous generation is kept.
        self.kept_needed: Callable[[int], bool] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @staticmethod
    def create(path: Path, generation: int, snapshots: dict[str, int] | None = None,
               previous_end: int | None = None, records: bytes = b"") -> None:
        """Write a fresh journal (header, then ``records``) atomically; replaces an existing one."""
        atomic_write(path, _header(generation, snapshots or {}, previous_end, copied=len(records)) + records)

    def rebase(self, snapshots: dict[str, int]) -> None:
        """Start the next generation with more snapshot checksums in its header but the same records (copied):
        how the checksum of a snapshot the library did not write (the seed's own file) gets recorded without
        rewriting that file. Under the lock, caught up. Followers replay the copied records a second time, which
        gives the same state (every record is whole-document puts and deletes)."""
        body = os.pread(self.fd, self.offset, 0)
        body = body[body.index(b"\n") + 1:]
        self.keep_previous()
        self.mark_replacing()
        try:
            Journal.create(self.path, self.generation + 1, {**self.snapshots, **snapshots}, self.offset, body)
        except BaseException:
            self.unmark()
            raise
        self.open(lambda: None)

    def _open_fd(self) -> int:
        return os.open(self.path, os.O_RDONLY if self.read_only else os.O_RDWR)  # pwrite at offset: no O_APPEND

    def open(self, committed: Callable[[], tuple[int, int] | None] = lambda: None) -> list[list[Op]]:
        """Open the current journal file and read every committed record (``committed`` as for :meth:`follow`)."""
        self.close()
        self._switch_to(*self._open_current())
        return self.read_new(end=self._end_of(committed()), locked=not self.read_only, whole_tail=True)

    def _open_current(self) -> _Opened:
        """Open the file the path names now: ``(fd, inode, header end, generation, snapshots, previous_end,
        copied)``."""
        fd = self._open_fd()
        try:
            st = os.fstat(fd)
            header_end, generation, snapshots, previous_end, copied = read_header(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_ino, header_end, generation, snapshots, previous_end, copied

    def _switch_to(self, fd: int, ino: int, header_end: int, generation: int, snapshots: dict[str, int],
                   previous_end: int | None, copied: int) -> None:
        """Follow the file :meth:`_open_current` opened, from its first record."""
        self.fd, self.ino, self.offset, self.generation = fd, ino, header_end, generation
        self.snapshots, self.previous_end = snapshots, previous_end
        self.repeats_until = header_end + copied if copied else 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading ---------------------------------------------------------------------------------------------------
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_new(self, *, end: int | None, locked: bool, whole_tail: bool = False) -> list[list[Op]]:
        """Records appended since :attr:`offset` and before ``end`` (the committed end; None: unknown, read to the
        end of the file); advances :attr:`offset` past every record returned.

        ``locked`` means no writer can be active: an incomplete or unparseable last record is then a torn write
        from a crashed process, and bytes past a known ``end`` were never acknowledged: both are cut away.
        Unlocked (a reader peeking at another process's writes), the tail may simply be in flight: it is left.
        Past the committed end, one byte tells filler from an interrupted write (a process killed in ``pwrite``
        leaves a prefix of its record); ``whole_tail`` (at open) reads all of it, for anything else left there.
        """
        size = self.size()
        self.allocated = size
        if size < self.offset:
            raise CorruptDataError(f"{self.path}: journal shrank below what was already read ({size} < "
                                   f"{self.offset})", path=str(self.path), position=size)
        stop = size if end is None else min(end, size)
        records: list[list[Op]] = []
        debris = False  # bytes that are neither records nor filler seen after the last record
        if stop > self.offset:
            data = os.pread(self.fd, stop - self.offset, self.offset)
            pos = 0  # where the scan is
            good = 0  # end of the last record read: the offset moves there, never into filler
            while True:
                line_end = data.find(b"\n", pos)
                if line_end < 0:
                    debris = pos < len(data)  # a line without its newline: in flight, or torn
                    break
                if line_end == pos:  # blank lines: preallocated filler (json/filler.py)
                    pos = next_nonblank(data, pos)
                    if pos < 0:
                        break
                    continue
                try:
                    records.append(_parse_record(data[pos:line_end]))
                except _Invalid as exc:
                    raise self._corrupt(pos, str(exc)) from None
                except ValueError as exc:  # orjson.JSONDecodeError: not JSON
                    if end is not None or _record_after(data, line_end + 1):
                        raise self._corrupt(pos, f"{exc}; it lies before later or committed records, so it is "
                                                 "not a torn write") from None
                    # No record follows: a torn last write that never got its fsync (one commit is one line,
                    # written by one pwrite; a crash of the machine can leave pieces of it between filler). Unlocked,
                    # it may still be in flight: look again later. Locked, it is cut away below.
                    debris = True
                    break
                pos = good = line_end + 1
            self.offset += good
        if locked and not self.read_only and self.offset < size and (
                debris or not is_blank(os.pread(self.fd, 1, self.offset))
                or (whole_tail and next_nonblank(os.pread(self.fd, size - self.offset, self.offset), 0) >= 0)):
            self._drop_unacknowledged(size, torn=end is None)
        return records

    def _corrupt(self, pos: int, why: str) -> CorruptDataError:
        at = self.offset + pos
        return CorruptDataError(f"{self.path}: journal record at byte {at} is corrupt ({why})",
                                path=str(self.path), position=at)

    def _drop_unacknowledged(self, size: int, *, torn: bool) -> None:
        what = "a torn final record" if torn else "bytes past the last committed record (a failed or interrupted write)"
        log.warning("%s: dropping %s (%d bytes at offset %d): it was never acknowledged",
                    self.path, what, size - self.offset, self.offset)
        os.ftruncate(self.fd, self.offset)
        sync_fd(self.fd)
        self.allocated = self.offset

    def replaced(self) -> bool:
        """True when another process compacted: the path now names a different file."""
        try:
            return os.stat(self.path).st_ino != self.ino
        except FileNotFoundError:
            raise CorruptDataError(f"{self.path}: the journal file was removed while the store was open",
                                   path=str(self.path)) from None

    def changed(self) -> bool:
        """Cheap check for anything new (one ``pread`` of a byte, 0.36 us here, less than half the cost of a
        ``stat`` of the path): a record written where this process stopped reading, or a compaction, which marks the
        file it replaces (see :meth:`mark_replacing`). End of file or filler there: nothing new. (An ``lseek`` to
        the end, 0.22 us, cannot tell: the preallocated filler makes the file longer than its records.)"""
        return not is_blank(os.pread(self.fd, 1, self.offset))

    def mark_replacing(self) -> None:
        """Before a compaction replaces this file: end it at the committed end (its filler would only take disk
        space in the kept generation, :meth:`keep_previous`) and write a space there, so that readers following
        it (whose cheap check looks for a byte that is not filler where they stopped) look again and find the new
        file. If the compaction fails, :meth:`unmark` removes it; a crash leaves it past the committed end, where
        the next holder of the lock cuts it away (and it never parses as a record)."""
        os.ftruncate(self.fd, self.offset)
        self.allocated = self.offset
        pwrite_all(self.fd, b" ", self.offset)

    def unmark(self) -> None:
        os.ftruncate(self.fd, self.offset)
        self.allocated = self.offset

    def follow(self, committed: Callable[[], tuple[int, int] | None], *, locked: bool) -> Follow:
        """Catch up with other processes.

        ``committed()`` returns the published ``(inode, end)`` (or None): only records before that end are read,
        and only when it names the file being read; otherwise, unlocked, the result asks for a catch-up under the
        lock. After another process compacted, the rest of the old file is read through our still-open descriptor
        (up to the new header's ``previous_end``: the old generation's final committed end), then the new file is
        followed from its header if it is exactly the next generation. If two compactions happened meanwhile, the
        generation in between is read from the file the second one kept (:meth:`keep_previous`); when that is
        gone too, the caller must reload the snapshots under the lock.
        """
        self.crossed_copy = False
        if self.size() < self.offset:
            return Follow([], reload=True)  # cut back under us: only a reload is safe
        if not self.replaced():
            end = self._end_of(committed())
            if end is None and not locked:
                return Follow([], need_lock=True)
            return Follow(self.read_new(end=end, locked=locked))
        try:
            current = self._open_current()
        except FileNotFoundError:
            return Follow([], reload=True)
        records: list[list[Op]] = []
        while current[3] > self.generation + 1:  # generations went by unseen: the kept one (keep_previous), if any
            kept = self._open_kept(self.generation + 1)
            if kept is None:
                break
            # read the old file to where its successor says its committed records end, then go on in that one
            records += self.read_new(end=kept[5], locked=False)
            self.close()
            self._switch_to(*kept)
            self.crossed_copy = self.crossed_copy or kept[6] > 0
        generation, previous_end = current[3], current[5]
        next_one = generation == self.generation + 1
        # The old file is finished: nobody writes it again. When the new file is the very next generation, its
        # header's previous_end is where the old file's committed records end (past it: a compaction's mark).
        # Otherwise previous_end speaks of a file in between, and only a reload of the snapshots is right.
        if next_one:
            records += self.read_new(end=previous_end, locked=False)
        self.close()
        self._switch_to(*current)
        if not next_one:
            return Follow(records, reload=True)
        switched_at = len(records)
        end = self._end_of(committed())
        if end is None and not locked:
            return Follow(records, switched_at, need_lock=True)
        return Follow(records + self.read_new(end=end, locked=locked), switched_at)

    def _kept_path(self, generation: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{generation}")

    def _open_kept(self, generation: int) -> _Opened | None:
        """The kept file of ``generation`` (see :meth:`keep_previous`), opened like :meth:`_open_current`; None
        when it is not there (any more) or is not that generation."""
        try:
            fd = os.open(self._kept_path(generation), os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            header_end, gen, snapshots, previous_end, copied = read_header(fd, self.path)
        except (OSError, CorruptDataError):
            os.close(fd)
            return None
        if gen != generation:
            os.close(fd)
            return None
        return fd, st.st_ino, header_end, gen, snapshots, previous_end, copied

    def keep_previous(self) -> None:
        """Before this file is replaced (a compaction, a rebase; under the lock): keep it, hard-linked as
        ``storage.journal.<generation>``, until the next replacement removes it. A follower that misses this whole
        generation (two compactions between two of its looks: a process that compacts, then compacts again as it
        closes) reads it there instead of reloading the snapshots and making its watchers resync. Costs one link
        per compaction and the disk space of one old journal; where hard links are not possible a follower
        reloads as before."""
        kept = self._kept_path(self.generation)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(kept)  # left by a crash between a link and the replacement
            os.link(self.path, kept)
        except OSError as exc:
            log.debug("%s: cannot keep the previous journal (%s)", self.path, exc)
        self._drop_older(self.generation - 1, self.kept_needed)

    def _drop_older(self, generation: int, needed: Callable[[int], bool] | None) -> None:
        """Remove the kept files of ``generation`` and the ones before it, down to the first missing one, except
        those ``needed`` keeps. Why a run and not one file: a writer waiting for its offered record's fate across
        compactions keeps every generation from its own on (json/slots.py ``kept_needed``: the files it may have
        to read, json/offer_search.py); once it has its answer they go at the next compaction, all together.
        At most :data:`SEARCH_MAX` bytes of them are kept (what the search reads at most): a
        writer frozen while it waits never makes them grow with every compaction."""
        kept = 0
        while generation > 0:
            path = self._kept_path(generation)
            if needed is not None and needed(generation):  # a waiting writer's or later: kept, as the rest
                try:
                    kept += os.stat(path).st_size
                except OSError:
                    return
                if kept <= SEARCH_MAX:
                    generation -= 1
                    continue
            needed = None  # below the lowest one needed (or past what the search reads): none is kept
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            except OSError:
                pass
            generation -= 1

    def drop_kept(self) -> None:
        """Remove the generations :meth:`keep_previous` kept, once no store can need them (the last writable
        store's close, json/presence.py). Best effort: a file left behind only costs disk until the next
        compaction."""
        self._drop_older(self.generation - 1, None)

    def _end_of(self, committed: tuple[int, int] | None) -> int | None:
        """The committed end if ``committed`` speaks of this file."""
        if committed is None or committed[0] != self.ino:
            return None
        return committed[1]

    def holds(self, generation: int, offset: int, length: int, digest: str) -> bool:
        """Whether this journal, caught up under the lock, committed the record of ``length`` bytes at ``offset``
        of generation ``generation`` whose :func:`record_digest` is ``digest`` (what decides a transaction's
        forget, see json/forget_files.py). Only what this process applied counts (past :attr:`offset` nothing was
        committed), and a journal of another generation was rewritten from memory without it."""
        if self.fd < 0 or self.generation != generation or offset + length > self.offset:
            return False
        return record_digest(os.pread(self.fd, length, offset)) == digest

    # -- writing ---------------------------------------------------------------------------------------------------
    def append(self, data: bytes, sync: Callable[[int], None] | None = None) -> None:
        """Write records at the end of the committed ones and fsync them. Call under the lock, caught up
        (``offset`` at the end of the records; past it there is nothing, or filler). ``sync``: the fsync of the
        file descriptor, :func:`sync_fd` by default (a batch's starts the writeback, plans its apply, then
        fsyncs: json/store.py ``_timed_sync``).

        Within the preallocated room the record overwrites filler; otherwise it is written with a new chunk of
        filler after it (json/filler.py), or alone when there is no room for that. On failure the file is cut back
        to where the records end (best effort: the caller must still treat the journal as suspect, see
        JsonStore), so a later record never follows a half-written one. :attr:`offset` moves only once the fsync
        succeeded: callers use that to know whether the record is durable.
        """
        self.write_at(data, self.offset, sync)
        self.offset += len(data)

    def write_at(self, data: bytes, start: int, sync: Callable[[int], None] | None = None) -> None:
        """:meth:`append` at ``start`` without moving :attr:`offset`: ``start`` is the committed end, which lies
        past :attr:`offset` when the commit applies the records before it only after its own is durable
        (:meth:`may_write_at`, json/store.py). Returns once the record is durable; on failure the file is cut back
        to ``start``."""
        stop = start + len(data)
        try:
            if stop <= self.allocated:
                written = os.pwrite(self.fd, data, start)  # whole, but for a short write near a full disk
                if written != len(data):
                    pwrite_all(self.fd, memoryview(data)[written:], start + written)
            else:
                self._extend(data, start)
            (sync or sync_fd)(self.fd)
        except OSError:
            self.allocated = start
            try:
                os.ftruncate(self.fd, start)
                sync_fd(self.fd)
            except OSError:
                log.exception("%s: could not cut back a failed append", self.path)
            raise

    def may_write_at(self, end: int) -> bool:
        """Under the lock, before a commit that applies the records it follows only after its own is durable
        (json/store.py): whether its record may go at ``end``, the committed end published for this very file,
        without reading what lies before it first. It must not lie before what this process read; the file must
        reach it; what follows it must be filler or nothing (not the prefix of a write that was never
        acknowledged: a catch-up under the lock cuts that away first); and the records in between must not
        repeat earlier ones (a rebase's copies, whose change feed resyncs: only :meth:`follow` does that). Sets
        :attr:`allocated` to the file's size."""
        if end < self.offset or self.repeats_until > self.offset:
            return False
        size = self.size()
        self.allocated = size
        return end <= size and (end == size or is_blank(os.pread(self.fd, 1, end)))

    def _extend(self, data: bytes, start: int) -> None:
        """Write ``data`` at ``start`` followed by a chunk of filler, in one ``pwrite`` (the caller's fsync then
        commits the file's new size once for the whole chunk); without filler when it does not fit."""
        chunk = 0 if len(data) > MIN_CHUNK else chunk_for(self.fd, start)
        if chunk:
            try:
                pwrite_all(self.fd, data + FILL * chunk, start)
            except OSError as exc:
                if exc.errno not in NO_ROOM:
                    raise
                log.info("%s: no room to preallocate %d bytes (%s): appending without", self.path, chunk, exc)
                os.ftruncate(self.fd, start)  # whatever part of the record and filler got written
            else:
                self.allocated = start + len(data) + chunk
                return
        pwrite_all(self.fd, data, start)
        self.allocated = start + len(data)


def _record_after(data: bytes, pos: int) -> bool:
    """Whether a line at or after ``pos`` parses as a record: an unparseable line before one is corruption, not a
    torn write (after a torn write there is only filler and pieces of that write)."""
    while True:
        pos = next_nonblank(data, pos)
        line_end = data.find(b"\n", pos) if pos >= 0 else -1
        if line_end < 0:
            return False
        try:
            _parse_record(data[pos:line_end])
        except (ValueError, _Invalid):
            pos = line_end + 1
        else:
            return True
