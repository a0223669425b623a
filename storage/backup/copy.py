"""``copy(source, target)``: move everything from one store to another and prove it arrived.

This is how a bot outgrows its JSON files (``python -m storage copy --from config/ --to postgresql://...``) or
takes its data back out of PostgreSQL. Red-DiscordBot's converter copied without checking; here the copy ends
with a verification that reads the target back and compares per-collection counts and content digests
(:class:`storage.backup.format.ContentDigest`: an order-independent digest of collection, key and canonical
document bytes, so key order and the backends' sort orders do not matter).

What it guarantees, and what it does not:

* The source is read through **one transaction**, so the copy is one consistent snapshot. On JSON files that
  holds the source's lock for the whole copy: the bot's writes to the source wait. Copy with the bot stopped.
* The target is written in batches of ``batch_size`` documents (``put_many``, each batch all or nothing), not in
  one transaction: a failure midway leaves a partial target, which the verification would reject; rerun with
  ``overwrite=True``. Nothing else should write to the target during the copy.
* A target that holds any document or message is refused (:class:`TargetNotEmptyError`) unless ``overwrite`` is
  true; with it, the target ends as an exact replica: its documents and messages that are not in the source are
  deleted.
* The source's declared indexes (``ensure_index``) are declared on the target too, after the documents are in
  (one build over the final data, not an update per document; and on PostgreSQL after the source's transaction
  ended, since ``CREATE INDEX CONCURRENTLY`` waits for every older transaction of the database). With
  ``overwrite`` the target's other indexes are dropped. The verification checks them as well: without them a
  query that was an index lookup on the source would be a scan of the whole collection on the target.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Iterable, Mapping

import orjson

from ..codec import encode_doc
from ..errors import BackupError, ValidationError
from ..interfaces import Backend, BackendTransaction
from ..offload import Pacer, chunks, off_loop
from ..progress import NullProgress, Progress
from ..protocol import Document
from .expiring import put_encoded_with_expiries
from .format import MESSAGES_DIGEST_NAME, ContentDigest, canonical, trimmed
from .indexes import carry_indexes, index_difference
from .messages import MESSAGE_BATCH, MessageOps
from .operations import snapshot_collections, stored_pairs

__all__ = ["copy", "store_digest", "CopyReport", "TargetNotEmptyError", "DEFAULT_BATCH_SIZE"]

DEFAULT_BATCH_SIZE = 5000


class TargetNotEmptyError(BackupError):
    """The copy target already holds data; pass ``overwrite=True`` to replace it. Nothing was written.

    ``contents`` describes what the target holds, so that a command line can name its own flag in its message."""

    def __init__(self, message: str, *, contents: str = "") -> None:
        super().__init__(message)
        self.contents = contents


@dataclasses.dataclass
class CopyReport:
    """What was copied: per-collection counts, the message count (``None`` when not copied), and the digests that
    matched on both sides."""

    counts: dict[str, int]
    messages: int | None
    digests: dict[str, str]
    deleted: int
    seconds: float
    #: Messages of the target deleted by ``overwrite`` before the source's were copied in.
    deleted_messages: int = 0
    #: The source's declared indexes, ``{collection: [path, ...]}``, declared on the target (and verified there).
    indexes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: Indexes of the target the source does not have, dropped by ``overwrite``.
    dropped_indexes: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(self.counts.values()) + (self.messages or 0)


def _same_place(a: Backend, b: Backend) -> bool:
    return a.backend_name == b.backend_name and a.location() == b.location()


async def _pinned(tx: BackendTransaction, seen_before: Iterable[str]) -> tuple[list[str], int]:
    """Pin ``tx``'s snapshot; the collections to read in it and how many documents they hold (for progress)."""
    await tx.pin_snapshot()
    names = await snapshot_collections(tx, seen_before)
    return names, sum([await tx.count(name) for name in names])


async def store_digest(store: Backend, *, messages: bool = True, progress: Progress | None = None) -> ContentDigest:
    """The content digest of everything in ``store``, read through one transaction (one snapshot)."""
    progress = progress or NullProgress()
    digest = ContentDigest()
    seen_before = await store.collections()
    async with store.transaction() as tx:
        names, total = await _pinned(tx, seen_before)
        progress.phase("verify: reading the target", total)
        for name in names:
            view = tx.encoded_documents(name)
            if view is not None:  # held encoded (JSON): decoded one at a time in the thread, none held on the loop
                progress.advance(await off_loop(_digest_view, digest, name, view))
                continue
            # each document's canonical bytes made as it comes (held decoded, 2,000 at a time reached the
            # collector's oldest generation), hashed off the loop (~20 us a document on it)
            async for chunk in chunks(_canonical_items(tx.items(name))):
                await off_loop(_digest_canonical, digest, name, chunk)
                progress.advance(len(chunk))
    if messages:  # not the scan where the backend exports: its decoded records sat on the loop 2,000 at a time
        await MessageOps(store).add_to(digest)
    return digest


