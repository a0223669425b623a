"""Backups and restores, written once for every backend on top of the Store protocol (``BackupMixin``).

The seed copied ``config/*.json`` into ``backups/<time>/`` and back: no verification, a half-written copy looked
like a good one, ``restore_backup("../..")`` wrote anywhere, and there was nothing for PostgreSQL. Here:

* :meth:`BackupMixin.create_backup` reads every collection through **one transaction**, so the backup is one
  consistent snapshot even while the bot keeps writing (JSON files: the transaction holds the store lock, writers
  wait; PostgreSQL: the transaction's snapshot, ``REPEATABLE READ``). It writes the portable format of
  :mod:`storage.backup.format` atomically, verifies what it wrote, and only then prunes old backups.
* :meth:`BackupMixin.restore_backup` verifies first (a damaged backup raises :class:`BackupError` and changes
  nothing), then, in one transaction, saves the current state as a backup of its own and swaps the data in: every
  document not in the backup is deleted, every document that differs is written; all or nothing. A backup of
  either backend restores into either backend.
* Retention is per store (the manifest records which store a backup came from, :mod:`storage.backup.source`):
  it keeps the newest ``keep`` backups of that store and/or those younger than ``keep_days`` (a backup is kept
  when either rule keeps it, like restic's ``--keep-last``/``--keep-within``), always the newest one holding
  data, and never deletes what it cannot read or what another (or an unknown) store made.

Message-analytics records are stored beside the documents in ``messages.jsonl`` (:mod:`storage.backup.messages`):

* **Snapshot.** JSON files: the messages are read while the documents' transaction holds the store lock, so both
  come from the same instant (the manifest says ``"same_snapshot": true``). PostgreSQL: the documents'
  transaction exports its snapshot (``pg_export_snapshot()``) and the messages are read on another connection in
  that same snapshot, so a message recorded during the backup is in neither (``"same_snapshot": true`` too; false
  only for a backend whose transaction offers no snapshot to share).
* **Restore.** Every record is validated first (before anything changes). PostgreSQL: the messages are deleted
  and the backup's inserted in the documents' transaction, so a failure anywhere restores nothing. JSON files: the
  message log lives outside the document transaction, so the backup's messages are first written into a staged
  folder, then swapped in inside the transaction under a durable intent file; the journal commit decides both,
  and a crash at any point is finished or undone by the next lock or open of the store
  (:mod:`storage.backends.json.restore`). Messages whose content digest already equals the backup's are not
  touched.

The declared indexes are in the manifest, and a restore declares those the store lacks after the data is in
(:mod:`storage.backup.indexes`: why, and why none is dropped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import os
import shutil
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from ..documents import normalize_items
from ..errors import BackupError, DatabaseError, ValidationError
from ..interfaces import Backend, BackendTransaction
from ..offload import Pacer, chunks, off_loop
from ..progress import NullProgress, Progress
from ..version import __version__
from .expiring import backup_expiries, manifest_expiries, put_encoded_with_expiries
from .files import collect as collect_files
from .files import restore_files, write_files
from .format import (
    EMPTY_DIGEST,
    FORMAT_NAME,
    FORMAT_VERSION,
    MESSAGES_DIGEST_NAME,
    BackupInfo,
    BackupReport,
    ContentDigest,
    JsonlWriter,
    backup_sort_key,
    canonical,
    check_backup_id,
    collection_file,
    info_from_manifest,
    iter_lines,
    loose_files,
    migration_version,
    new_temp_dir,
    publish,
    read_manifest,
    remove_dir,
    resolve_backup,
    stale_temp_dirs,
    trimmed,
    verify_backup_dir,
    write_manifest,
)
from .indexes import IndexMap, carry_indexes, index_difference, manifest_indexes
from .messages import DECODE_GROUP, ROW_GROUP, BackupBatches, MessageOps
from .source import Source, describe_source, same_store, store_source

__all__ = [
    "BackupMixin", "BackupInfo", "BackupReport", "RestoreReport", "CollectionChange", "LEDGER_COLLECTION",
    "write_backup", "restore_from", "list_backup_entries", "select_expired", "prune_backup_dir", "snapshot_collections",
]

log = logging.getLogger("storage.backup.operations")

#: Where the migrations helper keeps its ledger (keyed by version); copied like any other collection.
LEDGER_COLLECTION = "_migrations"
#: Documents written per ``put_many`` inside a restore transaction. The loop stages each batch in one step (2,000
#: at a time: 4-10 ms of CPU at 100k members, the staged changes growing; up to 22 ms on a loaded host).
RESTORE_BATCH = 1000
_TICK = 1024  # progress is reported every this many records, so a million records cost nothing noticeable


@dataclasses.dataclass(frozen=True)
class CollectionChange:
    """What a restore does (or, in a dry run, would do) to one collection."""

    backup: int
    current: int
    added: int
    changed: int
    removed: int

    @property
    def unchanged(self) -> int:
        return self.backup - self.added - self.changed


@dataclasses.dataclass
class RestoreReport:
    """The outcome of :meth:`BackupMixin.restore_backup`; in a dry run, what would happen (nothing was changed)."""

    backup_id: str
    dry_run: bool
    #: the backup of the state before the restore, taken in the same transaction (``None`` in a dry run)
    safety_backup: str | None
    collections: dict[str, CollectionChange]
    #: ``(before, backup)`` message counts; ``None`` when the backup has no message part (nothing was touched)
    messages: tuple[int, int] | None = None
    #: loose files (``origin:path``, see :mod:`storage.backup.files`) -> restored / unchanged / why not
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the backup's declared indexes the store did not have, ``{collection: [path, ...]}``: declared by the restore
    #: (in a dry run: would be); none is dropped (see storage/backup/indexes.py)
    indexes: IndexMap = dataclasses.field(default_factory=dict)

    @property
    def changed(self) -> int:
        """Documents added, changed or removed."""
        return sum(c.added + c.changed + c.removed for c in self.collections.values())


# ---------------------------------------------------------------------------------------------------------------
# writing a backup
async def snapshot_collections(tx: BackendTransaction, seen_before: Iterable[str]) -> list[str]:
    """The collections to read in ``tx``'s snapshot (pinned first: :meth:`BackendTransaction.pin_snapshot`): what
    the transaction lists, merged with the names seen just before it began, so a collection created or emptied
    around the start is still read; reading a name that is empty in the snapshot costs nothing and writes nothing.
    """
    return sorted(set(seen_before) | set(await tx.collections()))


async def write_backup(store: Backend, tx: BackendTransaction, backup_dir: Path, *, label: str | None = None,
                       seen_before: Iterable[str] = (), progress: Progress | None = None,
                       extra: Iterable[str] | None = None, snapshot: str | None = None,
                       indexes: IndexMap | None = None) -> str:
    """Write a complete backup of what ``tx`` sees into ``backup_dir``; returns its id once it is published.

    ``indexes``: the store's declared indexes, read before ``tx`` began (storage/backup/indexes.py).

    A crash or an exception at any point leaves only a hidden temp folder (removed here on an exception, or by
    a later backup after a crash), never a folder under a backup id.
    """
    progress = progress or NullProgress()
    started = datetime.now(timezone.utc)
    for stale in await asyncio.to_thread(stale_temp_dirs, backup_dir):
        log.warning("%s: removing %s left by an interrupted backup", backup_dir, stale.name)
        await asyncio.to_thread(shutil.rmtree, stale, True)
    tmp = new_temp_dir(backup_dir, started.strftime("%Y%m%d_%H%M%S"))
    try:
        names = await snapshot_collections(tx, seen_before)
        counts = {name: await tx.count(name) for name in names}
        names = [name for name in names if counts[name]]
        messages = MessageOps(store)
        progress.phase("backup: documents", sum(counts.values()))
        digest = ContentDigest()
        entries: dict[str, dict[str, Any]] = {}
        ledger: list[str] = []
        for name in names:
            entries[name] = await _write_collection(store, tx, tmp, name, digest, progress,
                                                    ledger if name == LEDGER_COLLECTION else None)
        message_entry = await messages.write_backup_file(tmp, digest, progress, snapshot)
        data_path = store.data_folder()
        progress.phase("backup: files", None)
        files, skipped = await off_loop(
            collect_files, data_path, store.owns_entry,
            store.config.backup_extra if extra is None else extra, [backup_dir])
        file_entries = await off_loop(write_files, tmp, files)
        digests = digest.hexdigests()
        for name, entry in entries.items():
            entry["digest"] = digests[name]
        message_entry["digest"] = digests.get(MESSAGES_DIGEST_NAME, EMPTY_DIGEST)
        message_entry["same_snapshot"] = store.messages_in_snapshot(snapshot)
        manifest = _manifest(store, started, label, migration_version(ledger), entries, message_entry)
        manifest["indexes"] = indexes or {}
        manifest["files"], manifest["skipped_files"] = file_entries, skipped
        await off_loop(write_manifest, tmp, manifest)
        backup_id = await off_loop(publish, tmp, backup_dir, started)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BackupError(f"writing the backup in {backup_dir} failed, nothing was published: {exc}") from exc
        raise
    finally:
        progress.done()
    return backup_id


def _write_docs(writer: JsonlWriter, name: str, docs: Iterable[tuple[str, Any]], digest: ContentDigest,
                ledger: list[str] | None) -> int:
    """Write ``(key, document)`` pairs (a document may be its encoded bytes); runs in a worker thread."""
    dumps, loads, n = orjson.dumps, orjson.loads, 0
    for key, doc in docs:
        if type(doc) is bytes:
            doc = loads(doc)
        # The file keeps the document as the backend returns it (a JSON store's key order survives a round
        # trip); the digest uses the canonical form, so it is the same whichever backend wrote the backup.
        writer.write(b'{"key":%s,"doc":%s}\n' % (dumps(key), dumps(doc)))
        digest.add(name, key, canonical(doc))
        if ledger is not None:
            ledger.append(key)
        n += 1
    return n


async def _encoded_items(items: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[tuple[str, bytes, bytes]]:
    """``(key, document as JSON, its canonical bytes)`` of each document as it comes (a few us on the loop).

    Not the decoded documents, chunked for a worker thread: 2,000 members held while a chunk filled (~10k
    containers) reached the garbage collector's oldest generation and set off full collections on the loop (a
    PostgreSQL backup of 100k members: 5); a tuple of bytes is untracked at the collector's first look."""
    dumps = orjson.dumps
    async for key, doc in items:
        yield key, dumps(doc), canonical(doc)


