"""The SQL of the document operations, written once for a pooled connection and a transaction's connection.

Every statement is parameterized; keys, collection names and documents never become part of SQL text. Documents
travel in ``jsonb``'s binary format through the codec registered in store.py, so the bytes ``storage.codec``
produced go to the server as they are.

Locking, which is what makes ``update()`` and transactions safe across processes:

* ``update()`` locks the row with ``SELECT ... FOR UPDATE`` before ``fn`` runs and writes in the same
  transaction. When the row does not exist there is nothing to lock, so a placeholder row (what ``fn`` will be
  given: the default, or ``{}``) is inserted with ``ON CONFLICT DO NOTHING`` first. That insert waits for any other
  transaction inserting the same key, so ``fn`` always runs exactly once, on the latest committed document.
* Inside a transaction, reads lock what they read (``FOR UPDATE``), so a read-modify-write transaction cannot
  lose another writer's update. A read that finds nothing takes a transaction-scoped advisory lock on the key
  instead (there is no row to lock), and ``update()`` on an absent key takes the same lock: two transactions that
  both saw "absent" run one after the other rather than both inserting.

Expiring documents (storage/expiry.py) have ``expires_at``; every read here filters with :func:`live`, THE
visibility predicate of this backend: ``(expires_at IS NULL OR expires_at > $n)``, where ``$n`` is the store's now
(its clock, sent as a parameter: never SQL's ``now()``). A row that is no longer visible stays until the sweep
(:data:`SWEEP`) deletes it; until then a write to its key replaces it as if it were absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from ...codec import decode_doc, encode_doc
from ...documents import apply_update
from ...protocol import Document, UpdateFn
from .conn import transaction
from .schema import DOC_LOCK_CLASS

__all__ = ["PAGE_SIZE", "get_text", "get", "get_locked", "get_many", "get_many_locked", "put", "delete", "update",
           "items_page", "count", "collections", "prefix_upper_bound", "live", "expiries", "sweep", "SWEEP_BATCH"]

#: Rows fetched per round trip by ``items()``: large enough to amortize the round trip, small enough that a
#: caller who stops early has not paid for the whole collection.
PAGE_SIZE = 1000



def live(param: str, table: str = "") -> str:
    """THE visibility predicate of this backend, as SQL: ``param`` is the placeholder of the store's now (an aware
    datetime parameter, ``$n``), ``table`` an optional alias qualifier (``"d."``). Every read of documents, and
    any query written elsewhere (find, count with a filter, delete_many...), must AND it in."""
    return f"({table}expires_at IS NULL OR {table}expires_at > {param}::timestamptz)"


_GET_TEXT = f"SELECT doc::text, expires_at FROM storage_documents WHERE collection = $1 AND key = $2 AND {live('$3')}"
_GET = f"SELECT doc FROM storage_documents WHERE collection = $1 AND key = $2 AND {live('$3')}"
_GET_LOCKED = f"SELECT doc FROM storage_documents WHERE collection = $1 AND key = $2 AND {live('$3')} FOR UPDATE"
_GET_MANY = (f"SELECT key, doc FROM storage_documents WHERE collection = $1 AND key = ANY($2::text[]) "
             f"AND {live('$3')}")
_GET_MANY_LOCKED = _GET_MANY + " ORDER BY key FOR UPDATE"
_EXPIRIES = ("SELECT key, expires_at FROM storage_documents WHERE collection = $1 AND key = ANY($2::text[]) "
             "AND expires_at > $3::timestamptz")
_EXPIRIES_ALL = ("SELECT key, expires_at FROM storage_documents WHERE collection = $1 "
                 "AND expires_at > $2::timestamptz")
_KEY_LOCK = f"SELECT pg_advisory_xact_lock({DOC_LOCK_CLASS}, hashtext($1 || '/' || $2))"
_KEYS_LOCK = (f"SELECT count(pg_advisory_xact_lock({DOC_LOCK_CLASS}, hashtext($1 || '/' || k))) "
              "FROM (SELECT k FROM unnest($2::text[]) AS u(k) ORDER BY k) AS s")
_PUT_ONE = ("INSERT INTO storage_documents (collection, key, doc, expires_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (collection, key) DO UPDATE SET doc = EXCLUDED.doc, expires_at = EXCLUDED.expires_at")
_PUT_MANY = ("INSERT INTO storage_documents (collection, key, doc, expires_at) "
             "SELECT $1, k, d, $4::timestamptz FROM unnest($2::text[], $3::jsonb[]) AS u(k, d) "
             "ON CONFLICT (collection, key) DO UPDATE SET doc = EXCLUDED.doc, expires_at = EXCLUDED.expires_at")
_DELETE = f"DELETE FROM storage_documents WHERE collection = $1 AND key = $2 AND {live('$3')}"
# An expired row under the key is replaced by the placeholder (it reads as absent: fn must get the default).
_PLACEHOLDER = ("INSERT INTO storage_documents AS d (collection, key, doc) SELECT $1::text, $2::text, $3::jsonb "
                f"FROM (SELECT pg_advisory_xact_lock({DOC_LOCK_CLASS}, hashtext($1 || '/' || $2))) AS l "
                "ON CONFLICT (collection, key) DO UPDATE SET doc = EXCLUDED.doc, expires_at = NULL "
                f"WHERE NOT {live('$4', 'd.')}")
_SET = "UPDATE storage_documents SET doc = $3, expires_at = $4 WHERE collection = $1 AND key = $2"
# A page is one row of two arrays (keys, documents as JSON text), in key order: 1,000 rows were 1,000 asyncpg
# Records, containers the collector tracks, alive while they arrived over several socket reads (a copy's reads
# and verification of 100k members promoted ~7.7k of them to the oldest generation: one full collection).
_PAGE_ARRAYS = "SELECT array_agg(key ORDER BY key), array_agg(doc ORDER BY key) FROM ("
_PAGE = (_PAGE_ARRAYS + f"SELECT key, doc::text AS doc FROM storage_documents WHERE collection = $1 AND key > $2 AND "
         f"{live('$4')} ORDER BY key LIMIT $3) AS page")
_PAGE_PREFIX = (_PAGE_ARRAYS + "SELECT key, doc::text AS doc FROM storage_documents WHERE collection = $1 AND key > $2 "
                f"AND {live('$5')} AND key >= $4 AND starts_with(key, $4) ORDER BY key LIMIT $3) AS page")
_PAGE_PREFIX_BOUNDED = (_PAGE_ARRAYS + "SELECT key, doc::text AS doc FROM storage_documents WHERE collection = $1 "
                        f"AND key > $2 AND {live('$6')} AND key >= $4 AND key < $5 AND starts_with(key, $4) "
                        "ORDER BY key LIMIT $3) AS page")
# All the collection's rows (an index-only scan of the primary key) minus those no longer visible (found in the
# small partial index of expiring rows): a filter on expires_at in one count would visit every row.
_COUNT = ("SELECT (SELECT count(*) FROM storage_documents WHERE collection = $1) - (SELECT count(*) "
          f"FROM storage_documents WHERE collection = $1 AND expires_at IS NOT NULL AND NOT {live('$2')})")
#: Rows the sweep deletes per statement: each statement is short (its locks are held for milliseconds), and rows a
#: writer holds are skipped (the next sweep takes them).
SWEEP_BATCH = 1000
#: Delete up to $2 rows that are no longer visible at $1, through the partial index on expires_at.
SWEEP = ("DELETE FROM storage_documents WHERE (collection, key) IN (SELECT collection, key FROM storage_documents "
         "WHERE expires_at IS NOT NULL AND expires_at <= $1::timestamptz LIMIT $2 FOR UPDATE SKIP LOCKED) "
         "AND expires_at <= $1::timestamptz")
# A loose index scan: one index probe per distinct collection instead of reading every row.
_COLLECTIONS = f"""
WITH RECURSIVE c(name) AS (
    SELECT min(collection) FROM storage_documents
    UNION ALL
    SELECT (SELECT min(collection) FROM storage_documents WHERE collection > c.name) FROM c WHERE c.name IS NOT NULL
)
SELECT name FROM c WHERE name IS NOT NULL AND EXISTS (
    SELECT FROM storage_documents AS d WHERE d.collection = c.name AND {live('$1', 'd.')})
