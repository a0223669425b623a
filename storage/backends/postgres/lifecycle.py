"""The PostgreSQL backend's lifecycle primitives (:class:`storage.interfaces.Backend`): what an owner owns, and
forgetting it in one SQL transaction (documents and messages commit together or not at all).

Whose data is what (:mod:`storage.ownership`) in SQL, each an index range, never a scan of the documents table:

* a guild's documents (key ``G`` or ``G_...``): per collection (a loose index scan enumerates them, like
  ``collections()``), the primary key range ``[G_, G`)`` plus the key ``G`` itself;
* a user's documents (key ``U`` or ``..._U``): one range of ``storage_documents_key_reversed``, the index on
  ``reverse(key)`` (schema version 4): ``reverse(key)`` equal to ``reverse(U)`` or in ``[reverse(U)_,
  reverse(U)`)``, since ``'`'`` follows ``'_'``; in one guild, the same range filtered by the guild's prefix;
* a guild's messages: ``guild_id = G`` (the covering index); a user's: ``author_id = U``, in one guild with
  ``guild_id = G`` too (the covering index holds ``author_id``). Messages have no author index (schema version 2
  dropped it: it made every ingested row cost a random index insert); forgetting a user across every guild reads
  the messages table once (about 0.2 s per million rows here), which a rare data-deletion request can afford and a
  bot's ingest could not.

The statements are module constants so that tests can ``EXPLAIN`` exactly what runs (tests/test_lifecycle.py).

A transaction (:class:`PgTxLifecycle`) runs the same statements on its own connection: a forget or a prune is then
part of that transaction (rolled back with it; its later reads see the rows gone), and the change-feed
notifications of the deleted documents are sent in it, so that watchers hear of them only if it commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

from ...ownership import Owner
from ...protocol import Document
from . import conn as pg_conn
from . import documents as sql
from . import notify
from .messages import COLUMNS, delete_before, to_record
from .schema import ID_SHIFT

__all__ = ["PgLifecycle", "PgTxLifecycle", "documents_where", "messages_where", "select_documents", "delete_owned",
           "forget_owned"]

Record = dict[str, Any]

_COLLECTIONS_CTE = """WITH RECURSIVE c(name) AS (
    SELECT min(collection) FROM storage_documents
    UNION ALL
    SELECT (SELECT min(collection) FROM storage_documents WHERE collection > c.name) FROM c WHERE c.name IS NOT NULL
)"""
# Expiring documents (storage/expiry.py): an expired document reads as absent, so a SELECT (export, dry run) sees
# only the visible ones (documents.live, with the store's now as the last parameter); a DELETE removes the
# expired ones too (their bytes are the user's data as well) but reports which were visible, and only those count.
# A guild's keys in one collection: the one primary key range [G, G`) (it holds G, G_... and a few others, which
# the rest of the condition drops). The LATERAL join (kept apart by OFFSET 0) makes it one index probe per
# collection instead of a scan of the table.
_GUILD_MATCH = "d.collection = c.name AND d.key >= $1 AND d.key < $3 AND (d.key = $1 OR starts_with(d.key, $2))"
_GUILD_ROWS = ("c CROSS JOIN LATERAL (SELECT d.collection, d.key, d.doc, d.expires_at FROM storage_documents d "
               "WHERE " + _GUILD_MATCH + " OFFSET 0) AS o")
GUILD_SELECT = (_COLLECTIONS_CTE + " SELECT o.collection, o.key, o.doc FROM " + _GUILD_ROWS + " WHERE "
                + sql.live("$4", "o."))
# The DELETEs answer one row of three arrays (collection, key, visible), not a row per document: a forget of a
# 20k-member guild received 20k asyncpg Records, containers the collector tracks, alive while they arrived over
# several socket reads; 12-14k of them reached its oldest generation and set off a full collection (of the whole
# process heap, holding the GIL) inside the call. Arrays of text and booleans are three lists of atoms.
_ARRAYS = " SELECT array_agg(collection), array_agg(key), array_agg(visible) FROM gone"
GUILD_DELETE = (_COLLECTIONS_CTE + ", gone AS (DELETE FROM storage_documents t USING (SELECT o.collection, o.key "
                "FROM " + _GUILD_ROWS + ") AS m WHERE t.collection = m.collection AND t.key = m.key "
                "RETURNING t.collection, t.key, " + sql.live("$4", "t.") + " AS visible)" + _ARRAYS)
_USER_MATCH = "(reverse(d.key) = $1 OR (reverse(d.key) >= $2 AND reverse(d.key) < $3))"
_USER_GUILD_MATCH = "reverse(d.key) >= $1 AND reverse(d.key) < $2 AND d.key >= $3 AND d.key < $4"
USER_SELECT = ("SELECT d.collection, d.key, d.doc FROM storage_documents d WHERE " + _USER_MATCH + " AND "
               + sql.live("$4", "d."))
USER_DELETE = ("WITH gone AS (DELETE FROM storage_documents d WHERE " + _USER_MATCH + " RETURNING d.collection, "
               "d.key, " + sql.live("$4", "d.") + " AS visible)" + _ARRAYS)
USER_GUILD_SELECT = ("SELECT d.collection, d.key, d.doc FROM storage_documents d WHERE " + _USER_GUILD_MATCH
                     + " AND " + sql.live("$5", "d."))
USER_GUILD_DELETE = ("WITH gone AS (DELETE FROM storage_documents d WHERE " + _USER_GUILD_MATCH + " RETURNING "
                     "d.collection, d.key, " + sql.live("$5", "d.") + " AS visible)" + _ARRAYS)


def _after(prefix: str) -> str:
    """The first string after every string that starts with ``prefix`` (which ends with ``_``: ``` follows)."""
    assert prefix.endswith("_")
    return prefix[:-1] + "`"


def documents_where(owner: Owner, now: datetime) -> tuple[str, str, list[Any]]:
    """The SELECT and the DELETE statements of the owner's documents, and their arguments (``now``, the store's
    clock, decides which expiring documents are visible)."""
    if owner.user is None:
        assert owner.guild is not None
        prefix = owner.guild + "_"
        return GUILD_SELECT, GUILD_DELETE, [owner.guild, prefix, _after(prefix), now]
    backwards = owner.user[::-1] + "_"  # reverse("..._U") starts with reverse(U) + "_"
    if owner.guild is None:
        return USER_SELECT, USER_DELETE, [owner.user[::-1], backwards, _after(backwards), now]
    prefix = owner.guild + "_"
    return USER_GUILD_SELECT, USER_GUILD_DELETE, [backwards, _after(backwards), prefix, _after(prefix), now]


def messages_where(owner: Owner) -> tuple[str, list[int]]:
    """`` WHERE ...`` and its arguments for the owner's message records (ids shifted as stored)."""
    clauses: list[str] = []
    args: list[int] = []
    if owner.guild is not None:
        args.append(int(owner.guild) - ID_SHIFT)
        clauses.append(f"guild_id = ${len(args)}")
    if owner.user is not None:
        args.append(int(owner.user) - ID_SHIFT)
        clauses.append(f"author_id = ${len(args)}")
    return " WHERE " + " AND ".join(clauses), args


async def select_documents(conn: Any, owner: Owner, now: datetime) -> dict[str, dict[str, Document]]:
    select, _delete, args = documents_where(owner, now)
    rows = await conn.fetch(select + " ORDER BY 1, 2", *args)
    out: dict[str, dict[str, Document]] = {}
    for collection, key, doc in rows:
        out.setdefault(collection, {})[key] = doc
    return out


async def delete_owned(conn: Any, owner: Owner, now: datetime) -> tuple[dict[str, list[str]], dict[str, int], int]:
    """Delete the owner's documents (expired ones too) and records on ``conn`` (inside the caller's transaction).
    Returns the keys deleted per collection, the visible documents deleted per collection, the records deleted."""
    _select, delete, args = documents_where(owner, now)
    collections, deleted, visibles = await conn.fetchrow(delete, *args)  # arrays (see _ARRAYS), NULL when none
    keys: dict[str, list[str]] = {}
    visible: dict[str, int] = {}
    for collection, key, was_visible in zip(collections or (), deleted or (), visibles or ()):
        keys.setdefault(collection, []).append(key)
        if was_visible:
            visible[collection] = visible.get(collection, 0) + 1
    where, margs = messages_where(owner)
    status: str = await conn.execute("DELETE FROM storage_messages" + where, *margs)
    return keys, visible, int(status.rsplit(" ", 1)[1])


async def forget_owned(conn: Any, owner: Owner, now: datetime, channel: str,
                       sent: notify.Distinct) -> tuple[dict[str, list[str]], dict[str, int], int]:
    """:func:`delete_owned`, and the change-feed notifications of the deleted documents sent on ``conn`` (inside
    the caller's transaction, whose notifications so far are ``sent``: watchers and other processes' caches hear
    of them on commit only)."""
    keys, visible, messages = await delete_owned(conn, owner, now)
    for collection, removed in keys.items():
        await notify.send(conn, channel, await notify.framed(collection, [(k, None) for k in removed], delete=True),
                          sent)
    return keys, visible, messages


async def owned_rows(conn: Any, owner: Owner) -> list[Any]:
    """The owner's message rows, by (timestamp, id)."""
    where, args = messages_where(owner)
    rows: list[Any] = await conn.fetch("SELECT " + ", ".join(COLUMNS) + " FROM storage_messages" + where
                                       + " ORDER BY created_at, message_id", *args)
    return rows


async def count_owned(conn: Any, owner: Owner) -> int:
    where, args = messages_where(owner)
    n: int = await conn.fetchval("SELECT count(*) FROM storage_messages" + where, *args)
    return n


async def _records_of(rows: list[Any]) -> AsyncIterator[Record]:
    for index, row in enumerate(rows):
        if index and not index % 100:
            await asyncio.sleep(0)  # decoding thousands of records: the loop gets turns
        yield to_record(row)


class PgLifecycle:
    """Mixed into :class:`storage.backends.postgres.store.PostgresBackend`."""

    _connection: Callable[[str], Any]
    _invalidate: Callable[[str, Any], None]
    _channel: str  # the store's change-feed channel (postgres/notify.py)
    _now: Callable[[], datetime]

    async def _owned_documents(self, owner: Owner) -> dict[str, dict[str, Document]]:
        async with self._connection("export_user") as conn:
            return await select_documents(conn, owner, self._now())

    async def _owned_messages(self, owner: Owner) -> AsyncIterator[Record]:
        async with self._connection("export_user") as conn:
            rows = await owned_rows(conn, owner)
        async for record in _records_of(rows):
            yield record

    async def _count_owned_messages(self, owner: Owner) -> int:
        async with self._connection("forget (dry run)") as conn:
            return await count_owned(conn, owner)

    async def _forget(self, owner: Owner) -> tuple[dict[str, int], int]:
        keys: dict[str, list[str]] = {}
        try:
            async with self._connection("forget") as conn, pg_conn.transaction(conn):
                keys, visible, messages = await forget_owned(conn, owner, self._now(), self._channel,
                                                             notify.Distinct())
        finally:
            for collection, removed in keys.items():
                self._invalidate(collection, removed)
        return dict(sorted(visible.items())), messages


class PgTxLifecycle:
    """The lifecycle primitives of a transaction (mixed into :class:`storage.backends.postgres.store.PgTransaction`):
    the same statements on the transaction's connection (see the module doc)."""

    _use: Callable[[str], AbstractAsyncContextManager[Any]]
    _wrote: Callable[[str, Any], None]
    _now: Callable[[], datetime]
    _feed_channel: Callable[[], str]  # the store's change-feed channel
    _sent: notify.Distinct  # the transaction's notifications so far (postgres/notify.py)
    #: A prune deleted rows: the store vacuums the messages table once the transaction committed.
    _pruned = False

    async def _owned_documents(self, owner: Owner) -> dict[str, dict[str, Document]]:
        async with self._use("export_user") as conn:
            return await select_documents(conn, owner, self._now())

    async def _owned_messages(self, owner: Owner) -> AsyncIterator[Record]:
        async with self._use("export_user") as conn:
            rows = await owned_rows(conn, owner)
        async for record in _records_of(rows):
            yield record

    async def _count_owned_messages(self, owner: Owner) -> int:
        async with self._use("forget (dry run)") as conn:
            return await count_owned(conn, owner)

    async def _forget(self, owner: Owner) -> tuple[dict[str, int], int]:
        async with self._use("forget") as conn:
            keys, visible, messages = await forget_owned(conn, owner, self._now(), self._feed_channel(), self._sent)
        for collection, removed in keys.items():
            self._wrote(collection, removed)  # the caches drop them after the commit
        return dict(sorted(visible.items())), messages

    async def _delete_messages_before(self, before: datetime, guild: str | None = None) -> int:
        async with self._use("prune_messages") as conn:
            deleted = await delete_before(conn, before, guild)
        if deleted:
            self._pruned = True
        return deleted
