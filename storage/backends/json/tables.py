"""The committed documents of a JSON store, in memory, and the files they come from and go back to.

A :class:`Tables` holds every collection as this process knows it committed (documents in their encoded form,
bytes), with what the rest of the store needs to keep that view equal to the disk:

* **Loading**: every ``<collection>.json`` snapshot is read (``*.json`` files that are not collections are kept
  aside as *foreign*, never written), then the journal is replayed over them. A snapshot whose key -> offset
  sidecar (offsets.py) matches it is not parsed: its collection is a :class:`~storage.backends.json.lazy.Lazy`
  that reads documents on first use; any other is read whole and its sidecar (re)written, when the store may
  write and the snapshot is large enough to be worth one (offsets.wants_sidecar; a small one's is removed).
* **Applying**: a committed record's operations change the collections, their approximate snapshot sizes and the
  set of collections changed in this journal generation (the *dirty* set, which compaction rewrites).
* **Following**: records that other processes committed are read from the journal up to the committed end they
  published in ``storage.lock`` (never past it: a record whose fsync may yet fail is never applied), across a
  compaction of theirs, or by a full reload when a whole generation was missed.
* **Compacting**: the dirty collections' snapshots are rewritten (atomically), then the next journal generation
  starts, after marking the journal it replaces so that readers look again.
* **External edits**: each snapshot's stat signature and checksum, as this process last read or wrote it, tell a
  hand edit apart from our own file; a snapshot changed behind the store's back is never overwritten, and one whose
  edit the journal would clobber is refused at open (:class:`ExternalChangeError`).

What a Tables does not do: take the lock, hop to a thread, append to the journal or decide when a commit is
durable. Its callers (:class:`~storage.backends.json.store.JsonStore`) hold the store lock for every method that
writes (loading, catching up, compacting, publishing), or are a read-only store; reads and :meth:`follow`
(``locked=False``) need no lock. The journal and the lock file are opened by the store and handed in: the store
appends to the journal (its one commit path) and publishes through :meth:`publish`; this object reads, follows and
replaces the journal.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from operator import itemgetter
from pathlib import Path

from ...codec import OWN_COLLECTIONS, check_collection
from ...errors import CorruptDataError, ExternalChangeError, ValidationError
from ...feed import ChangeFeed
from ...fsutil import atomic_write, fsync_dir
from .expiry import EXPIRES_NAME, Expiries, dead_keys, read_sidecar, render_sidecar, visible
from .indexes import JsonIndexes
from .journal import Journal, Op
from .lazy import Lazy, SnapshotFile, replaced_in
from .lock import Committed, SidecarLock
from .merged import MergedSnapshot
from .offsets import Offsets, Spans, build_offsets, new_spans, offsets_name, read_offsets, wants_sidecar, write_offsets
from .snapshot import OVERHEAD, Documents, read_snapshot, render_parts, render_with_spans

__all__ = ["Tables", "Staged", "Plan", "COMPACT_RATIO", "MIN_COMPACT_BYTES"]

log = logging.getLogger("storage.json")

#: Compact once the journal is larger than this fraction of the snapshots it would rewrite (and MIN_COMPACT).
COMPACT_RATIO = 1.0
MIN_COMPACT_BYTES = 1 << 20
#: A record of at least this many operations that are all puts without expiry into one collection is applied in
#: a few C-level passes (:meth:`Tables._apply_puts`).
BULK_APPLY = 32
_kind, _collection = itemgetter(0), itemgetter(1)
#: :meth:`Tables.plan`'s result: per collection, (name, final puts, keys to delete, size change in bytes, how many
#: of the puts' keys had no document).
Plan = list[tuple[str, dict[str, bytes], list[str], int, int]]

#: A file's stat signature (see _signature) and the crc32 of its content.
FileState = tuple[tuple[int, int, int], int]


class Tables:
    """The collections as committed, their snapshot files and the journal they are followed through."""

    def __init__(self, path: Path, journal: Journal, lock: SidecarLock, *, read_only: bool = False) -> None:
        self.path = path
        self.journal = journal
        self.lock = lock  # only its published committed end: the store takes and releases the lock itself
        self.read_only = read_only
        #: Each collection as ``{key: encoded document}``: a dict, or a lazy one over its snapshot (json/lazy.py)
        self.data: dict[str, Documents] = {}
        #: when expiring documents expire: {collection: {key: micros}}, only keys present in data (json/expiry.py)
        self.expires: Expiries = {}
        self.sizes: dict[str, int] = {}  # approximate snapshot bytes per collection
        self.foreign: dict[str, str] = {}  # *.json files that are not collections: name -> why
        self.dirty: set[str] = set()  # collections changed in the current journal generation
        #: each snapshot file as this process last read or wrote it: (stat signature, crc32), to notice edits
        self.files: dict[str, FileState] = {}
        self.need_reload = False  # a whole journal generation was missed: reload the snapshots under the lock
        self.need_lock = False  # what other processes committed is unknown from here: catch up under the lock
        #: Replay the journal over an edited snapshot instead of refusing it (see JsonStore.open).
        self.merge_external = False
        #: Compact once the journal exceeds this and the snapshots it would rewrite (tests lower it).
        self.min_compact_bytes = MIN_COMPACT_BYTES
        #: Told of every committed operation applied here, in commit order (json/feed.py); None: nobody asked.
        self.feed: ChangeFeed | None = None
        #: The query indexes (indexes.py): kept equal to ``data`` by :meth:`load` and :meth:`apply`.
        self.indexes = JsonIndexes(path)
        #: Open snapshots lazily through their key -> offset sidecars and keep those up to date (json/lazy.py,
        #: json/offsets.py); False reads every snapshot whole (the reference the tests compare against).
        self.lazy = True

    # ---------------------------------------------------------------------------------------------------------------
    # the committed end (published in storage.lock)
    def committed(self) -> Committed | None:
        return self.lock.committed(trusted_only=True)

    def publish(self) -> None:
        """Tell readers the journal is committed up to where this process wrote or read it. Under the lock."""
        self.lock.publish(self.journal.ino or 0, self.journal.offset)

    # ---------------------------------------------------------------------------------------------------------------
    # loading
    def load(self) -> None:
        """(Re)load every snapshot and replay the journal. Needs the file lock (or a read-only store)."""
        if not self.journal.path.exists():
            if self.read_only:
                records: list[list[Op]] = []
                self.journal.close()
                self.journal.ino = None
            else:
                Journal.create(self.journal.path, 1)
                fsync_dir(self.path)
        if self.journal.path.exists():
            records = self.journal.open(self.committed)
        trusted = self.journal.snapshots
        data: dict[str, Documents] = {}
        sizes: dict[str, int] = {}
        foreign: dict[str, str] = {}
        files: dict[str, FileState] = {}
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if not entry.name.endswith(".json") or entry.name == EXPIRES_NAME:
                continue
            name = entry.name[:-5]
            try:
                check_collection(name)
            except ValidationError:
                foreign[name] = "its name is not a valid collection name"
                continue
            path = Path(entry.path)
            if not entry.is_file():  # follows symlinks: a link to a file is that file (see _snapshot_target)
                foreign[name] = "it is not a regular file" + (" (a directory)" if entry.is_dir() else "")
                continue
            st = os.stat(path)
            sidecar = self.lazy and wants_sidecar(st.st_size)  # a small snapshot is read whole (offsets.py)
            lazy = self._open_lazy(name, path) if sidecar else None
            if lazy is not None:
                data[name], sizes[name], crc = lazy, lazy.file.table.approx_size, lazy.file.crc
                files[name] = (lazy.file.signature, crc)
            else:
                if self.lazy and not sidecar and not self.read_only:
                    self._drop_offsets(name)  # left from when it was larger, or by an older version
                spans = None if self.read_only or not sidecar else new_spans()
                loaded = read_snapshot(path, trusted.get(name), spans)
                if isinstance(loaded, str):
                    foreign[name] = loaded
                    continue
                data[name], sizes[name], crc = loaded
                files[name] = (_signature(st), crc)
                if spans is not None and len(spans[0]) == len(data[name]):  # compaction's layout: every line seen
                    self._write_offsets(name, build_offsets(spans, st.st_size, crc, sizes[name]))
            if name in trusted and trusted[name] != crc:
                self._check_edit(name, path, data[name], records)
        for name, why in foreign.items():
            if name in OWN_COLLECTIONS:
                raise CorruptDataError(f"{self.path / (name + '.json')} belongs to the library ({name!r}) but {why}; "
                                       "the file was left as it is", path=str(self.path / (name + ".json")))
        expires = {name: {key: when for key, when in entries.items() if key in data.get(name, ())}
                   for name, entries in read_sidecar(self.path / EXPIRES_NAME).items()}
        self.expires = {name: entries for name, entries in expires.items() if entries}
        self.data, self.sizes, self.foreign, self.dirty, self.files = data, sizes, foreign, set(), files
        self.need_reload = self.need_lock = False
        self.indexes.reset()
        feed, self.feed = self.feed, None  # a reload replays records watchers may have seen: they resync instead
        try:
            for ops in records:
                self.apply(ops)
        finally:
            self.feed = feed
            if feed is not None:
                feed.resync()
        self.indexes.read()
        self.indexes.build(self.data)
        self.settle()

    def _open_lazy(self, name: str, path: Path) -> Lazy | None:
        """The collection over its snapshot and key -> offset sidecar (json/lazy.py), or None (then the snapshot is
        read whole, and the sidecar rebuilt) when the sidecar is missing or does not belong to these exact bytes."""
        sidecar = self.path / offsets_name(name)
        try:
            file, why = SnapshotFile.open(path, lambda size: read_offsets(sidecar, size))
        except OSError as exc:
            file, why = None, f"unreadable ({exc})"
        if file is None:
            if why != "missing":
                log.info("%s: %s; reading %s whole and rebuilding it", sidecar, why, path.name)
            return None
        return Lazy(file)

    def _write_offsets(self, name: str, table: Offsets, *, sync_dir: bool = False) -> None:
        """Write a collection's key -> offset sidecar (a cache: a failure costs the next open its speed, nothing
        else, so it is logged and not raised)."""
        try:
            write_offsets(self.path / offsets_name(name), table, sync_dir=sync_dir)
        except OSError as exc:
            log.warning("%s: cannot write %s (%s): the next open reads %s.json whole", self.path,
                        offsets_name(name), exc, name)

    def settle(self) -> None:
        """Put each lazy collection that was read whole in place as that plain dict (reads are then a bare dict
        lookup again). Replacing a value never resizes ``data``: safe beside a thread iterating it."""
        data = self.data
        for name, coll in list(data.items()):
            if type(coll) is Lazy and coll.is_whole:
                data[name] = coll.whole()

    def release(self) -> None:
        """At close: give the lazy collections' snapshot descriptors back."""
        for coll in list(self.data.values()):
            if type(coll) is Lazy:
                coll.file.close()

    def record_checksums(self) -> None:
        """Under the lock, after loading: record in the journal's header the checksum of every snapshot it does
        not know yet (e.g. the seed's own members.json), so that a later edit of that file is noticed (see
        :meth:`_check_edit`)."""
        untrusted = {name: crc for name, (_sig, crc) in self.files.items() if name not in self.journal.snapshots}
        if untrusted:
            self.journal.rebase(untrusted)
            fsync_dir(self.path)

    def _check_edit(self, name: str, path: Path, coll: Documents, records: list[list[Op]]) -> None:
        """A snapshot that is not the file the last compaction wrote: fine if the journal has nothing newer for it
        (a hand edit while the store was closed, or a compaction that crashed after writing it), damage if
        replaying the journal would overwrite part of it (someone wrote it while the store had it open)."""
        final: dict[str, bytes | None] = {}
        for ops in records:
            for op in ops:
                if op[1] == name:
                    final[op[2]] = op[3] if op[0] == "p" else None  # type: ignore[misc]
        clobbered = [key for key, value in final.items() if coll.get(key) != value]
        if clobbered and self.merge_external:
            log.warning("%s was changed outside the store: replaying the journal's newer values of %d documents "
                        "over the edit, as asked (merge_external)", path, len(clobbered))
        elif clobbered:
            raise ExternalChangeError(
                f"{path} was changed outside the store while its journal still holds newer changes to "
                f"{len(clobbered)} of its documents (e.g. {clobbered[0]!r}); opening would overwrite them, so the file "
                "was left as it is. Stop the bot before editing files by hand. To keep both (the journal's values "
                "win for the documents it changed): `python -m storage compact --merge-external`",
                path=str(path))
        log.info("%s was edited while the store was closed: using the edit", path)

    # ---------------------------------------------------------------------------------------------------------------
    # applying committed changes to memory
    def apply(self, ops: list[Op]) -> None:
        """Apply a committed record's operations to the collections, their sizes, expiries, indexes and the change
        feed.

        Per run of operations on one collection its dict, size change and expiries are looked up once (a batch of
        1,000 member puts: 0.79 -> 0.44 ms, benchmarks/README.md), not once per operation; a batch of plain puts
        into one collection takes :meth:`_apply_puts`."""
        if len(ops) == 1 and len(op := ops[0]) == 4 and op[0] == "p" and op[1] in self.data:
            self._apply_put(op[1], op[2], op[3])  # type: ignore[misc]
            if self.indexes.live:
                self.indexes.apply(ops)
            return
        if len(ops) >= BULK_APPLY and self._apply_puts(ops):
            return
        data, sizes, expires, dirty = self.data, self.sizes, self.expires, self.dirty
        feed = self.feed
        publish = feed.publish if feed is not None and feed.active else None  # the change feed (json/feed.py)
        name: str | None = None
        coll: Documents = {}
        swap = remove = None  # a lazy collection's put and delete returning the old size (json/lazy.py): no file read
        expiring: dict[str, int] | None = None
        delta = 0
        for op in ops:
            if op[1] != name:
                if name is not None:
                    sizes[name] += delta
                name = op[1]
                found = data.get(name)
                if found is None:
                    found = data[name] = {}
                    sizes[name] = 2
                coll, delta, expiring = found, 0, expires.get(name)
                swap, remove = (found.swap, found.remove) if type(found) is Lazy else (None, None)
                dirty.add(name)
            key = op[2]
            if op[0] == "p":
                new: bytes = op[3]  # type: ignore[misc]
                if swap is not None:
                    if (old_size := swap(key, new)) is not None:
                        delta -= len(key) + old_size + OVERHEAD
                else:
                    old = coll.get(key)
                    coll[key] = new
                    if old is not None:
                        delta -= len(key) + len(old) + OVERHEAD
                delta += len(key) + len(new) + OVERHEAD
                if publish is not None:
                    publish(name, key, "put", new)
            elif remove is not None:
                if (old_size := remove(key)) is not None:
                    delta -= len(key) + old_size + OVERHEAD
                    if publish is not None:
                        publish(name, key, "delete", None)
            elif (old := coll.get(key)) is not None:
                delta -= len(key) + len(old) + OVERHEAD
                del coll[key]
                if publish is not None:
                    publish(name, key, "delete", None)
            if len(op) == 5:
                if expiring is None:
                    expiring = expires[name] = {}
                expiring[key] = op[4]  # type: ignore[misc]
            elif expiring is not None and expiring.pop(key, None) is not None and not expiring:
                del expires[name]
                expiring = None
        if name is not None:
            sizes[name] += delta
        if self.indexes.live:
            self.indexes.apply(ops)

    def _apply_put(self, name: str, key: str, new: bytes) -> None:
        """:meth:`apply` of a lone put without expiry into an existing collection (a save): the loop's per-run
        bookkeeping skipped, 1.3 -> 0.6 us (issue 15). The same steps: the document, the size, the change feed, and
        any expiry the key held is cleared (the put makes it permanent)."""
        coll = self.data[name]
        if type(coll) is Lazy:
            old_size = coll.swap(key, new)
        else:
            old = coll.get(key)
            coll[key] = new
            old_size = None if old is None else len(old)
        self.sizes[name] += len(new) - old_size if old_size is not None else len(key) + len(new) + OVERHEAD
        self.dirty.add(name)
        feed = self.feed
        if feed is not None and feed.active:
            feed.publish(name, key, "put", new)
        expiring = self.expires.get(name)
        if expiring is not None and expiring.pop(key, None) is not None and not expiring:
            del self.expires[name]

    def _apply_puts(self, ops: list[Op]) -> bool:
        """:meth:`apply` of a batch (:meth:`_batch_puts`) as :meth:`plan` and :meth:`apply_plan` do it, in C-level
        passes. False, with nothing done, for any other record, when a change feed listens (it is told of each
        operation in order) or when a key put holds an expiry (the put clears it).

        Why: the per-operation loop cost 2 us a put into a lazy collection (a probe of the table per key not read
        yet): 2.05 ms of a 1,000-member batch's 4.7 ms at 100k members; this way 0.5-0.7 ms (benchmarks/README.md)."""
        feed = self.feed
        if feed is not None and feed.active:
            return False
        batch = self._batch_puts(ops)
        if batch is None:
            return False
        name, puts = batch
        expiring = self.expires.get(name)
        if expiring and not expiring.keys().isdisjoint(puts):
            return False
        self.apply_plan([self._plan_puts(name, puts)], ops)
        return True

    @staticmethod
    def _batch_puts(ops: list[Op]) -> tuple[str, dict[str, bytes]] | None:
        """(collection, final puts) when every operation is a put without expiry into that one collection (a
        batch: ``put_many``, ``batch_update_members``), else None; the puts as one dict (the last put of a key wins,
        as applying them in order would). Three C-level passes over the operations decide it."""
        name = ops[0][1]
        if set(map(len, ops)) != {4} or set(map(_kind, ops)) != {"p"} or set(map(_collection, ops)) != {name}:
            return None
        return name, {op[2]: op[3] for op in ops}  # type: ignore[misc]

    def _plan_puts(self, name: str, puts: dict[str, bytes]) -> tuple[str, dict[str, bytes], list[str], int, int]:
        """:meth:`plan` of a batch of puts into ``name``: what they replace from :meth:`Lazy.replaced` (a lazy
        collection: no file read, and the snapshot's sizes laid in its dict once built) or :func:`replaced_in`, in
        C-level passes, not a lookup per key."""
        current = self.data.get(name)
        if current is None:
            total, present, delta = 0, 0, 2
        else:
            total, present = current.replaced(puts.keys()) if type(current) is Lazy else replaced_in(
                current, puts.keys())
            delta = 0
        delta += (sum(map(len, puts)) + sum(map(len, puts.values())) + OVERHEAD * len(puts)
                  - total - OVERHEAD * present)
        return name, puts, [], delta, len(puts) - present

    def plan(self, ops: list[Op]) -> Plan | None:
        """What :meth:`apply` would do, worked out without changing anything (a worker thread can run it while
        the lock keeps the documents still): per collection, the final puts, the deletes, the size change and how
        many keys the puts add. :meth:`apply_plan` then makes it visible with a few C-level dict updates, all at
        once for the loop. None when an operation carries or may clear an expiry (json/expiry.py): :meth:`apply`
        does those."""
        expires = self.expires
        if len(ops) >= BULK_APPLY and (batch := self._batch_puts(ops)) is not None:
            return self.plan_batch(*batch)
        final: dict[str, dict[str, bytes | None]] = {}
        for op in ops:
            if len(op) == 5 or op[1] in expires:
                return None
            coll = final.get(op[1])
            if coll is None:
                coll = final[op[1]] = {}
            coll[op[2]] = op[3] if op[0] == "p" else None  # type: ignore[misc]
        plan: Plan = []
        for name, changes in final.items():
            current = self.data.get(name, {})
            size_of = current.size_of if type(current) is Lazy else None  # no file read (json/lazy.py)
            delta = 0 if name in self.data else 2
            puts: dict[str, bytes] = {}
            deletes: list[str] = []
            added = 0
            for key, new in changes.items():
                if size_of is not None:
                    if (old_size := size_of(key)) is not None:
                        delta -= len(key) + old_size + OVERHEAD
                    present = old_size is not None
                else:
                    old = current.get(key)
                    if old is not None:
                        delta -= len(key) + len(old) + OVERHEAD
                    present = old is not None
                if new is not None:
                    puts[key] = new
                    delta += len(key) + len(new) + OVERHEAD
                    added += not present
                elif present:
                    deletes.append(key)
            plan.append((name, puts, deletes, delta, added))
        return plan

    def plan_batch(self, name: str, puts: dict[str, bytes]) -> Plan | None:
        """:meth:`plan` of a batch of puts without expiry into ``name``, given as its final puts (json/put_run.py):
        None when the collection holds expiring documents (the puts clear those expiries: :meth:`apply` does)."""
        return None if name in self.expires else [self._plan_puts(name, puts)]

    def apply_plan(self, plan: Plan, ops: Sequence[Op]) -> None:
        """:meth:`apply` of ``ops``, which :meth:`plan` was given (under the same lock, nothing changed between)."""
        feed = self.feed
        if feed is not None and feed.active:
            self._publish(feed, ops)  # before the documents change: a delete is a change only of a present key
        data, sizes = self.data, self.sizes
        for name, puts, deletes, delta, added in plan:
            coll = data.get(name)
            if coll is None:
                coll = data[name] = {}
                sizes[name] = 0
            if type(coll) is Lazy:
                coll.put_planned(puts, added)  # one dict.update, no file read (plan() sized the old documents)
            else:
                coll.update(puts)
            for key in deletes:
                del coll[key]
            sizes[name] += delta
            self.dirty.add(name)
        if self.indexes.live:
            self.indexes.apply(ops)

    def _publish(self, feed: ChangeFeed, ops: Sequence[Op]) -> None:
        """Tell the change feed of ``ops``, in order, as :meth:`apply` does, before they are applied."""
        present: dict[tuple[str, str], bool] = {}
        data = self.data
        for op in ops:
            where = (op[1], op[2])
            if op[0] == "p":
                feed.publish(op[1], op[2], "put", op[3])  # type: ignore[misc]
                present[where] = True
            elif present.get(where, op[2] in data.get(op[1], ())):
                feed.publish(op[1], op[2], "delete", None)
                present[where] = False

    # ---------------------------------------------------------------------------------------------------------------
    # following the journal
    def follow(self, *, locked: bool) -> None:
        """Apply what other processes committed; flag a catch-up under the lock or a full reload when needed."""
        if self.need_reload or self.journal.fd < 0 or not self.journal.changed():
            return
        journal = self.journal
        ino, offset = journal.ino, journal.offset
        found = journal.follow(self.committed, locked=locked)
        feed = self.feed
        # A rebase copied records we applied already (journal.py): watchers resync rather than see them twice.
        repeats = feed is not None and (journal.crossed_copy or journal.repeats_until > (
            offset if journal.ino == ino else 0))
        if repeats:
            self.feed = None
        records, switched = found.records, found.switched_at
        try:
            # The records of a run are applied as one list of operations (whole-document puts and deletes in
            # journal order: the same result, and the feed hears them in the same order): a writer taking the
            # lock after three others' leases catches up with hundreds of records, and one apply() of a batch
            # costs a fraction of one call per record (issue 15, benchmarks/README.md).
            if switched is None or switched == 0:
                if switched == 0:
                    self.dirty = set()  # another process compacted: its snapshots hold everything before this
                self._apply_run(records)
            else:
                self._apply_run(records[:switched])
                if switched < len(records):
                    self.dirty = set()
                    self._apply_run(records[switched:])
        finally:
            if repeats and feed is not None:
                self.feed = feed
                feed.resync()
        if found.switched_at == len(found.records):
            self.dirty = set()
        self.need_reload = found.reload
        self.need_lock = found.need_lock

    def _apply_run(self, records: list[list[Op]]) -> None:
        """Apply ``records`` in order, as one list of operations when there are several (see :meth:`follow`)."""
        if len(records) == 1:
            self.apply(records[0])
        elif records:
            self.apply([op for ops in records for op in ops])

    def apply_after(self, start: int, stop: int, ops: list[Op]) -> None:
        """After a commit that wrote ``ops`` as the record at ``start``..``stop`` of the journal without catching
        up first (json/store.py, ``_commit_deferred``: ``start`` was the committed end, past what this process had
        read) and published its end: apply the records that other processes committed before it, then ``ops``, in
        journal order (what the change feed hears too). Needs no lock: what lies before ``start`` is committed,
        and another process's compaction leaves the bytes this descriptor reads as they are (as for
        :meth:`follow` unlocked). When those bytes are not whole records up to ``start`` (damage:
        CorruptDataError) or cannot be read (OSError), the view is reloaded at its next use."""
        journal = self.journal
        try:
            records = journal.read_new(end=start, locked=False)
            if journal.offset != start:
                raise CorruptDataError(f"{journal.path}: the journal's committed records do not end where the lock "
                                       f"file says (byte {start}; they end at {journal.offset})",
                                       path=str(journal.path), position=journal.offset)
            journal.offset = stop
            records.append(ops)
            self._apply_run(records)  # one list of operations: see follow()
        except BaseException:
            self.need_reload = True
            raise

    def refresh_read_only(self) -> None:
        """A read-only store never takes the lock: when the committed end is unknown it reads every complete
        record (a record whose fsync is still running may then be seen), and reloads after a generation jump."""
        if self.journal.fd < 0:
            if self.journal.path.exists():
                self.load()
            return
        self.follow(locked=False)
        if self.need_lock and not self.need_reload:
            for ops in self.journal.read_new(end=None, locked=False):
                self.apply(ops)
            self.need_lock = False
        if self.need_reload:
            self.load()

    def catch_up(self) -> None:
        """Under the lock: apply everything committed (cutting away what never was), reload after a generation
        jump, and publish the committed end when it was not known. The common case (nothing new since this
        process's own last publish) costs one ``pread`` of the journal and no read of the lock file."""
        journal = self.journal
        before = (journal.ino, journal.offset)
        self.follow(locked=True)
        if self.need_reload:
            log.info("%s: the journal moved on by more than one compaction: reloading the snapshots", self.path)
            self.load()
        mine = (journal.ino, journal.offset)
        if mine == before and self.lock.published == mine:
            return  # nobody appended since our own publish into this very lock file: it still says this
        committed = self.committed()
        if committed is None or committed != mine:
            self.publish()

    # ---------------------------------------------------------------------------------------------------------------
    # compaction
    def compaction_due(self) -> bool:
        threshold = self.compaction_threshold()
        return threshold is not None and self.journal.offset > threshold

    def compaction_threshold(self) -> float | None:
        """The journal size past which a compaction is due (None: nothing changed in this generation)."""
        if not self.dirty:
            return None
        rewrite = sum(self.sizes.get(c, 0) for c in self.dirty)
        return max(self.min_compact_bytes, COMPACT_RATIO * rewrite)

    def compact(self, also: AbstractSet[str] = frozenset()) -> None:
        """Under the lock: rewrite each changed collection's snapshot (and those in ``also``), then start the next
        journal generation, whose header records every snapshot's checksum.

        Order matters for crashes: snapshots first (each atomic), then the new journal. If we die in between, the
        old journal is replayed onto the new snapshots on the next open, which is harmless (see journal.py).
        A snapshot that was changed behind the store's back is not overwritten (ExternalChangeError).
        """
        names = self.dirty | also
        checksums = {name: crc for name, crc in self.journal.snapshots.items() if name not in names}
        for name in sorted(names):
            if name in self.foreign:
                continue
            path = self.path / f"{name}.json"
            self._check_not_edited(name, path)
            coll = self.data.get(name, {})
            target = _snapshot_target(path)
            lazy = coll if isinstance(coll, Lazy) and self.lazy else None
            changes = lazy.changes() if lazy is not None else None
            spans: Spans | None
            if lazy is not None and changes is not None and MergedSnapshot.possible(changes):
                # the unchanged lines copied from the file, a chunk at a time (json/merged.py): memory is what
                # changed, not the collection
                merged = MergedSnapshot(lazy.file, changes)
                atomic_write(target, merged, sync_dir=target.parent != self.path)
                was_lazy, crc, size, spans = True, merged.crc, merged.size, merged.spans
                del merged
                if not wants_sidecar(size):
                    lazy.whole()  # small now: held whole, like any small snapshot (the old file's bytes, checked)
            else:
                was_lazy = type(coll) is Lazy and not coll.is_whole
                # in parts: joining a 30 MB snapshot is one C call holding the GIL (and the loop) 20-40 ms
                rendered, spans = render_with_spans(coll) if self.lazy else (render_parts(coll), None)
                atomic_write(target, rendered, sync_dir=target.parent != self.path)
                crc = 0
                for part in rendered:
                    crc = zlib.crc32(part, crc)
                size = sum(map(len, rendered))
                del rendered
            checksums[name] = crc
            st = os.stat(target)
            self.files[name] = (_signature(st), crc)
            if spans is not None and wants_sidecar(size):
                table = build_offsets(spans, size, crc, self.sizes.get(name, 2))
                self._write_offsets(name, table)
                if was_lazy:  # read whole only to be rendered: lazy again, over the new file (json/lazy.py)
                    self.data[name] = Lazy(SnapshotFile.adopt(target, table))
            elif self.lazy:
                self._drop_offsets(name)
        sidecar = self.path / EXPIRES_NAME
        if self.expires or sidecar.exists():  # after the snapshots, before the journal (see json/expiry.py)
            atomic_write(sidecar, render_sidecar(self.expires))
        fsync_dir(self.path)
        self.journal.keep_previous()  # for followers that miss this generation entirely
        self.journal.mark_replacing()
        try:
            Journal.create(self.journal.path, self.journal.generation + 1, checksums,
                           previous_end=self.journal.offset)
        except BaseException:
            self.journal.unmark()
            raise
        self.journal.open(lambda: None)  # header only: we hold the lock, nobody appended
        self.publish()
        self.dirty = set()
        self.settle()

    def _drop_offsets(self, name: str) -> None:
        """No sidecar for a snapshot whose keys need escapes or that is small (read whole at open): remove a stale
        one."""
        try:
            os.unlink(self.path / offsets_name(name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: cannot remove %s (%s)", self.path, offsets_name(name), exc)

    def purge_expired(self, now: int) -> set[str]:
        """Drop the documents that are no longer visible at ``now`` from memory (the compaction that follows writes
        the files without them); returns the collections changed. On the event loop, under the lock, before the
        compaction's worker thread starts (which only reads). No journal record: other processes see those
        documents as absent already, and drop them at their next reload or compaction."""
        changed: set[str] = set()
        for name in list(self.expires):
            expiring = self.expires[name]
            dead = dead_keys(expiring, now)
            if not dead:
                continue
            coll = self.data.get(name, {})
            for key in dead:
                raw = coll.pop(key, None)
                if raw is not None:
                    self.sizes[name] -= len(key) + len(raw) + OVERHEAD
                del expiring[key]
            if not expiring:
                del self.expires[name]
            if self.indexes.live:
                self.indexes.apply([("d", name, key) for key in sorted(dead)])  # kept equal to data
            changed.add(name)
        return changed

    def has_expired(self, now: int) -> bool:
        """Whether any document in memory is no longer visible at ``now`` (a compaction would purge it)."""
        return any(dead_keys(expiring, now) for expiring in self.expires.values())

    def _check_not_edited(self, name: str, path: Path) -> None:
        """Refuse to overwrite a snapshot someone else wrote since this process (or the last compaction) did."""
        known = self.files.get(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return  # deleted by hand: memory holds every document, the rewrite brings it back
        if known is not None and _signature(st) == known[0]:
            return
        expected = self.journal.snapshots.get(name, known[1] if known is not None else None)
        if expected is None:
            if known is None and st.st_size > 0:
                raise ExternalChangeError(f"{path} appeared while the store had it open; the file was left as it "
                                          "is", path=str(path))
            return
        crc = zlib.crc32(path.read_bytes())
        if crc != expected:
            raise ExternalChangeError(
                f"{path} was changed outside the store while it was open (the library owns its files while a store "
                "is open: stop the bot to edit them); the store's changes stay in the journal and the file was "
                "left as it is", path=str(path))
        self.files[name] = (_signature(st), crc)


class Staged:
    """Changes being prepared under the lock, layered over the committed data (read-your-writes).

    The changes are kept per collection, ``{collection: {key: bytes or None}}``: a dict of strings to bytes is not
    tracked by the garbage collector, where one dict keyed by ``(collection, key)`` tuples was (a restore's 100k
    staged members were 200k referents, and its expiries as many again, for every full collection meanwhile to walk).
    """

    __slots__ = ("base", "base_expires", "changes", "expiring")

    def __init__(self, base: dict[str, Documents], base_expires: Expiries | None = None) -> None:
        self.base = base
        #: {collection: {key: the staged document, None when deleted}}; a collection is there only once changed
        #: (a view of any other one is its committed data, found without a pass over every change: a restore's
        #: later collections, after 100k staged members, took 5-10 ms on the loop)
        self.changes: dict[str, dict[str, bytes | None]] = {}
        self.base_expires: Expiries = base_expires if base_expires is not None else {}
        #: {collection: {key: the expiry each staged change leaves (None: permanent or deleted)}}
        self.expiring: dict[str, dict[str, int | None]] = {}

    @property
    def names(self) -> AbstractSet[str]:
        """The collections this transaction changed."""
        return self.changes.keys()

    def size(self) -> int:
        """How many changes and expiries are staged."""
        return sum(map(len, self.changes.values())) + sum(map(len, self.expiring.values()))

    def frozen(self, only: str | None = None) -> Staged:
        """A copy whose changes no later :meth:`apply` touches (for a worker thread to read while the loop stages
        more); the committed data is shared: it cannot change while the transaction holds the lock. ``only``: of
        that collection's changes alone (a restore counting each collection after staging 100k members copied
        them all again on the loop for each later one, 5-13 ms)."""
        copy = Staged(self.base, self.base_expires)
        copy.changes = {name: dict(mine) for name, mine in self.changes.items() if only is None or name == only}
        copy.expiring = {name: dict(mine) for name, mine in self.expiring.items() if only is None or name == only}
        return copy

    def get(self, collection: str, key: str) -> bytes | None:
        """The document as staged, visible or not: see :meth:`live`."""
        mine = self.changes.get(collection)
        if mine is not None and key in mine:
            return mine[key]
        coll = self.base.get(collection)
        return coll.get(key) if coll is not None else None

    def expiry(self, collection: str, key: str) -> int | None:
        mine = self.expiring.get(collection)
        if mine is not None and key in mine:
            return mine[key]
        expiring = self.base_expires.get(collection)
        return expiring.get(key) if expiring else None

    def live(self, collection: str, key: str, now: int) -> bytes | None:
        """The document if it is visible at ``now`` (json/expiry.py), else None."""
        raw = self.get(collection, key)
        if raw is None or visible(self.expiry(collection, key), now):
            return raw
        return None

    def present(self, collection: str, key: str, now: int) -> bool:
        """``live(...) is not None`` without the document: a lazy collection answers from its table, no file read
        (a delete needs only to know whether there is something to delete)."""
        mine = self.changes.get(collection)
        if mine is not None and key in mine:
            exists = mine[key] is not None
        else:
            coll = self.base.get(collection)
            exists = coll is not None and key in coll
        return exists and visible(self.expiry(collection, key), now)

    def expiring_in(self, collection: str) -> dict[str, int]:
        """{key: expires} of the collection's expiring documents, staged changes included."""
        out = dict(self.base_expires.get(collection) or {})
        for key, when in (self.expiring.get(collection) or {}).items():
            if when is None:
                out.pop(key, None)
            else:
                out[key] = when
        return out

    def live_view(self, collection: str, now: int) -> Mapping[str, bytes]:
        """:meth:`view` without the documents not visible at ``now``."""
        view = self.view(collection)
        dead = dead_keys(self.expiring_in(collection), now)
        if not dead:
            return view
        return {key: raw for key, raw in view.items() if key not in dead}

    def apply(self, ops: list[Op]) -> None:
        changes, expiring, base_expires = self.changes, self.expiring, self.base_expires
        name: str | None = None
        mine: dict[str, bytes | None] = {}
        for op in ops:
            if op[1] != name:  # the ops of a call are of one collection, mostly
                name = op[1]
                mine = changes.setdefault(name, {})
            key = op[2]
            mine[key] = op[3] if op[0] == "p" else None  # type: ignore[misc]
            if len(op) == 5:
                expiring.setdefault(name, {})[key] = op[4]  # type: ignore[misc]
            elif key in expiring.get(name, ()) or key in base_expires.get(name, ()):
                expiring.setdefault(name, {})[key] = None  # permanent (or gone) now, over an expiry: recorded only then

    def view(self, collection: str) -> Mapping[str, bytes]:
        """The collection as committed plus the changes staged here (a copy only when there are changes)."""
        base = self.base.get(collection, {})
        mine = self.changes.get(collection)
        if not mine:
            return base
        merged = dict(base)
        for key, value in mine.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged

    def keys(self, collection: str) -> set[str]:
        keys = set(self.base.get(collection, ()))
        for key, value in (self.changes.get(collection) or {}).items():
            if value is None:
                keys.discard(key)
            else:
                keys.add(key)
        return keys


def _signature(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is rewritten or replaced (checked before trusting it is still ours)."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def _snapshot_target(path: Path) -> Path:
    """Where a snapshot is written: a symlinked ``<collection>.json`` is followed, and the file it names is
    replaced (atomically, in its own folder), so the link stays. A bot may keep ``members.json`` on a mounted
    volume that way; the library never replaces a link with a regular file."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path
