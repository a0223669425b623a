"""The tables the Postgres backend keeps, and creating them safely when several processes open at once.

Three tables, in the connection's default schema (``search_path``):

``storage_documents``
    One row per document, keyed by ``(collection, key)``, the document in ``jsonb``, and ``expires_at`` for an
    expiring document (NULL: permanent; see storage/expiry.py), with a partial index on it for the sweep.
    Both text columns use the ``"C"`` collation, so the primary key index *is* in code point order: ``items()``
    walks it and returns keys in exactly Python's ``sorted()`` order, and a prefix becomes an index range.
``storage_messages``
    The message-analytics records in typed columns. Besides the primary key there is one index for the per-guild
    queries, ``(guild_id, created_at) INCLUDE (channel_id, author_id, sentiment, topics)``: every column an
    aggregate reads is in it, so a query over a guild is an index-only scan of one contiguous index range instead
    of a visit to every heap page (a guild's messages are spread over the whole table, interleaved with the other
    guilds'). Index-only scans need the visibility map, which ingest keeps current (see postgres/messages.py). Grown
    row by row, its leaf pages end up about half full (every guild's insertion point splits pages in the middle:
    PostgreSQL splits after the new item only for narrow fixed-width tuples), so it is about 1.7 times the size a
    ``REINDEX INDEX CONCURRENTLY storage_messages_guild_time_covering`` would make it; nothing depends on that.
    Discord ids are unsigned 64-bit numbers, which do not fit a signed ``bigint``; ``numeric(20)`` or text would, but
    ingest is much faster with ``bigint`` (benchmarks/README.md), so ids are stored *shifted*: ``id - 2**63``. The
    shift keeps their order, and the ``storage_message_records`` view shows the real ids for anyone writing SQL by
    hand. Fields a record has beyond the typed ones are kept in ``extra`` (``NULL`` when there are none), so a record
    reads back exactly as it was written.
``storage_meta``
    ``schema_version`` and nothing else for now.

Versions (``storage_meta.schema_version``), each step applied in order to bring an older database forward:

1. The three tables; messages indexed by ``(guild_id, created_at)`` and ``(guild_id, author_id, created_at)``.
2. Those two indexes replaced by the covering one above. The author index made every ingested row cost an insert at
   a random place in a large index (ingest is much faster without it); ``last_activity`` now walks
   the guild's index range backwards from the newest message instead. On an existing database the step builds
   the new index with a plain ``CREATE INDEX``, which blocks writes to the messages table while it runs (seconds
   per million messages), once. It also repairs the one time version 1 stored wrongly: asyncpg sends
   ``9999-12-31T23:59:59.999999`` (Python's ``datetime.max``) as ``'infinity'``; stored times now travel as text. And
   the time BRIN index (which prunes use) summarizes new ranges through autovacuum as they fill, since the
   vacuums the store runs after ingest skip index work.
3. ``storage_documents.expires_at timestamptz`` (expiring documents) and the partial index
   ``storage_documents_expiring`` on ``(collection, expires_at) WHERE expires_at IS NOT NULL``, which holds only
   expiring documents: the sweep walks it, and ``count`` subtracts the expired ones it finds there from an
   index-only count of the collection (a filter on ``expires_at`` would read every row of the table). On an
   existing database the column is added without a rewrite (nullable, no default: a catalog change); the index
   build reads the table once (seconds per million documents, writes to it wait meanwhile) and is empty, as no
   document expires yet.
4. ``storage_documents_key_reversed``, an index on ``reverse(key)``: the documents whose key ends with
   ``"_{user_id}"`` (``forget_user``, ``export_user``) are one range of it. Built with a plain ``CREATE INDEX`` on an
   existing database (blocks document writes for the seconds it takes, once).

Opening checks the version with one query and only when the tables are missing (or older) takes a
transaction-scoped advisory lock, checks again, and creates them: two processes opening a fresh database at the
same time never race on ``CREATE``, and an already set-up database is never locked at all (``CREATE INDEX IF NOT
EXISTS`` would take a table lock that waits for every running writer).
"""

from __future__ import annotations

import hashlib
from typing import Any

from ...errors import DatabaseError
from .conn import transaction

__all__ = ["SCHEMA_VERSION", "ID_SHIFT", "DOC_LOCK_CLASS", "ensure_schema", "stable_lock_key"]

SCHEMA_VERSION = 4
#: Stored message ids are ``id - ID_SHIFT``: the unsigned 64-bit range mapped onto ``bigint``, order kept.
ID_SHIFT = 2**63


def stable_lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key derived from ``name``; the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


SCHEMA_LOCK_KEY = stable_lock_key("storage.schema")
#: First half of the two-integer advisory locks taken on absent document keys (see store.py). The two-integer
#: form lives in a different lock space than the one-``bigint`` form, so it cannot collide with other users' keys.
DOC_LOCK_CLASS = stable_lock_key("storage.documents") >> 32

