"""The contract between the features written once (members, message analytics, backups, copies, migrations) and
the backends that store the data (JSON files, PostgreSQL).

A feature talks to a backend only through what this module declares, and never asks which backend it has: no
``getattr`` probing for a private attribute, no ``if backend_name == "json"``. Where the two backends differ in a way
a feature must know (can the messages be replaced inside a document transaction? is there a faster way to export
them?), the difference is a declared capability or primitive here, answered by each backend. A backend, in turn,
never imports a feature: it only implements this contract (see :mod:`storage.stores` for how the two meet).

Everything a backend receives here is already checked and encoded by the written-once layer above it
(:mod:`storage.documents` for documents, :mod:`storage.messages` for message records).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .codec import check_collection
from .config import StoreConfig
from .documents import OpsBase
from .errors import LockTimeoutError, ValidationError
from .feed import ChangeFeed, Watch
from .lifecycle_calls import LifecyclePrimitives, TransactionLifecycle
from .member_calls import MembersMixin
from .protocol import Transaction
from .query.ops import IndexOps

__all__ = ["Backend", "BackendTransaction", "MigrationLock", "MessageSwap", "ExportSink", "Record", "Grouping",
           "TopColumn", "MessageSummary"]

#: A message record as the written-once layer normalized it (the seed's fields plus ``guild_id``).
Record = dict[str, Any]
#: ``emit(message_id, line, canonical)`` for each exported record: its JSON line as stored and its canonical bytes.
ExportSink = Callable[[str, bytes, bytes], None]
#: What :meth:`Backend._group_messages` groups by: the channel or author id, the UTC day of the timestamp
#: (``YYYY-MM-DD``), ``analysis.sentiment`` (None for a record without one).
Grouping = Literal["channel", "author", "day", "sentiment"]
#: What :meth:`Backend._top_messages` ranks: author ids, channel ids, ``analysis.topics`` (once per record).
TopColumn = Literal["author", "channel", "topic"]


class MessageSummary(NamedTuple):
    """What :meth:`Backend._message_summary` reports: how many records, in how many guilds, and the canonical
    timestamp texts of the oldest and newest (by time, not by text; None without records)."""

    records: int
    guilds: int
    oldest: str | None
    newest: str | None


class MigrationLock(abc.ABC):
    """At most one migrator per store, across processes and hosts; each backend owns its kind of lock.

    Two deploys starting at once is the classic way a migration runs twice (alembic #633, dbmate #101). The lock
    is separate from the store's own write lock, so the bot keeps working while a migrator waits for it.

    ``await lock.acquire(timeout)`` -> bool (``timeout=0`` tries once); ``await lock.release()``.
    """

    @abc.abstractmethod
    async def acquire(self, timeout: float) -> bool: ...

    @abc.abstractmethod
    async def release(self) -> None: ...

    async def verify(self, tx: Transaction) -> None:
        """Raise :class:`storage.MigrationError` if the lock was lost since :meth:`acquire` (checked inside ``tx``,
        the step's transaction, just before it commits). A file lock cannot be lost while its process lives."""
        return None

    async def hold(self, timeout: float, what: str) -> None:
        """Acquire or raise :class:`LockTimeoutError` naming what was waited for."""
        if not await self.acquire(timeout):
            raise LockTimeoutError(f"{what}: another migrator held the migration lock for over {timeout}s "
                                   "(is another deploy migrating? see `python -m storage migrate status`)")


class MessageSwap(abc.ABC):
    """How a backend whose messages live outside its document transactions replaces all of them in a restore,
    all or nothing together with the documents, also across a crash (the JSON backend: a staged folder and an
    intent file, see :mod:`storage.backends.json.restore`).

    ``stage`` runs before the restore's transaction, ``begin`` inside it as its last step (handing the swap to the
    transaction, whose commit decides the documents and the messages together, with a commit of its own even when
    no document changes), ``finish`` after it (committed or not): whatever happens, the next lock or open of the
    store leaves the messages matching the transaction's outcome.
    """

    @abc.abstractmethod
    async def stage(self, batches: Iterable[list[Record]]) -> int:
        """Write the (checked) records somewhere private; returns how many were staged."""

    @abc.abstractmethod
    async def begin(self, tx: BackendTransaction, backup_id: str) -> None: ...

    @abc.abstractmethod
    async def finish(self) -> None: ...


class BackendTransaction(MembersMixin, TransactionLifecycle, OpsBase):
    """What a backend's transaction offers beyond the document operations (for backups, copies and migrations);
    it carries the seed's member calls too (``tx.get_member_data``...), written once in :mod:`storage.member_calls`,
    and the data lifecycle (``tx.forget_guild``, ``tx.forget_user``, ``tx.export_user``, ``tx.prune_messages``),
    written once in :mod:`storage.lifecycle_calls` over primitives each backend implements inside its transaction."""

    #: The transaction's own connection for hand-written SQL in a migration (PostgreSQL), else None.
    connection: Any = None
    #: True when :meth:`_replace_messages` swaps the messages inside this transaction (PostgreSQL).
    replaces_messages: bool = False

    @abc.abstractmethod
    async def collections(self) -> list[str]:
        """The collections as this transaction sees them."""

    async def pin_snapshot(self) -> str | None:
        """Make every later read of this transaction see one instant without blocking writers (a backup or copy
        calls it first). Returns an id another connection can read the same instant with (PostgreSQL's exported
        snapshot), or None when the transaction is already a consistent view on its own (the JSON store's lock)."""
        return None

    def encoded_documents(self, collection: str) -> Mapping[str, bytes] | None:
        """The collection's documents as this transaction sees them, already encoded, when the backend holds them
        that way (JSON: in memory); None to have them read through :meth:`items`."""
        return None

    async def _replace_messages(self, batches: Iterable[list[Record]]) -> int:
        """Delete every message and insert ``batches`` in this transaction (only when :attr:`replaces_messages`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace messages inside a transaction")


class Backend(LifecyclePrimitives, OpsBase, IndexOps):
    """What a backend provides to the features written once. See the module doc. (The index calls come from
    :class:`storage.query.ops.IndexOps`: a backend implements ``_ensure_index`` / ``_drop_index`` / ``_indexes`` /
    ``_all_indexes``; the data lifecycle's primitives, ``_forget`` and the ``_owned_*`` reads, are declared in
    :class:`storage.lifecycle_calls.LifecyclePrimitives`.)"""

    config: StoreConfig
    backend_name: str

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[BackendTransaction]: ...

    @abc.abstractmethod
    async def collections(self) -> list[str]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- where the data is -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def location(self) -> str:
        """Where the data lives, for humans and manifests: a folder's absolute path, or a DSN without password."""

    def data_folder(self) -> Path | None:
        """The folder that holds the store's files (JSON), which a migration may also use; None for a server."""
        return None

    def owns_entry(self, name: str, is_dir: bool) -> bool:
        """Whether the top-level entry ``name`` of :meth:`data_folder` belongs to the store: its collections,
        journal, lock, message log... (a backup takes every other file of the folder byte for byte, as the seed's
        ``version.json`` or a flat ``spam_blocker.json``)."""
        return False

    def foreign_files(self) -> dict[str, str]:
        """Files in the data folder that look like collections but are not, and why (shown by ``check``)."""
        return {}

    @abc.abstractmethod
    def migration_lock(self) -> MigrationLock:
        """A new, unheld lock against concurrent migrators of this store."""

    # -- message records ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def _insert_messages(self, records: list[Record]) -> int:
        """Store normalized records with distinct ids, skipping ids already stored; returns how many were new.

        All of them durably, or none (a crash may leave a prefix, which re-sending the batch completes).
        """

    async def _insert_message_groups(self, groups: Iterable[list[Record]]) -> int:
        """:meth:`_insert_messages` of every record of ``groups``, which a worker thread consumes: a caller that
        holds many records as bytes (a copy) decodes them a few dozen at a time inside ``groups``, and a backend
        that encodes each group as it comes never holds them decoded (decoded records held by the thousand reach
        the garbage collector's oldest generation and set off full collections, which hold the GIL the event
        loop needs: see ``backup.messages.DECODE_GROUP``). This default gathers them first."""
        return await self._insert_messages(await asyncio.to_thread(_gathered, groups))

    @abc.abstractmethod
    async def _modify_message(self, message_id: str, fn: Callable[[Record], Record]) -> bool:
        """Replace the record with ``fn(record)`` atomically (no lost update); False if it does not exist.

        If ``fn`` raises, nothing is written and the exception propagates.
        """

    @abc.abstractmethod
    async def _delete_messages_before(self, before: datetime, guild: str | None = None) -> int:
        """Delete every record (of ``guild`` only, when given) with a timestamp strictly before ``before``;
        returns how many."""

    @abc.abstractmethod
    def _scan_messages(self, guild_id: str | None = None, since: datetime | None = None,
                       until: datetime | None = None, *, snapshot: str | None = None) -> AsyncIterator[Record]:
        """Records of a guild (every guild when None) in ``[since, until)``, by (timestamp, message_id); in the
        exported ``snapshot`` of a transaction (see :meth:`BackendTransaction.pin_snapshot`) when one is given."""

    # -- message queries (for :mod:`storage.messages.queries`: a guild id as canonical text, aware UTC bounds) ------
    @abc.abstractmethod
    async def _message_summary(self) -> MessageSummary:
        """Every record's count, distinct guilds, oldest and newest time (``status``): from what the backend keeps
        (SQL aggregates, the JSON column cache in a worker thread), never a scan of every record on the loop."""

    @abc.abstractmethod
    async def _count_messages(self, guild: str, since: datetime | None, until: datetime | None) -> int:
        """How many messages the guild has in ``[since, until)``."""

    @abc.abstractmethod
    async def _group_messages(self, by: Grouping, guild: str, since: datetime | None,
                              until: datetime | None) -> Mapping[str | None, int]:
        """Messages per group (see :data:`Grouping`), only groups that have any, in any order."""

    @abc.abstractmethod
    async def _top_messages(self, column: TopColumn, guild: str, limit: int, since: datetime | None,
                            until: datetime | None) -> list[tuple[str, int]]:
        """The ``limit`` first ``(key, messages)`` by messages descending, then key ascending (as a string)."""

    @abc.abstractmethod
    async def _last_message(self, guild: str, author: str, since: datetime | None,
                            until: datetime | None) -> str | None:
        """The canonical timestamp text of the author's latest message in the guild, or None."""

    @abc.abstractmethod
    async def _refresh_statistics(self, collection: str, guild: str, since: datetime | None,
                                  until: datetime | None) -> int:
        """``refresh_member_statistics`` (the contract is on that method) for the member documents of
        ``collection``; returns how many documents were written."""

    def messages_in_snapshot(self, snapshot: str | None) -> bool:
        """Whether a message scan made while a document transaction is open (in its exported ``snapshot``, if it
        has one) sees the same instant as the transaction: what a backup's manifest records as ``same_snapshot``."""
        return snapshot is not None

    async def _export_messages(self, emit: ExportSink, advance: Callable[[int], None]) -> bool:
        """Every record, in a faster way than :meth:`_scan_messages` if the backend has one (the JSON store reads
        its files as bytes in a worker thread); returns False, having emitted nothing, when it has none."""
        return False

    def message_swap(self) -> MessageSwap | None:
        """A :class:`MessageSwap` when this backend's messages live outside its document transactions (JSON);
        None when a transaction replaces them itself (:attr:`BackendTransaction.replaces_messages`)."""
        return None

    # -- the change feed (storage.feed) ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _change_feed(self) -> ChangeFeed:
        """The feed every committed change of the store (this process's and every other's) is published to, in
        commit order per key; raises :class:`storage.errors.FeedUnavailableError` where the backend cannot follow
        other processes' changes (PostgreSQL behind PgBouncer without ``STORAGE_LISTEN_DSN``)."""

    def watch(self, collection: str | None = None, *, prefix: str | None = None) -> Watch:
        """Committed changes from now on, of every process, as an async iterator (see :class:`storage.feed.Watch`);
        only ``collection``'s (every collection's when None), only keys starting with ``prefix``."""
        self._guard_read()
        if collection is not None:
            check_collection(collection)
        if prefix is not None and not isinstance(prefix, str):
            raise ValidationError("prefix must be a str", field="prefix")
        return self._change_feed().watch(collection, prefix or None)


def _gathered(groups: Iterable[list[Record]]) -> list[Record]:
    out: list[Record] = []
    for group in groups:
        out += group
    return out