def _write_encoded(writer: JsonlWriter, name: str, items: list[tuple[str, bytes, bytes]], digest: ContentDigest,
                   ledger: list[str] | None, progress: Progress) -> None:
    """Write a chunk of :func:`_encoded_items` (in a worker thread), reporting progress every ``_TICK``."""
    dumps, n = orjson.dumps, 0
    for key, raw, canon in items:
        writer.write(b'{"key":%s,"doc":%s}\n' % (dumps(key), raw))
        digest.add(name, key, canon)
        if ledger is not None:
            ledger.append(key)
        n += 1
        if n == _TICK:
            progress.advance(n)
            n = 0
    progress.advance(n)


def _sorted_keys(keys: Iterable[str], run: int = 8192) -> list[str]:
    """``sorted(keys)`` without one long C call: ``sorted`` never lets go of the GIL, and sorting 100k keys at once
    held it (and the event loop with it) for tens of ms. Sorted runs of ``run`` keys are merged in Python instead,
    with a pacer's tick after each run and every :data:`_MERGE_TICK` keys merged: a merge that only gave the GIL
    back every switch interval held it 17 ms at a time beside the backup's other threads (the convoy of
    :class:`~storage.offload.Pacer`)."""
    items = list(keys)
    if len(items) <= run:
        return sorted(items)
    pacer = Pacer()
    runs: list[list[str]] = []
    for start in range(0, len(items), run):
        runs.append(sorted(items[start:start + run]))
        pacer.tick()
    del items
    out: list[str] = []
    append, tick = out.append, pacer.tick
    for key in heapq.merge(*runs):
        append(key)
        if not len(out) % _MERGE_TICK:
            tick()
    return out