_CREATE_V1 = """
CREATE TABLE IF NOT EXISTS storage_meta (
    name text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS storage_documents (
    collection text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    doc jsonb NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE TABLE IF NOT EXISTS storage_messages (
    message_id bigint PRIMARY KEY,
    guild_id bigint NOT NULL,
    channel_id bigint NOT NULL,
    author_id bigint NOT NULL,
    created_at timestamptz NOT NULL,
    content_length bigint NOT NULL,
    attachments bigint NOT NULL,
    reactions bigint NOT NULL,
    sentiment text,
    topics text[],
    extra jsonb
);
COMMENT ON COLUMN storage_messages.message_id IS 'Discord id minus 2^63 (keeps order); see storage_message_records';
CREATE INDEX IF NOT EXISTS storage_messages_guild_time ON storage_messages (guild_id, created_at);
CREATE INDEX IF NOT EXISTS storage_messages_guild_author_time ON storage_messages (guild_id, author_id, created_at);
CREATE INDEX IF NOT EXISTS storage_messages_time_brin ON storage_messages USING brin (created_at);
CREATE OR REPLACE VIEW storage_message_records AS
SELECT message_id::numeric + 9223372036854775808 AS message_id,
       guild_id::numeric + 9223372036854775808 AS guild_id,
       channel_id::numeric + 9223372036854775808 AS channel_id,
       author_id::numeric + 9223372036854775808 AS author_id,
       created_at, content_length, attachments, reactions, sentiment, topics, extra
FROM storage_messages;
"""

_V2 = """
CREATE INDEX IF NOT EXISTS storage_messages_guild_time_covering ON storage_messages (guild_id, created_at)
    INCLUDE (channel_id, author_id, sentiment, topics);
DROP INDEX IF EXISTS storage_messages_guild_time;
DROP INDEX IF EXISTS storage_messages_guild_author_time;
UPDATE storage_messages SET created_at = timestamptz '9999-12-31 23:59:59.999999+00' WHERE created_at = 'infinity';
ALTER INDEX storage_messages_time_brin SET (autosummarize = on);
"""
_V3 = """
ALTER TABLE storage_documents ADD COLUMN IF NOT EXISTS expires_at timestamptz;
CREATE INDEX IF NOT EXISTS storage_documents_expiring ON storage_documents (collection, expires_at)
    WHERE expires_at IS NOT NULL;
"""
# Documents by the end of their key (storage.lifecycle): forget_user / export_user find the keys ending with
# "_{user}" as one range of this index (reverse(key) starting with reverse(user) || '_'), never a scan of the table.
# reverse() keeps the column's "C" collation, so the range is in code point order like the primary key.
_V4 = """
CREATE INDEX IF NOT EXISTS storage_documents_key_reversed ON storage_documents (reverse(key));
"""
#: What brings a database from version ``n - 1`` to ``n``; a fresh database runs them all (on empty tables).
_STEPS = {1: _CREATE_V1, 2: _V2, 3: _V3, 4: _V4}

_VERSION_QUERY = "SELECT value::int FROM storage_meta WHERE name = 'schema_version'"


async def _version(conn: Any) -> int:
    if await conn.fetchval("SELECT to_regclass('storage_meta') IS NULL"):
        return 0
    version = await conn.fetchval(_VERSION_QUERY)
    return int(version or 0)


async def ensure_schema(conn: Any, *, read_only: bool = False) -> None:
    """Create the tables if they are missing, bring an older schema forward (in one transaction: all steps or none);
    refuse a database whose schema is newer than this library. ``read_only``: change nothing, and refuse a
    database whose schema is missing or older (a read-only open never creates or upgrades one)."""
    encoding = await conn.fetchval("SELECT current_setting('server_encoding')")
    if encoding.upper() not in ("UTF8", "UTF-8"):
        raise DatabaseError(f"the database uses the {encoding} encoding; storage needs UTF8 (create it with "
                            "ENCODING 'UTF8')")
    version = await _version(conn)
    if version == SCHEMA_VERSION:
        return
    if read_only:
        what = "holds no storage tables" if version == 0 else f"has the older storage schema version {version}"
        raise DatabaseError(f"the database {what}; a read-only open never creates or upgrades it (open it once "
                            "for writing)")
    async with transaction(conn):
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        version = await _version(conn)  # another process may have created everything while we waited
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"the database's storage schema is version {version}, newer than this library "
                                f"understands ({SCHEMA_VERSION}): upgrade the storage package")
        if version < SCHEMA_VERSION:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                await conn.execute(_STEPS[step])
            await conn.execute(
                "INSERT INTO storage_meta (name, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", str(SCHEMA_VERSION))
