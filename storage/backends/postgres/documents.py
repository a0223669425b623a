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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ...codec import decode_doc, encode_doc
from ...documents import apply_update
from ...protocol import Document, UpdateFn
from .conn import transaction
from .schema import DOC_LOCK_CLASS

__all__ = ["PAGE_SIZE", "get_text", "get", "get_locked", "get_many", "get_many_locked", "put", "delete", "update",
           "items_page", "count", "collections", "prefix_upper_bound"]

#: Rows fetched per round trip by ``items()``: large enough to amortize the round trip, small enough that a
#: caller who stops early has not paid for the whole collection.
PAGE_SIZE = 1000

_GET_TEXT = "SELECT doc::text FROM storage_documents WHERE collection = $1 AND key = $2"
_GET = "SELECT doc FROM storage_documents WHERE collection = $1 AND key = $2"
_GET_LOCKED = "SELECT doc FROM storage_documents WHERE collection = $1 AND key = $2 FOR UPDATE"
_GET_MANY = "SELECT key, doc FROM storage_documents WHERE collection = $1 AND key = ANY($2::text[])"
_GET_MANY_LOCKED = _GET_MANY + " ORDER BY key FOR UPDATE"
_KEY_LOCK = f"SELECT pg_advisory_xact_lock({DOC_LOCK_CLASS}, hashtext($1 || '/' || $2))"
_KEYS_LOCK = (f"SELECT count(pg_advisory_xact_lock({DOC_LOCK_CLASS}, hashtext($1 || '/' || k))) "
              "FROM (SELECT k FROM unnest($2::text[]) AS u(k) ORDER BY k) AS s")
_PUT_ONE = ("INSERT INTO storage_documents (collection, key, doc) VALUES ($1, $2, $3) "
            "ON CONFLICT (collection, key) DO UPDATE SET doc = EXCLUDED.doc")
_PUT_MANY = ("INSERT INTO storage_documents (collection, key, doc) "
             "SELECT $1, k, d FROM unnest($2::text[], $3::jsonb[]) AS u(k, d) "
             "ON CONFLICT (collection, key) DO UPDATE SET doc = EXCLUDED.doc")
_DELETE = "DELETE FROM storage_documents WHERE collection = $1 AND key = $2"
_PLACEHOLDER = ("INSERT INTO storage_documents (collection, key, doc) SELECT $1::text, $2::text, $3::jsonb "
                f"FROM (SELECT pg_advisory_xact_lock({DOC_LOCK_CLASS}, hashtext($1 || '/' || $2))) AS l "
                "ON CONFLICT (collection, key) DO NOTHING")
_SET = "UPDATE storage_documents SET doc = $3 WHERE collection = $1 AND key = $2"
_PAGE = ("SELECT key, doc FROM storage_documents WHERE collection = $1 AND key > $2 "
         "ORDER BY key LIMIT $3")
_PAGE_PREFIX = ("SELECT key, doc FROM storage_documents WHERE collection = $1 AND key > $2 "
                "AND key >= $4 AND starts_with(key, $4) ORDER BY key LIMIT $3")
_PAGE_PREFIX_BOUNDED = ("SELECT key, doc FROM storage_documents WHERE collection = $1 AND key > $2 "
                        "AND key >= $4 AND key < $5 AND starts_with(key, $4) ORDER BY key LIMIT $3")
_COUNT = "SELECT count(*) FROM storage_documents WHERE collection = $1"
# A loose index scan: one index probe per distinct collection instead of reading every row.
_COLLECTIONS = """
WITH RECURSIVE c(name) AS (
    SELECT min(collection) FROM storage_documents
    UNION ALL
    SELECT (SELECT min(collection) FROM storage_documents WHERE collection > c.name) FROM c WHERE c.name IS NOT NULL
)
SELECT name FROM c WHERE name IS NOT NULL ORDER BY name
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


async def get_text(conn: Any, collection: str, key: str) -> str | None:
    """The document's JSON text (immutable, so it can be cached and decoded into a fresh dict each time)."""
    text: str | None = await conn.fetchval(_GET_TEXT, collection, key)
    return text


async def get(conn: Any, collection: str, key: str) -> Document | None:
    doc: Document | None = await conn.fetchval(_GET, collection, key)
    return doc