#: Keys merged by :func:`_sorted_keys` between two ticks (tens of microseconds).
_MERGE_TICK = 64


def _write_view(writer: JsonlWriter, name: str, view: Mapping[str, bytes], digest: ContentDigest,
                ledger: list[str] | None, progress: Progress) -> None:
    keys = _sorted_keys(view)  # keys, not (key, value) tuples: nothing the garbage collector must walk
    for start in range(0, len(keys), _TICK):  # each document written ticks the writer's pacer
        progress.advance(_write_docs(writer, name, ((k, view[k]) for k in keys[start:start + _TICK]), digest,
                                     ledger))


async def _write_collection(store: Backend, tx: BackendTransaction, root: Path, name: str, digest: ContentDigest,
                            progress: Progress, ledger: list[str] | None) -> dict[str, Any]:
    writer = JsonlWriter(root, collection_file(name))
    try:
        view = tx.encoded_documents(name)
        if view is not None:
            await off_loop(_write_view, writer, name, view, digest, ledger, progress)
        else:
            async for chunk in chunks(_encoded_items(tx.items(name))):
                await off_loop(_write_encoded, writer, name, chunk, digest, ledger, progress)
        entry: dict[str, Any] = await off_loop(writer.close)
        expires = await manifest_expiries(tx, name)
        if expires:
            entry["expires"] = expires  # see backup/expiring.py
        return entry
    finally:
        writer.abort()