def _digest_view(digest: ContentDigest, name: str, view: Mapping[str, bytes]) -> int:
    loads, n = orjson.loads, 0
    pacer = Pacer()  # a whole collection (~1 s at 100k members): the event loop's turns, see Pacer
    for key in list(view):
        digest.add(name, key, canonical(loads(view[key])))
        n += 1
        pacer.tick()
    return n


async def _canonical_items(items: AsyncIterator[tuple[str, Document]]) -> AsyncIterator[tuple[str, bytes]]:
    async for key, doc in items:
        yield key, canonical(doc)


def _digest_canonical(digest: ContentDigest, name: str, chunk: list[tuple[str, bytes]]) -> None:
    pacer = Pacer()
    for key, canon in chunk:
        digest.add(name, key, canon)
        pacer.tick()


async def _describe_contents(store: Backend) -> str:
    parts = [f"{name} ({await store.count(name)})" for name in await store.collections()]
    n = await MessageOps(store).count()
    if n:
        parts.append(f"{n} messages")
    return ", ".join(parts)


async def copy(source: Backend, target: Backend, *, overwrite: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
               progress: Progress | None = None) -> CopyReport:
    """Copy every collection (the migration ledger ``_migrations`` included) and every message from ``source``
    to ``target``, then verify counts and content digests; :class:`BackupError` if they differ."""
    if type(batch_size) is not int or batch_size < 1:
        raise ValidationError(f"batch_size must be a whole number >= 1, got {batch_size!r}", field="batch_size")
    if source is target or _same_place(source, target):
        raise ValidationError("source and target are the same store", field="target")
    progress = progress or NullProgress()
    started = time.monotonic()
    contents = await _describe_contents(target)
    if contents and not overwrite:
        raise TargetNotEmptyError(f"the target already holds data: {contents}; nothing was copied (pass "
                                  "overwrite=True to replace it with the source's data)", contents=contents)
    source_messages, target_messages = MessageOps(source), MessageOps(target)
    digest = ContentDigest()
    keys: dict[str, dict[str, None]] = {}
    message_count: int | None = None
    deleted_messages = 0
    dropped: dict[str, list[str]] = {}
    try:
        indexes = await source._all_indexes()  # the store's, not the transaction's (and a call outside it)
        seen_before = await source.collections()
        async with source.transaction() as tx:
            names, total = await _pinned(tx, seen_before)
            progress.phase("copy: documents", total)
            for name in names:
                keys[name] = await _copy_collection(tx, target, name, digest, batch_size, progress)
            if overwrite:
                progress.phase("copy --overwrite: deleting the target's messages", None)
                deleted_messages = await target_messages.delete_all()
            message_count = await _copy_messages(source_messages, target_messages, digest, progress)
        deleted = await _delete_extras(target, keys, batch_size, progress) if overwrite else 0
        dropped = await carry_indexes(target, indexes, exact=overwrite, progress=progress)
    finally:
        progress.done()
    expected = digest.hexdigests()
    got = (await store_digest(target, messages=message_count is not None, progress=progress)).hexdigests()
    progress.done()
    if got != expected:
        differ = sorted(name for name in set(got) | set(expected) if got.get(name) != expected.get(name))
        raise BackupError(f"copy verification failed: the target's content differs from the source in {differ} "
                          "(was something writing to either store?); rerun with overwrite=True")
    missing, extra = index_difference(indexes, await target._all_indexes())
    if missing or (overwrite and extra):
        raise BackupError(f"copy verification failed: the target's indexes differ from the source's (missing "
                          f"{missing or 'none'}, not in the source {extra if overwrite else 'none'}); rerun with "
                          "overwrite=True")
    counts = {name: n for name, n in digest.counts.items() if name != MESSAGES_DIGEST_NAME}
    return CopyReport(counts, message_count, expected, deleted, time.monotonic() - started, deleted_messages,
                      indexes, dropped)