async def get_locked(conn: Any, collection: str, key: str) -> Document | None:
    """Inside a transaction: read and lock the row, or lock the absent key until the transaction ends."""
    doc: Document | None = await conn.fetchval(_GET_LOCKED, collection, key)
    if doc is None:
        await conn.execute(_KEY_LOCK, collection, key)
        doc = await conn.fetchval(_GET_LOCKED, collection, key)  # it may have been inserted while we waited
    return doc


async def get_many(conn: Any, collection: str, keys: list[str]) -> dict[str, Document]:
    return dict(await conn.fetch(_GET_MANY, collection, keys))


async def get_many_locked(conn: Any, collection: str, keys: list[str]) -> dict[str, Document]:
    found: dict[str, Document] = dict(await conn.fetch(_GET_MANY_LOCKED, collection, keys))
    missing = [k for k in keys if k not in found]
    if missing:
        await conn.fetchval(_KEYS_LOCK, collection, missing)
        found.update(await conn.fetch(_GET_MANY_LOCKED, collection, missing))
    return {k: found[k] for k in keys if k in found}


async def put(conn: Any, collection: str, items: Sequence[tuple[str, bytes]]) -> None:
    """Upsert every pair in one statement (so atomically, and in one round trip); the last of equal keys wins."""
    if len(items) == 1:
        key, raw = items[0]
        await conn.execute(_PUT_ONE, collection, key, raw)
        return
    latest = dict(items)  # ON CONFLICT DO UPDATE cannot touch one row twice in a statement
    # Rows are locked in input order: in key order, two overlapping batches can wait for each other but never
    # deadlock.
    keys = sorted(latest)
    await conn.execute(_PUT_MANY, collection, keys, [latest[k] for k in keys])


async def delete(conn: Any, collection: str, key: str) -> bool:
    status: str = await conn.execute(_DELETE, collection, key)
    return status == "DELETE 1"


async def update(conn: Any, collection: str, key: str, fn: UpdateFn, default: Document | None,
                 *, in_transaction: bool) -> Document:
    """Locked read-modify-write; ``conn`` must be inside a transaction. Returns the stored document.

    ``in_transaction``: the caller's own transaction goes on after this, so the placeholder insert is wrapped in a
    savepoint that ``fn`` raising rolls back. A standalone update's transaction is rolled back whole instead.
    """
    current: Document | None = await conn.fetchval(_GET_LOCKED, collection, key)
    if current is not None:
        _doc, encoded = apply_update(fn, current, None)
        await conn.execute(_SET, collection, key, encoded)
        return decode_doc(encoded)
    placeholder = encode_doc(default, what="default") if default is not None else b"{}"
    if in_transaction:
        async with transaction(conn):  # a savepoint
            return await _update_absent(conn, collection, key, fn, placeholder)
    return await _update_absent(conn, collection, key, fn, placeholder)


async def _update_absent(conn: Any, collection: str, key: str, fn: UpdateFn, placeholder: bytes) -> Document:
    await conn.execute(_PLACEHOLDER, collection, key, placeholder)
    current = await conn.fetchval(_GET_LOCKED, collection, key)
    if current is None:  # pragma: no cover - the row was just inserted or found in this transaction
        current = orjson.loads(placeholder)
    _doc, encoded = apply_update(fn, current, None)
    await conn.execute(_SET, collection, key, encoded)
    return decode_doc(encoded)


async def items_page(conn: Any, collection: str, prefix: str | None, after: str) -> list[tuple[str, Document]]:
    """Up to :data:`PAGE_SIZE` pairs with keys after ``after`` (``""``: from the start), in key order."""
    if prefix is None:
        rows = await conn.fetch(_PAGE, collection, after, PAGE_SIZE)
    else:
        bound = prefix_upper_bound(prefix)
        if bound is None:
            rows = await conn.fetch(_PAGE_PREFIX, collection, after, PAGE_SIZE, prefix)
        else:
            rows = await conn.fetch(_PAGE_PREFIX_BOUNDED, collection, after, PAGE_SIZE, prefix, bound)
    return [(row[0], row[1]) for row in rows]


async def count(conn: Any, collection: str) -> int:
    n: int = await conn.fetchval(_COUNT, collection)
    return n


async def collections(conn: Any) -> list[str]:
    return [row[0] for row in await conn.fetch(_COLLECTIONS)]