def _manifest(store: Backend, started: datetime, label: str | None, migration: str | None,
              entries: dict[str, dict[str, Any]], messages: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_at": started.isoformat(),
        "library_version": __version__,
        "source": _source_entry(store),
        "label": label,
        "migration_version": migration,
        "collections": entries,
        "messages": messages,
    }


def _source_entry(store: Backend) -> dict[str, Any]:
    """The manifest's ``source``: the backend, a display location and the identity retention compares
    (:mod:`storage.backup.source`; never a password)."""
    identity = store_source(store.config)
    return {"backend": store.backend_name, "location": describe_source(identity), "store": identity}


# ---------------------------------------------------------------------------------------------------------------
# restoring
def _read_backup_collection(root: Path, name: str, entry: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """``({key: canonical bytes}, {key: document bytes in its stored key order})`` of one backed-up collection.

    Bytes, not dicts: a seed-shaped member is ~300 bytes encoded but ~3 KB as Python objects, and a restore
    holds a whole collection. Two dicts of bytes rather than one of tuples: neither is tracked by the garbage
    collector, so 100k documents add nothing to its full collections. A malformed line raises :class:`BackupError`.
    """
    canons: dict[str, bytes] = {}
    raws: dict[str, bytes] = {}
    loads, dumps = orjson.loads, orjson.dumps
    for number, line in enumerate(iter_lines(root, entry), 1):
        try:
            record = loads(line)
            key, doc = record["key"], record["doc"]
            if type(key) is not str or type(doc) is not dict or len(record) != 2:
                raise TypeError("expected {\"key\": str, \"doc\": object}")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackupError(f"{entry['file']} line {number}: not a document record ({exc})") from exc
        if key in canons:
            raise BackupError(f"{entry['file']} line {number}: key {key!r} appears twice")
        canons[key], raws[key] = trimmed(canonical(doc)), trimmed(dumps(doc))
    return canons, raws


async def restore_from(store: Backend, root: Path, manifest: dict[str, Any], *, backup_id: str, dry_run: bool = False,
                       progress: Progress | None = None) -> RestoreReport:
    """Make ``store`` hold exactly what the (already verified) backup in ``root`` holds, in one transaction.

    The state being replaced is saved first as a backup in the store's ``backup_dir`` (inside the same
    transaction, so it is exactly what was replaced). Unchanged documents are not rewritten.
    """
    progress = progress or NullProgress()
    backup_dir = Path(store.config.backup_dir)
    wanted_names = set(manifest["collections"])
    wanted_indexes = manifest_indexes(manifest)
    current_indexes = await store._all_indexes()  # before the transaction: the store's, for the safety backup too
    seen_before = await store.collections()
    messages = MessageOps(store)
    message_entry = manifest.get("messages")
    message_counts: tuple[int, int] | None = None
    if message_entry is not None:
        # Messages already equal to the backup's (same content digest) are left alone; otherwise every record is
        # checked now, before anything changes, because they are replaced after the documents commit.
        current, digest = await messages.digest()
        message_counts = (current, int(message_entry["count"]))
        if current == message_entry["count"] and digest == message_entry.get("digest"):
            message_entry = None
        else:
            await asyncio.to_thread(messages.check_backup_anywhere, root, message_entry)
    changes: dict[str, CollectionChange] = {}
    safety: str | None = None
    staged = False  # the whole swap was staged: an error after this point came from the commit itself
    swap = store.message_swap() if message_entry is not None and not dry_run else None
    if swap is not None and message_entry is not None:
        # A backend whose messages live outside its document transactions (JSON files): they are staged first
        # (the slow part, before the lock), then swapped in inside the documents' transaction, all or nothing
        # across a crash too (storage.interfaces.MessageSwap).
        progress.phase("restore: messages (staged)", int(message_entry["count"]))
        staged_count = await swap.stage(BackupBatches(root, message_entry, progress, DECODE_GROUP))
        if staged_count != message_entry["count"]:
            await swap.finish()
            raise BackupError(f"staging the messages of {root.name} gave {staged_count} records instead of "
                              f"{message_entry['count']}: nothing was restored")
    try:
        async with store.transaction() as tx:
            snapshot = await tx.pin_snapshot()
            if not dry_run:
                safety = await write_backup(store, tx, backup_dir, seen_before=seen_before, progress=progress,
                                            label=f"automatic: the state before restoring {backup_id}",
                                            snapshot=snapshot, indexes=current_indexes)
            names = sorted(wanted_names | set(await snapshot_collections(tx, seen_before)))
            progress.phase("restore: documents" if not dry_run else "restore (dry run): documents",
                           sum(int(e["count"]) for e in manifest["collections"].values()))
            for name in names:
                changes[name] = await _restore_collection(store, tx, root, name,
                                                          manifest["collections"].get(name), dry_run, progress)
            if message_entry is not None and not dry_run and tx.replaces_messages:  # PostgreSQL: in this transaction
                await _restore_messages_in(tx, root, message_entry, progress, backup_id)
                message_entry = None  # done
            if swap is not None:
                await swap.begin(tx, backup_id)  # the transaction's commit writes the intent, swaps, decides both
                message_entry = None
            staged = True
    except BaseException as exc:
        if swap is not None:
            try:
                await swap.finish()  # resolves the intent (the documents never committed: rolled back), cleans up
            except Exception as cleanup:  # the intent stays: the next lock or open of the store resolves it
                log.warning("%s: could not resolve the restore's intent yet: %s", backup_dir, cleanup)
        if safety is not None and not staged:
            # The transaction was abandoned before its commit, so nothing changed and the safety backup equals
            # the current state: withdraw it rather than leave clutter. (After a failed commit, whose outcome may
            # be unknown on a lost connection, it is kept.)
            try:
                remove_dir(backup_dir / safety)
            except OSError as cleanup:
                log.warning("%s: could not remove the unused safety backup %s: %s", backup_dir, safety, cleanup)
        if isinstance(exc, ValidationError):
            raise BackupError(f"backup {backup_id} holds data this store refuses, nothing was restored: "
                              f"{exc}") from exc
        raise
    try:
        if swap is not None:
            try:
                await swap.finish()  # the documents committed: the intent resolves forward
            except DatabaseError as exc:
                raise BackupError(f"backup {backup_id} was restored (its documents committed), but finishing the "
                                  f"swap of the messages failed; it completes at the store's next write or open: "
                                  f"{exc}") from exc
        if message_entry is not None and not dry_run:
            await _restore_messages(messages, root, message_entry, progress, backup_id, safety)
        added_indexes = index_difference(wanted_indexes, current_indexes)[0]
        if added_indexes and not dry_run:
            await _restore_indexes(store, wanted_indexes, backup_id, progress)
        # Loose files last: they are beside the store, not in it (see storage/backup/files.py).
        files = await asyncio.to_thread(restore_files, root, loose_files(manifest), store.data_folder(),
                                        store.owns_entry, dry_run)
    finally:
        progress.done()
    changes = {name: change for name, change in changes.items() if change.backup or change.current}
    return RestoreReport(backup_id, dry_run, safety, changes, message_counts, files, added_indexes)


async def _restore_indexes(store: Backend, indexes: IndexMap, backup_id: str, progress: Progress) -> None:
    """Declare the backup's indexes the store lacks, after its data committed (one build over the final data)."""
    try:
        await carry_indexes(store, indexes, exact=False, progress=progress)
    except DatabaseError as exc:
        raise BackupError(f"backup {backup_id} was restored, but declaring its indexes failed (queries give the "
                          f"same answers, slower; call ensure_index again): {exc}") from exc


async def _restore_messages_in(tx: BackendTransaction, root: Path, entry: dict[str, Any], progress: Progress,
                               backup_id: str) -> None:
    """Replace every message with the backup's (already checked) inside the documents' transaction (a backend
    whose transactions replace messages themselves): any failure rolls back the documents too."""
    progress.phase("restore: messages", int(entry["count"]))
    final = await tx._replace_messages(BackupBatches(root, entry, progress, ROW_GROUP))
    if final != entry["count"]:
        raise BackupError(f"restoring the messages of backup {backup_id} would leave {final} records instead of "
                          f"{entry['count']}: nothing was restored")


async def _restore_messages(messages: MessageOps, root: Path, entry: dict[str, Any], progress: Progress,
                            backup_id: str, safety: str | None) -> None:
    """Replace every message with the backup's (already checked), after the documents committed.

    For a backend whose messages live outside the documents' transaction (the JSON message log, whose writes
    take the store lock the transaction holds). If this fails midway, the documents are restored and the
    messages are not all there: the error says so, and the safety backup holds the previous state.
    """
    progress.phase("restore: messages", int(entry["count"]))
    try:
        await messages.delete_all()
        final = 0  # the log was emptied and the ids are unique: every record must be new
        for batch in messages.backup_batches(root, entry):
            final += await messages.insert(batch)
            progress.advance(len(batch))
    except DatabaseError as exc:
        raise BackupError(f"restoring the messages of backup {backup_id} failed after the documents were restored "
                          f"(the previous state is in backup {safety}): {exc}") from exc
    if final != entry["count"]:
        raise BackupError(f"restoring the messages of backup {backup_id} left {final} records instead of "
                          f"{entry['count']} (the previous state is in backup {safety})")


def _canonical_view(view: Mapping[str, bytes]) -> dict[str, bytes]:
    loads, out = orjson.loads, {}
    for key, raw in view.items():
        out[key] = trimmed(canonical(loads(raw)))
    return out


def _diff(current: dict[str, bytes], wanted: dict[str, bytes]) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """``(keys to delete, keys to write, how many of those are new)`` (canonical bytes compared).

    Tuples of strings, which the garbage collector stops tracking at its first look: as lists, a restore's 100k
    keys were 100k more referents for every full collection during the rest of the restore to walk."""
    removed = tuple(_sorted_keys(current.keys() - wanted.keys()))
    puts = tuple([key for key, canon in wanted.items() if current.get(key) != canon])
    return removed, puts, sum(1 for key in puts if key not in current)


def stored_pairs(name: str, keys: list[str], raws: Mapping[str, bytes],
                 digest: ContentDigest | None = None) -> list[tuple[str, bytes]]:
    """``keys``' documents (``raws``: their JSON) encoded as ``_put_stored`` encodes them (no collection rule: see
    storage/rules.py), each hashed into ``digest`` on the way when one is given (a copy's), one decoded document
    alive at a time (in a worker thread): a restore's and a copy's batches.

    Why one: what is alive when a middle-generation collection runs moves to the oldest generation, and a member is
    three tracked containers (with its ``(key, doc)`` pair). Decoded whole batches (2,000 members, ~10k containers)
    handed to the loop and back reached the oldest generation and set off full collections; decoded 64 at a time,
    ~1,200 members (3,600 objects) of a 100k-member copy were still promoted, half of what set off its full
    collection (benchmarks/README.md); the group of one costs ~1 us a document more, in this thread."""
    loads = orjson.loads
    out: list[tuple[str, bytes]] = []
    pacer = Pacer()  # the event loop's turns (a thread running Python alone kept it waiting 15-30 ms: see Pacer)
    for key in keys:
        doc = loads(raws[key])
        if digest is not None:
            digest.add(name, key, canonical(doc))
        out += normalize_items(((key, doc),), name, rule=False)
        pacer.tick()
    return out


async def _restore_collection(store: Backend, tx: BackendTransaction, root: Path, name: str,
                              entry: dict[str, Any] | None, dry_run: bool, progress: Progress) -> CollectionChange:
    wanted, raws = await off_loop(_read_backup_collection, root, name, entry) if entry else ({}, {})
    expiries = backup_expiries(entry, name)
    if expiries:  # what has expired since the backup was taken is not restored (it would read as absent)
        now = tx._now()
        for key in [key for key, when in expiries.items() if when <= now]:
            wanted.pop(key, None)
            del expiries[key]
    current_expiries = await tx._expiries(name, None)
    view = tx.encoded_documents(name)
    if view is not None:
        current = await off_loop(_canonical_view, view)
    else:
        current = {}
        async for key, doc in tx.items(name):  # each document's canonical bytes made as it comes (held decoded,
            current[key] = trimmed(canonical(doc))  # a chunk reached the collector's oldest generation)
    removed, puts, added = await off_loop(_diff, current, wanted)
    if expiries or current_expiries:  # same content but another expiry: written again, with the backup's
        writing = set(puts)
        puts += tuple([key for key in wanted if key not in writing
                       and expiries.get(key) != current_expiries.get(key)])
    if not dry_run:
        for key in removed:
            await tx.delete(name, key)
        for start in range(0, len(puts), RESTORE_BATCH):
            pairs = await off_loop(stored_pairs, name, list(puts[start:start + RESTORE_BATCH]), raws)
            await put_encoded_with_expiries(tx, name, pairs, expiries)
        final = await tx.count(name)
        if final != len(wanted):
            raise BackupError(f"restoring {name!r} would leave {final} documents instead of {len(wanted)}; "
                              "nothing was restored")
    progress.advance(len(wanted))
    change = CollectionChange(len(wanted), len(current), added, len(puts) - added, len(removed))
    held: list[dict[str, bytes] | tuple[str, ...]] = [puts, removed, wanted, raws, current]
    del puts, removed, wanted, raws, current
    await off_loop(_free, held)  # dropped with this frame, 100k members took 4-7 ms
    return change


def _free(held: list[dict[str, bytes] | tuple[str, ...]]) -> None:
    """Free what ``held`` holds, its only reference (in a worker thread, which can give the GIL back between two
    steps; the last reference dropped on the loop frees a whole collection's bytes in one step): dicts a slice at a
    time, the tuples of keys whole once the dicts no longer hold the keys (~100k small strings, a few ms)."""
    pacer = Pacer()
    while held:
        items = held.pop()
        if isinstance(items, dict):
            while items:
                for _ in range(min(len(items), 1000)):
                    items.popitem()
                pacer.tick()
        del items


# ---------------------------------------------------------------------------------------------------------------
# listing and retention
def list_backup_entries(backup_dir: Path) -> list[tuple[str, BackupInfo | BackupError]]:
    """Every folder named like a backup, oldest first, with its info or why its manifest cannot be read."""
    try:
        entries = list(os.scandir(backup_dir))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError(f"cannot list {backup_dir}: {exc}") from exc
    out: list[tuple[str, BackupInfo | BackupError]] = []
    for entry in entries:
        try:
            check_backup_id(entry.name)
        except BackupError:
            continue  # temp folders, notes, anything else: not ours to list
        if entry.is_symlink() or not entry.is_dir():
            continue
        path = Path(entry.path)
        try:
            out.append((entry.name, info_from_manifest(entry.name, path, read_manifest(path))))
        except (BackupError, ValidationError, KeyError, TypeError, ValueError) as exc:
            out.append((entry.name, exc if isinstance(exc, BackupError) else BackupError(f"manifest: {exc!r}")))
    out.sort(key=lambda item: backup_sort_key(item[0]))
    return out


def select_expired(backups: list[BackupInfo], keep: int | None = None, keep_days: float | None = None,
                   now: datetime | None = None) -> list[BackupInfo]:
    """The backups retention removes, among ``backups`` (all of one store: see :func:`prune_backup_dir`).

    A backup stays when it is among the newest ``keep`` **or** younger than ``keep_days``; with neither rule
    nothing is removed. The newest backup is always kept, and so is the newest backup that holds any data: a
    store emptied by mistake, backed up every hour, never pushes out the last backup of its data.
    """
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ValidationError(f"keep must be a whole number >= 1, got {keep!r}", field="keep")
    if keep_days is not None and (isinstance(keep_days, bool) or not isinstance(keep_days, (int, float))
                                  or not keep_days >= 0):
        raise ValidationError(f"keep_days must be a number >= 0, got {keep_days!r}", field="keep_days")
    if keep is None and keep_days is None:
        return []
    ordered = sorted(backups, key=lambda b: backup_sort_key(b.id))
    kept = {ordered[-1].id} if ordered else set()
    holding_data = [b for b in ordered if b.records]
    if holding_data:
        kept.add(holding_data[-1].id)
    if keep is not None:
        kept.update(b.id for b in ordered[-keep:])
    if keep_days is not None:
        cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=keep_days)
        kept.update(b.id for b in ordered if b.created_at >= cutoff)
    return [b for b in ordered if b.id not in kept]