async def _copy_collection(tx: BackendTransaction, target: Backend, name: str, digest: ContentDigest, batch_size: int,
                           progress: Progress) -> dict[str, None]:
    """The collection's documents put into ``target``; returns their keys (for ``overwrite``), as a dict of
    ``None``: a dict of strings is not tracked by the garbage collector, where a set of 100k keys was 100k more
    referents every full collection during the rest of the copy walked (a set is always tracked)."""
    view = tx.encoded_documents(name)
    if view is not None:
        return await _copy_view(tx, target, name, view, digest, batch_size, progress)
    # Each document is encoded as it comes (as ``_put_stored`` encodes it, a few us): a batch of 5,000 decoded
    # members held on the loop while it filled reached the collector's oldest generation (full collections on
    # the loop, 1-2 a batch); its bytes are not tracked at all. Hashed off the loop (40-80 ms a 1,000 on it).
    keys: dict[str, None] = {}
    batch: list[tuple[str, bytes]] = []
    async for key, doc in tx.items(name):
        keys[key] = None
        batch.append((key, encode_doc(doc)))
        if len(batch) >= batch_size:
            await _put_raws(tx, target, name, digest, batch)
            progress.advance(len(batch))
            batch = []
    if batch:
        await _put_raws(tx, target, name, digest, batch)
        progress.advance(len(batch))
    return keys


async def _put_raws(tx: BackendTransaction, target: Backend, name: str, digest: ContentDigest,
                    batch: list[tuple[str, bytes]]) -> None:
    await off_loop(_digest_raws, digest, name, batch)
    await put_encoded_with_expiries(target, name, batch, await tx._expiries(name, [key for key, _ in batch]))


def _digest_raws(digest: ContentDigest, name: str, batch: list[tuple[str, bytes]]) -> None:
    loads = orjson.loads
    pacer = Pacer()
    for key, raw in batch:
        digest.add(name, key, canonical(loads(raw)))
        pacer.tick()


async def _copy_view(tx: BackendTransaction, target: Backend, name: str, view: Mapping[str, bytes],
                     digest: ContentDigest, batch_size: int, progress: Progress) -> dict[str, None]:
    """A collection the source holds encoded (JSON): each batch decoded, hashed and encoded for the target in a
    worker thread, a document at a time, so that neither the loop nor the thread holds a batch of
    decoded documents. (Read through ``items``, a batch of 5,000 members was ~25k containers held on the loop
    while it filled: they reached the collector's oldest generation, and the full collections that set off, 13-14
    in a copy of 100k members, 10-40 ms each, ran on the loop.)"""
    keys: tuple[str, ...] = await off_loop(tuple, view)  # a tuple of strings: untracked at the first collection
    for start in range(0, len(keys), batch_size):
        chunk = list(keys[start:start + batch_size])
        pairs = await off_loop(stored_pairs, name, chunk, view, digest)
        await put_encoded_with_expiries(target, name, pairs, await tx._expiries(name, chunk))
        progress.advance(len(chunk))
    return await off_loop(dict.fromkeys, keys)


async def _copy_messages(source: MessageOps, target: MessageOps, digest: ContentDigest,
                         progress: Progress) -> int:
    """Every record of ``source`` inserted into ``target`` and added to ``digest``, MESSAGE_BATCH at a time.

    Each record is encoded as the scan yields it and the batch held as lines (bytes, which the garbage collector
    does not track); the target's worker thread decodes them DECODE_GROUP at a time as it encodes them for its
    storage, and hashes them on the way. Held as 2,000 decoded records, every batch reached the collector's oldest
    generation: 38-48 full collections in a copy of 1M messages, 27-33 ms each, most of them on the loop. Each line
    is an exact-size copy (:func:`~.format.trimmed`): orjson's own result keeps a 4 KB buffer, so a batch held
    ~40 MB and its drop on the loop freed 10k such chunks at once.
    """
    progress.phase("copy: messages", None)
    n = 0
    dumps = orjson.dumps
    lines: list[bytes] = []
    async for record in source.scan():
        lines.append(trimmed(dumps(record)))
        if len(lines) >= MESSAGE_BATCH:
            await target.insert_lines(lines, digest)
            n += len(lines)
            progress.advance(len(lines))
            lines = []
    if lines:
        await target.insert_lines(lines, digest)
        n += len(lines)
        progress.advance(len(lines))
    return n


async def _delete_extras(target: Backend, keys: dict[str, dict[str, None]], batch_size: int,
                         progress: Progress) -> int:
    """With ``overwrite``: delete the target's documents that the source does not have, a batch per transaction,
    advancing ``progress`` per batch (on a large target this is minutes of work that must not look hung)."""
    extras: dict[str, list[str]] = {}
    for name in await target.collections():
        wanted = keys.get(name, {})
        found = [key async for key, _ in target.items(name) if key not in wanted]
        if found:
            extras[name] = found
    progress.phase("copy --overwrite: deleting what the source does not have", sum(map(len, extras.values())))
    deleted = 0
    for name, found in extras.items():
        for start in range(0, len(found), batch_size):
            batch = found[start:start + batch_size]
            async with target.transaction() as tx:
                for key in batch:
                    await tx.delete(name, key)
            deleted += len(batch)
            progress.advance(len(batch))
    return deleted
