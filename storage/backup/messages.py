"""The message-analytics part of backups, restores and copies, over the backends' message primitives.

Messages are not documents: a backend keeps them where it can count and scan them fast (a table on PostgreSQL),
and exposes three primitives: ``_scan_messages()`` (every record as a dict), ``_insert_messages(records)`` (bulk,
duplicates by ``message_id`` ignored) and ``_delete_messages_before(before)``. A store without them simply has no
message part in its backups. In a backup, each record is one canonical JSON line of ``messages.jsonl``; in digests
it is keyed by its ``message_id`` under the pseudo-collection ``#messages``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ..child import ChildLost, child_items
from ..errors import BackupError, ValidationError
from ..interfaces import Backend
from ..messages.records import normalize_messages
from ..offload import Pacer, chunks, off_loop
from ..progress import Progress
from ..shards import ShardedKeys
from .format import (
    EMPTY_DIGEST,
    MESSAGES_DIGEST_NAME,
    MESSAGES_FILE,
    ContentDigest,
    JsonlWriter,
    canonical,
    iter_lines,
)

__all__ = ["MessageOps", "MESSAGE_BATCH", "STREAM_BATCH", "DECODE_GROUP", "ROW_GROUP", "CHILD_CHECK_RECORDS",
           "digest_records", "decoded_groups", "checked_count", "BackupBatches", "backup_batches"]

#: Records per ``_insert_messages`` call when restoring or copying.
MESSAGE_BATCH = 10_000
#: Records held at a time where they are decoded dicts while other work goes on (a copy's batches, a JSON
#: restore's staging): every full garbage collection meanwhile walks them (a record is three containers: 10k
#: were ~30k of the ~60k objects such a collection walked, 40-85 ms holding the GIL on a loaded 2-core host).
STREAM_BATCH = 2000
#: Records decoded at a time where they only pass through (``check_backup``'s validation, a JSON restore's
#: staging and a PostgreSQL restore's COPY encoding: what they keep is bytes). Under the collector's youngest
#: threshold (700 new containers; a record is three): such a group is freed before a collection finds it alive,
#: so nothing reaches the oldest generation and no full collection is set off. At 2,000 a group, a check of 1M
#: records ran 38 full collections (18 ms each with the group alive, holding the GIL the event loop needs); at
#: 100 or fewer, none (and the pass itself took half the time: the collections were most of it).
DECODE_GROUP = 64
#: Records validated at a time by ``check_backup`` (in a worker thread): see DECODE_GROUP.
CHECK_BATCH = DECODE_GROUP
#: Records decoded at a time for a PostgreSQL restore's ``COPY`` rows (``_next_copy_data``, in a worker thread),
#: whose encoding allocates more per record than the other passes: what is alive when a collection of the middle
#: generation runs moves to the oldest one. 100k records (tests/test_restore_gc.py's counting): promoted objects
#: 2,151 at 64 a group, 509 at 16, 293 at 8, in the same CPU time; at 1M messages, 28k promoted set off 3 full
#: collections during a restore.
ROW_GROUP = 8
#: Backed-up records from which ``check_backup_anywhere`` checks them in a child process (storage/child.py): a
#: thread checking 1M records (Python, ~10 s) kept the event loop waiting 20-30 ms at a time on a busy 2-core host;
#: starting the child costs ~0.3 s of another core, more than checking this many here.
CHILD_CHECK_RECORDS = 50_000
#: Later than any message: ``_delete_messages_before(END_OF_TIME)`` removes them all.
END_OF_TIME = datetime.max.replace(tzinfo=timezone.utc)


def digest_records(digest: ContentDigest, records: list[dict[str, Any]]) -> None:
    for record in records:
        digest.add(MESSAGES_DIGEST_NAME, str(record.get("message_id")), canonical(record))


#: A record as the backup and the digests need it: ``(message_id, its line, its canonical bytes)``.
Encoded = tuple[str, bytes, bytes]


async def encoded(records: AsyncIterator[dict[str, Any]]) -> AsyncIterator[Encoded]:
    """Each record encoded as it comes (a few us on the loop, in the step that produced it).

    Why not the decoded records, chunked for a worker thread: 2,000 of them held at a time are ~6k containers,
    which reach the collector's oldest generation and set off full collections on the loop (a PostgreSQL backup
    of 1M messages: 36, up to 27 ms each). A tuple of atoms is dropped by the collector at its first look.
    """
    dumps = orjson.dumps
    async for record in records:
        yield str(record.get("message_id")), dumps(record), canonical(record)


def _write_encoded(writer: JsonlWriter, digest: ContentDigest, chunk: list[Encoded]) -> None:
    for mid, line, canon in chunk:
        writer.write(line + b"\n")
        digest.add(MESSAGES_DIGEST_NAME, mid, canon)


def _digest_encoded(digest: ContentDigest, chunk: list[Encoded]) -> None:
    for mid, _line, canon in chunk:
        digest.add(MESSAGES_DIGEST_NAME, mid, canon)


def decoded_groups(lines: list[bytes], digest: ContentDigest | None = None) -> Iterator[list[dict[str, Any]]]:
    """The records of ``lines`` (JSON, one record each) decoded DECODE_GROUP at a time, and added to ``digest`` as
    they are: whoever consumes the groups keeps only what it encodes from them, so no group outlives the
    collector's youngest generation."""
    loads = orjson.loads
    pacer = Pacer()  # the consumer's thread (a copy's target) runs beside the source's: see Pacer
    for start in range(0, len(lines), DECODE_GROUP):
        group = [loads(line) for line in lines[start:start + DECODE_GROUP]]
        if digest is not None:
            digest_records(digest, group)
        yield group
        pacer.tick()


