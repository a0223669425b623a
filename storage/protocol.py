"""The ``Store`` protocol: the one interface both backends implement and every feature above them uses.

Documents are JSON objects grouped in named collections and addressed by string keys. Everything written once for
all backends (the seed's member calls, migrations, backups, analytics helpers) talks to this protocol only, so a
new backend gets those features by implementing it, and the conformance tests prove it behaves the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload, runtime_checkable

if TYPE_CHECKING:  # names only: these modules sit above this one
    from .backup.format import BackupInfo, BackupReport
    from .backup.operations import RestoreReport
    from .config import StoreConfig
    from .feed import Watch
    from .interfaces import MigrationLock
    from .progress import Progress
    from .types import Member, MessageRecord

__all__ = ["Document", "Key", "Items", "UpdateFn", "TimeBound", "DocumentOps", "Transaction", "Store"]

Document = dict[str, Any]
#: A document key: a str, or a non-negative int (a snowflake such as ``guild.id``) stored as its decimal text.
Key = str | int
Items = Mapping[str, Document] | Mapping[int, Document] | Iterable[tuple[Key, Document]]
#: ``fn(doc) -> doc``; returning ``None`` keeps the (mutated) doc it was given.
UpdateFn = Callable[[Document], Document | None]
TimeBound = str | datetime | None
_T = TypeVar("_T")


@runtime_checkable
class DocumentOps(Protocol):
    """Document operations shared by a store and by a transaction on it."""

    @overload
    async def get(self, collection: str, key: Key) -> Document | None: ...

    @overload
    async def get(self, collection: str, key: Key, default: Document) -> Document: ...

    @overload
    async def get(self, collection: str, key: Key, default: _T) -> Document | _T: ...

    async def get(self, collection: str, key: Key, default: Any = None) -> Any:
        """A fresh ``dict`` the caller may mutate, or ``default`` when the key is absent (typed: ``Document |
        None``, or ``Document | type(default)``)."""

    async def get_many(self, collection: str, keys: Iterable[Key]) -> dict[str, Document]:
        """The documents that exist among ``keys``, as ``{key: doc}``."""

    async def put(self, collection: str, key: Key, doc: Document, *, ttl: float | None = None,
                  expires_at: datetime | None = None) -> None:
        """Insert or replace one document; durable when it returns. With ``ttl`` (seconds) or ``expires_at`` (an
        aware datetime) it reads as absent from that instant on; without, it is permanent (storage/expiry.py)."""

    async def put_many(self, collection: str, items: Items, *, ttl: float | None = None,
                       expires_at: datetime | None = None) -> int:
        """Insert or replace many documents at once, all or nothing; returns how many were given. One expiry
        (``ttl``/``expires_at``) for the whole batch, as for :meth:`put`."""

    async def delete(self, collection: str, key: Key) -> bool:
        """Remove a document; True if it existed."""

    async def update(self, collection: str, key: Key, fn: UpdateFn, default: Document | None = None, *,
                     ttl: float | None = None, expires_at: datetime | None = None) -> Document:
        """Atomic read-modify-write: ``fn`` sees the current doc (``default`` or ``{}`` when absent or expired)
        while no other writer, in this process or another, can change that key. Returns the stored result, which
        is permanent unless ``ttl``/``expires_at`` is given again (expiry is explicit on every write)."""

    def items(self, collection: str, prefix: str | None = None) -> AsyncIterator[tuple[str, Document]]:
        """``(key, doc)`` pairs in key order (code point order), optionally only keys starting with ``prefix``."""

    async def count(self, collection: str, where: dict[str, Any] | None = None, *, prefix: str | None = None) -> int:
        """Number of documents in ``collection`` (matching ``where`` / ``prefix`` when given)."""

    async def find(self, collection: str, where: dict[str, Any] | None = None, *, prefix: str | None = None,
                   order_by: str | None = None, limit: int | None = None,
                   offset: int = 0) -> list[tuple[str, Document]]:
        """Matching ``(key, doc)`` pairs, ordered (see :mod:`storage.query.plan` for the rules)."""

    async def delete_many(self, collection: str, where: dict[str, Any] | None = None, *,
                          prefix: str | None = None) -> int:
        """Delete the matching documents atomically; returns how many."""


@runtime_checkable
class Transaction(DocumentOps, Protocol):
    """What ``async with store.transaction() as tx`` yields: all writes commit together or not at all."""

    #: The transaction's own connection, for hand-written SQL inside it (PostgreSQL); None on the JSON backend.
    connection: Any

    async def collections(self) -> list[str]: ...

    # The seed's member calls, inside the transaction (they see its writes and commit with it).
    async def get_member_data(self, user_id: int | str, guild_id: int | str,
                              default: Mapping[str, Any] | None = None) -> Member: ...

    async def save_member_data(self, user_id: int | str, guild_id: int | str, data: Member | Document) -> bool: ...

    async def batch_update_members(self, updates: Iterable[Mapping[str, Any]]) -> int: ...

    # The data lifecycle, inside the transaction (it sees the forgotten data as absent; committed with it).
    async def forget_guild(self, guild_id: int | str, *, dry_run: bool = False) -> dict[str, int]: ...

    async def forget_user(self, user_id: int | str, *, guild_id: int | str | None = None,
                          dry_run: bool = False) -> dict[str, int]: ...

    async def export_user(self, user_id: int | str, *, guild_id: int | str | None = None) -> dict[str, Any]: ...

    async def prune_messages(self, before: str | datetime, *, guild_id: int | str | None = None) -> int: ...


@runtime_checkable
class Store(DocumentOps, Protocol):
    """A document store plus the bot-facing calls of the seed, the analytics queries and the backups."""

    config: StoreConfig
    backend_name: str

    @property
    def closed(self) -> bool: ...

    def location(self) -> str:
        """Where the data lives: a folder's absolute path, or the DSN without its password."""

    def data_folder(self) -> Path | None:
        """The JSON store's folder (None on PostgreSQL)."""

    def migration_lock(self) -> MigrationLock:
        """A new lock against concurrent migrators of this store (see :mod:`storage.migrations`)."""

    async def collections(self) -> list[str]:
        """Names of the collections that hold at least one document, sorted."""

    async def ensure_index(self, collection: str, path: str) -> bool:
        """Index a field path (persistent); True if created."""

    async def drop_index(self, collection: str, path: str) -> bool: ...

    async def indexes(self, collection: str) -> list[str]: ...

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """A transaction: reads see its own writes; an exception inside writes nothing."""

    async def close(self) -> None:
        """Flush and release everything; afterwards every call raises :class:`storage.DatabaseError`."""

    def watch(self, collection: str | None = None, *, prefix: str | None = None) -> Watch:
        """Every process's committed changes from now on: ``async for change in store.watch("settings")``."""

    async def purge_expired(self) -> int:
        """Remove expired documents (already absent to every read) from the files or tables now; returns how many."""

    # The seed's member calls ------------------------------------------------------------------------------------
    async def get_member_data(self, user_id: int | str, guild_id: int | str,
                              default: Mapping[str, Any] | None = None) -> Member: ...

    async def save_member_data(self, user_id: int | str, guild_id: int | str, data: Member | Document) -> bool: ...

    async def batch_update_members(self, updates: Iterable[Mapping[str, Any]]) -> int: ...

    # Message analytics ------------------------------------------------------------------------------------------
    async def record_message(self, record: Mapping[str, Any]) -> bool: ...

    async def record_messages(self, records: Iterable[Mapping[str, Any]]) -> int: ...

    async def update_message(self, message_id: int | str, changes: Mapping[str, Any]) -> bool: ...

    async def prune_messages(self, before: str | datetime, *, guild_id: int | str | None = None) -> int: ...

    # the data lifecycle (storage.lifecycle)
    async def forget_guild(self, guild_id: int | str, *, dry_run: bool = False) -> dict[str, int]: ...

    async def forget_user(self, user_id: int | str, *, guild_id: int | str | None = None,
                          dry_run: bool = False) -> dict[str, int]: ...

    async def export_user(self, user_id: int | str, *, guild_id: int | str | None = None) -> dict[str, Any]: ...

    def scan_messages(self, guild_id: int | str | None = None, since: TimeBound = None,
                      until: TimeBound = None) -> AsyncIterator[MessageRecord]: ...

    async def message_counts(self, guild_id: int | str, by: str | None = None, *, since: TimeBound = None,
                             until: TimeBound = None) -> int | dict[str, int]: ...

    async def top_authors(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                          until: TimeBound = None) -> list[tuple[str, int]]: ...

    async def top_channels(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                           until: TimeBound = None) -> list[tuple[str, int]]: ...

    async def top_topics(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                         until: TimeBound = None) -> list[tuple[str, int]]: ...

    async def sentiment_breakdown(self, guild_id: int | str, *, since: TimeBound = None,
                                  until: TimeBound = None) -> dict[str, int]: ...

    async def last_activity(self, guild_id: int | str, author_id: int | str, *, since: TimeBound = None,
                            until: TimeBound = None) -> str | None: ...

    async def refresh_member_statistics(self, guild_id: int | str, *, since: TimeBound = None,
                                        until: TimeBound = None) -> int: ...

    # Backups ----------------------------------------------------------------------------------------------------
    async def create_backup(self, *, keep: int | None = None, keep_days: float | None = None,
                            label: str | None = None, progress: Progress | None = None,
                            extra: Iterable[str] | None = None) -> BackupInfo: ...

    async def list_backups(self) -> list[BackupInfo]: ...

    async def verify_backup(self, backup_id: str, *, progress: Progress | None = None) -> BackupReport: ...

    async def restore_backup(self, backup_id: str, dry_run: bool = False, *,
                             progress: Progress | None = None) -> RestoreReport: ...

    async def prune_backups(self, keep: int | None = None, keep_days: float | None = None, *,
                            dry_run: bool = False) -> list[BackupInfo]: ...