ORDER BY name
"""

_MAX_CODE_POINT = 0x10FFFF


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (code point order), if any.

    With the ``"C"`` collation, ``prefix <= key < bound`` is an index range; ``starts_with`` then only confirms.
    """
    chars = list(prefix)
    while chars and ord(chars[-1]) == _MAX_CODE_POINT:
        chars.pop()
    if not chars:
        return None
    nxt = ord(chars[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be stored: skip to the first code point after them
        nxt = 0xE000
    chars[-1] = chr(nxt)
    return "".join(chars)


async def get_text(conn: Any, collection: str, key: str, now: datetime) -> tuple[str | None, bool]:
    """The document's JSON text (immutable, so it can be cached and decoded into a fresh dict each time), and
    whether it expires (an expiring document must not be cached: the cache would outlive it)."""
    row = await conn.fetchrow(_GET_TEXT, collection, key, now)
    if row is None:
        return None, False
    return row[0], row[1] is not None


async def get(conn: Any, collection: str, key: str, now: datetime) -> Document | None:
    doc: Document | None = await conn.fetchval(_GET, collection, key, now)
    return doc


async def get_locked(conn: Any, collection: str, key: str, now: datetime) -> Document | None:
    """Inside a transaction: read and lock the row, or lock the absent key until the transaction ends."""
    doc: Document | None = await conn.fetchval(_GET_LOCKED, collection, key, now)
    if doc is None:
        await conn.execute(_KEY_LOCK, collection, key)
        doc = await conn.fetchval(_GET_LOCKED, collection, key, now)  # it may have been inserted while we waited
    return doc


async def get_many(conn: Any, collection: str, keys: list[str], now: datetime) -> dict[str, Document]:
    return dict(await conn.fetch(_GET_MANY, collection, keys, now))


async def get_many_locked(conn: Any, collection: str, keys: list[str], now: datetime) -> dict[str, Document]:
    found: dict[str, Document] = dict(await conn.fetch(_GET_MANY_LOCKED, collection, keys, now))
    missing = [k for k in keys if k not in found]
    if missing:
        await conn.fetchval(_KEYS_LOCK, collection, missing)
        found.update(await conn.fetch(_GET_MANY_LOCKED, collection, missing, now))
    return {k: found[k] for k in keys if k in found}


async def expiries(conn: Any, collection: str, keys: list[str] | None, now: datetime) -> dict[str, datetime]:
    """When each visible, expiring document among ``keys`` (None: all of the collection) expires."""
    if keys is None:
        return dict(await conn.fetch(_EXPIRIES_ALL, collection, now))
    return dict(await conn.fetch(_EXPIRIES, collection, keys, now))


async def sweep(conn: Any, now: datetime, limit: int = SWEEP_BATCH) -> int:
    """Delete up to ``limit`` documents that are no longer visible at ``now``; returns how many."""
    status: str = await conn.execute(SWEEP, now, limit)
    return int(status.rsplit(" ", 1)[1])


async def put(conn: Any, collection: str, items: Sequence[tuple[str, bytes]], expires: datetime | None = None) -> None:
    """Upsert every pair in one statement (so atomically, and in one round trip); the last of equal keys wins.
    Each document expires at ``expires``, or is permanent (None), whatever it was before."""
    if len(items) == 1:
        key, raw = items[0]
        await conn.execute(_PUT_ONE, collection, key, raw, expires)
        return
    latest = dict(items)  # ON CONFLICT DO UPDATE cannot touch one row twice in a statement
    # Rows are locked in input order: in key order, two overlapping batches can wait for each other but never
    # deadlock.
    keys = sorted(latest)
    await conn.execute(_PUT_MANY, collection, keys, [latest[k] for k in keys], expires)


async def delete(conn: Any, collection: str, key: str, now: datetime) -> bool:
    """True if a visible document was deleted (an expired one reads as absent: False, left to the sweep)."""
    status: str = await conn.execute(_DELETE, collection, key, now)
    return status == "DELETE 1"


async def update(conn: Any, collection: str, key: str, fn: UpdateFn, default: Document | None,
                 *, in_transaction: bool, now: datetime, expires: datetime | None = None) -> Document:
    """Locked read-modify-write; ``conn`` must be inside a transaction. Returns the stored document.

    ``in_transaction``: the caller's own transaction goes on after this, so the placeholder insert is wrapped in a
    savepoint that ``fn`` raising rolls back. A standalone update's transaction is rolled back whole instead.
    """
    current: Document | None = await conn.fetchval(_GET_LOCKED, collection, key, now)
    if current is not None:
        _doc, encoded = apply_update(fn, current, None)
        await conn.execute(_SET, collection, key, encoded, expires)
        return decode_doc(encoded)
    placeholder = encode_doc(default, what="default") if default is not None else b"{}"
    if in_transaction:
        async with transaction(conn):  # a savepoint
            return await _update_absent(conn, collection, key, fn, placeholder, now, expires)
    return await _update_absent(conn, collection, key, fn, placeholder, now, expires)


async def _update_absent(conn: Any, collection: str, key: str, fn: UpdateFn, placeholder: bytes, now: datetime,
                         expires: datetime | None) -> Document:
    await conn.execute(_PLACEHOLDER, collection, key, placeholder, now)
    current = await conn.fetchval(_GET_LOCKED, collection, key, now)
    if current is None:  # pragma: no cover - the row was just inserted or found in this transaction
        current = orjson.loads(placeholder)
    _doc, encoded = apply_update(fn, current, None)
    await conn.execute(_SET, collection, key, encoded, expires)
    return decode_doc(encoded)


async def items_page(conn: Any, collection: str, prefix: str | None, after: str,
                     now: datetime) -> list[tuple[str, str]]:
    """Up to :data:`PAGE_SIZE` ``(key, document as JSON text)`` pairs with keys after ``after`` (``""``: from the
    start), in key order. Text, decoded by the caller as it hands each document on: a page of 1,000 decoded
    members (~5k containers) stayed alive while the caller worked through it, long enough to reach the garbage
    collector's oldest generation and set off full collections (a copy's and a backup's, 8 and 5 at 100k members);
    strings are not tracked, and a tuple of two is untracked at the collector's first look."""
    if prefix is None:
        row = await conn.fetchrow(_PAGE, collection, after, PAGE_SIZE, now)
    else:
        bound = prefix_upper_bound(prefix)
        if bound is None:
            row = await conn.fetchrow(_PAGE_PREFIX, collection, after, PAGE_SIZE, prefix, now)
        else:
            row = await conn.fetchrow(_PAGE_PREFIX_BOUNDED, collection, after, PAGE_SIZE, prefix, bound, now)
    keys, docs = row  # arrays (see _PAGE_ARRAYS), NULL for an empty page
    return list(zip(keys, docs)) if keys else []


async def count(conn: Any, collection: str, now: datetime) -> int:
    n: int = await conn.fetchval(_COUNT, collection, now)
    return n


async def collections(conn: Any, now: datetime) -> list[str]:
    return [row[0] for row in await conn.fetch(_COLLECTIONS, now)]