class BackupBatches:
    """The backed-up records of ``entry`` in batches of ``size``, counted into ``progress`` as they go; a
    :class:`storage.child.Recipe`, so that a backend can have a child process read them (a PostgreSQL restore's
    ``COPY`` rows, see postgres/store.py)."""

    def __init__(self, root: Path, entry: dict[str, Any], progress: Progress, size: int) -> None:
        self.root, self.entry, self.progress, self.size = root, entry, progress, size
        self.count = int(entry["count"])

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return self.after(0)

    def after(self, records: int) -> Iterator[list[dict[str, Any]]]:
        for batch in MessageOps.backup_batches(self.root, self.entry, self.size):
            if records >= len(batch):
                records -= len(batch)
                continue
            batch = batch[records:]
            records = 0
            yield batch
            self.progress.advance(len(batch))

    def recipe(self) -> tuple[str, list[Any]]:
        return "storage.backup.messages:backup_batches", [str(self.root), self.entry, self.size]

    def done(self, records: int) -> None:
        self.progress.advance(records)


def backup_batches(root: str, entry: dict[str, Any], size: int) -> Iterator[list[dict[str, Any]]]:
    """:meth:`MessageOps.backup_batches` by name, for a child process (:meth:`BackupBatches.recipe`)."""
    return MessageOps.backup_batches(Path(root), entry, size)