def prune_backup_dir(backup_dir: Path, keep: int | None, keep_days: float | None, *, source: Source,
                     dry_run: bool = False, now: datetime | None = None) -> list[BackupInfo]:
    """Apply retention to the backups of store ``source`` in ``backup_dir``; returns what was (or, in a dry run,
    would be) removed.

    Only backups whose manifest names the same store are counted and removed: other stores' backups and backups
    of unknown source (see :mod:`storage.backup.source`) are never touched, nor is a backup that cannot be read.
    """
    entries = list_backup_entries(backup_dir)
    readable = [info for _, info in entries if isinstance(info, BackupInfo) and same_store(info.source, source)]
    expired = select_expired(readable, keep, keep_days, now)
    if dry_run:
        return expired
    for stale in stale_temp_dirs(backup_dir):
        shutil.rmtree(stale, ignore_errors=True)
    for info in expired:
        try:
            remove_dir(info.path)
        except OSError as exc:
            raise BackupError(f"cannot remove backup {info.id}: {exc}") from exc
        log.info("%s: removed backup %s of %s (retention)", backup_dir, info.id, describe_source(source))
    return expired


# ---------------------------------------------------------------------------------------------------------------
# the Store methods
class BackupMixin(Backend):
    """``create_backup`` / ``list_backups`` / ``verify_backup`` / ``restore_backup`` / ``prune_backups`` for every
    backend, over the contract of :mod:`storage.interfaces`. Backups live in ``store.config.backup_dir``
    (``STORAGE_BACKUP_DIR``, default ``./backups``)."""

    def _backup_root(self) -> Path:
        return Path(self.config.backup_dir)

    async def create_backup(self, *, keep: int | None = None, keep_days: float | None = None,
                            label: str | None = None, progress: Progress | None = None,
                            extra: Iterable[str] | None = None) -> BackupInfo:
        """Back up every collection (and message) from one snapshot, verify it, then apply retention.

        A JSON store's backup also holds every other file of its data folder, and ``extra`` files/globs outside
        it (default ``config.backup_extra``, ``STORAGE_BACKUP_EXTRA``): see :mod:`storage.backup.files`.

        ``keep`` defaults to ``config.backup_keep`` (``STORAGE_BACKUP_KEEP``). Retention runs only after the new
        backup verified, so a failing disk never costs the old backups.
        """
        store = self
        store._guard_read()
        if keep is None:
            keep = self.config.backup_keep
        select_expired([], keep, keep_days)  # reject bad retention arguments before doing any work
        indexes = await store._all_indexes()  # the store's, not the transaction's: read before it
        seen_before = await store.collections()
        async with store.transaction() as tx:
            snapshot = await tx.pin_snapshot()
            backup_id = await write_backup(store, tx, self._backup_root(), label=label, seen_before=seen_before,
                                           progress=progress, extra=None if extra is None else list(extra),
                                           snapshot=snapshot, indexes=indexes)
        report = await asyncio.to_thread(verify_backup_dir, self._backup_root(), backup_id)
        if not report.ok or report.info is None:
            raise BackupError(f"the new backup {backup_id} failed verification right after it was written (kept "
                              f"for inspection; nothing was pruned): " + "; ".join(report.problems))
        if keep is not None or keep_days is not None:
            await asyncio.to_thread(prune_backup_dir, self._backup_root(), keep, keep_days,
                                    source=store_source(self.config))
        return report.info

    async def list_backups(self) -> list[BackupInfo]:
        """The readable backups in ``backup_dir``, oldest first (see ``storage backup list`` for unreadable ones)."""
        entries = await asyncio.to_thread(list_backup_entries, self._backup_root())
        return [info for _, info in entries if isinstance(info, BackupInfo)]

    async def verify_backup(self, backup_id: str, *, progress: Progress | None = None) -> BackupReport:
        """Check every file's hash, size and record count against the manifest; ``.ok`` and ``.problems``."""
        return await asyncio.to_thread(verify_backup_dir, self._backup_root(), check_backup_id(backup_id), progress)

    async def restore_backup(self, backup_id: str, dry_run: bool = False, *,
                             progress: Progress | None = None) -> RestoreReport:
        """Replace the store's data with the backup's, all or nothing, after verifying it.

        Raises :class:`BackupError` (and changes nothing) when the id is not a backup, verification fails or
        the backup holds a record this store refuses. Otherwise the current state is first saved as a new backup
        (``report.safety_backup``), then the documents and the messages are swapped all or nothing, also across
        a crash (see the module docstring). ``dry_run=True`` only reports what would change.
        """
        store = self
        store._guard_write()
        report = await asyncio.to_thread(verify_backup_dir, self._backup_root(), check_backup_id(backup_id),
                                         progress)
        if not report.ok:
            raise BackupError(f"backup {backup_id} failed verification, nothing was restored: "
                              + "; ".join(report.problems))
        root = resolve_backup(self._backup_root(), backup_id)
        manifest = read_manifest(root)
        return await restore_from(store, root, manifest, backup_id=backup_id, dry_run=dry_run, progress=progress)

    async def prune_backups(self, keep: int | None = None, keep_days: float | None = None, *,
                            dry_run: bool = False) -> list[BackupInfo]:
        """Remove this store's backups that retention does not keep (``keep`` defaults to ``config.backup_keep``);
        backups of other stores in the same folder are never counted nor removed."""
        if keep is None:
            keep = self.config.backup_keep
        return await asyncio.to_thread(prune_backup_dir, self._backup_root(), keep, keep_days, dry_run=dry_run,
                                       source=store_source(self.config))