class MessageOps:
    """A store's message records as backups, restores and copies need them, over the backend's message primitives
    (:class:`storage.interfaces.Backend`)."""

    def __init__(self, store: Backend) -> None:
        self.store = store

    def scan(self, snapshot: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every record; in a transaction's exported ``snapshot`` (see ``BackendTransaction.pin_snapshot``) when
        one is given."""
        return self.store._scan_messages(None, None, None, snapshot=snapshot)

    async def count(self) -> int:
        n = 0
        async for _ in self.scan():
            n += 1
        return n

    async def digest(self) -> tuple[int, str]:
        """How many records there are and their content digest (as in a backup manifest); hashed off the loop."""
        digest = ContentDigest()
        await self.add_to(digest)
        return digest.counts.get(MESSAGES_DIGEST_NAME, 0), digest.hexdigests().get(MESSAGES_DIGEST_NAME, EMPTY_DIGEST)

    async def add_to(self, digest: ContentDigest) -> None:
        """Add every record to ``digest`` (under ``#messages``), hashed off the loop: through the backend's export
        where it has one (the JSON files read as bytes in a worker thread, each record's dicts freed as soon as
        it is encoded), else the scan, each record encoded as it comes (:func:`encoded`)."""
        if not await self.store._export_messages(lambda mid, _line, canon: digest.add(MESSAGES_DIGEST_NAME, mid, canon),
                                                 lambda n: None):
            async for chunk in chunks(encoded(self.scan())):
                await off_loop(_digest_encoded, digest, chunk)

    async def insert(self, records: list[dict[str, Any]]) -> int:
        return await self.store._insert_messages(records)

    async def insert_lines(self, lines: list[bytes], digest: ContentDigest | None = None) -> int:
        """Insert the records of ``lines`` (each one normalized record as JSON, ids distinct), decoded DECODE_GROUP
        at a time in the worker thread that encodes them for the store (``Backend._insert_message_groups``), each
        record also added to ``digest`` there when one is given; returns how many were new."""
        return await self.store._insert_message_groups(decoded_groups(lines, digest))

    async def delete_all(self) -> int:
        return await self.store._delete_messages_before(END_OF_TIME)

    async def write_backup_file(self, root: Path, digest: ContentDigest, progress: Progress,
                                snapshot: str | None = None) -> dict[str, Any]:
        """Write ``messages.jsonl`` (read in ``snapshot``, see :meth:`scan`); returns its manifest entry."""
        progress.phase("backup: messages", None)
        writer = JsonlWriter(root, MESSAGES_FILE)
        try:
            def emit(mid: str, line: bytes, canon: bytes) -> None:
                writer.write(line + b"\n")
                digest.add(MESSAGES_DIGEST_NAME, mid, canon)

            if not await self.store._export_messages(emit, progress.advance):  # the backend's faster way, or:
                async for chunk in chunks(encoded(self.scan(snapshot))):  # hashed and gzipped off the loop
                    await off_loop(_write_encoded, writer, digest, chunk)
                    progress.advance(len(chunk))
            return await off_loop(writer.close)
        finally:
            writer.abort()

    @staticmethod
    def backup_batches(root: Path, entry: dict[str, Any], size: int = MESSAGE_BATCH) -> Iterator[list[dict[str, Any]]]:
        """The backed-up records as they are, in batches of :data:`MESSAGE_BATCH` (a line that is not a JSON
        object raises :class:`BackupError`). Run :meth:`check_backup` over the same file first."""
        batch: list[dict[str, Any]] = []
        for number, line in enumerate(iter_lines(root, entry), 1):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BackupError(f"{MESSAGES_FILE} line {number}: not JSON ({exc})") from exc
            if type(record) is not dict:
                raise BackupError(f"{MESSAGES_FILE} line {number}: not a message record")
            batch.append(record)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    @classmethod
    def check_backup(cls, root: Path, entry: dict[str, Any]) -> int:
        """Validate every backed-up record without writing anything; returns how many there are.

        Each record must pass the checks of ``record_messages`` *and already be in the normalized form a store
        returns* (ids as strings, canonical timestamp...), so the restore can insert the records as they are,
        with no second validation pass; and no ``message_id`` may repeat. :class:`BackupError` otherwise.
        """
        seen = ShardedKeys()  # one dict of 1M ids grew in 25-55 ms steps holding the GIL (storage/shards.py)
        try:
            return cls._check_records(root, entry, seen)
        finally:
            seen.clear()  # a shard at a time: freed whole when dropped, 1M ids held the GIL ~50 ms

    @classmethod
    def check_backup_anywhere(cls, root: Path, entry: dict[str, Any]) -> int:
        """:meth:`check_backup`, in a child process when the file is large (:data:`CHILD_CHECK_RECORDS`; the same
        checks, off this process's GIL); here when the child cannot be had or finds something wrong, which then
        raises the error as before (in a worker thread)."""
        if int(entry.get("count", 0)) >= CHILD_CHECK_RECORDS:
            try:
                (count,) = child_items("storage.backup.messages:checked_count", str(root), entry)
                return int(count)
            except ChildLost:
                pass
        return cls.check_backup(root, entry)

    @classmethod
    def _check_records(cls, root: Path, entry: dict[str, Any], seen: ShardedKeys) -> int:
        first = 1
        for batch in cls.backup_batches(root, entry, CHECK_BATCH):
            where = f"{MESSAGES_FILE} (records {first}-{first + len(batch) - 1})"
            try:
                normalized = normalize_messages(batch)
            except ValidationError as exc:
                raise BackupError(f"{where}: {exc}") from exc
            if len(normalized) != len(batch):
                raise BackupError(f"{where}: a message_id appears twice")
            for raw, record in zip(batch, normalized):
                if record != raw:
                    raise BackupError(f"{where}: message {record['message_id']} is not in the normalized form a "
                                      "store writes (was the file edited by hand?)")
                if not seen.add_new(record["message_id"]):
                    raise BackupError(f"{where}: message_id {record['message_id']} appears twice")
            first += len(batch)
        return first - 1


def checked_count(root: str, entry: dict[str, Any]) -> Iterator[int]:
    """:meth:`MessageOps.check_backup` as a child process's one item (see ``check_backup_anywhere``)."""
    yield MessageOps.check_backup(Path(root), entry)
