"""Indexes on a document path in PostgreSQL: four partial indexes per ``(collection, path)``.

For the field ``E`` at the path (postgres/query.py builds the very same expressions, so the planner matches them):

``storage_q_<hash>_num``  btree on ``num(E)`` ``WHERE collection = '<c>' AND jsonb_typeof(E) = 'number'``
``storage_q_<hash>_str``  btree on ``txt(E)`` (``COLLATE "C"``) ``WHERE ... jsonb_typeof(E) = 'string'``
``storage_q_<hash>_other`` btree on ``key`` ``WHERE ...`` ``E`` is missing or neither a number nor a string
``storage_q_<hash>_eq``   GIN (``jsonb_path_ops``) on ``E`` ``WHERE collection = '<c>'``

The btrees serve ranges and ``order_by`` (scanned forwards or backwards: numbers and strings each have their own, so
the descending order keeps its "other types last" rule), and ``_other`` hands an ordered top-N its last group
already in key order, so that branch reads a few rows instead of the whole collection; the GIN serves equality and
``$in`` through containment, list fields included. Partial on the collection, each indexes only its collection's
documents.

They are built with ``CREATE INDEX CONCURRENTLY``, outside any transaction, so writers are not blocked while a large
collection is indexed (it waits, though, for transactions already open on the table to end, and each statement may
run up to :data:`BUILD_TIMEOUT`). A build that failed half-way leaves an ``INVALID`` index, which the next
``ensure_index`` drops and builds again. The ``_eq`` index carries a comment ``{"collection": ..., "path": ...}``,
written last: :func:`indexed_paths` lists an index once that comment is there and all four are valid.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from .query import field, literal, num_expr, other_types, txt_expr

__all__ = ["BUILD_TIMEOUT", "index_names", "indexed_paths", "ensure", "drop"]

#: Seconds each index build (one ``CREATE INDEX CONCURRENTLY``) may take at most.
BUILD_TIMEOUT = 3600.0
_PREFIX = "storage_q_"
_LIST = r"""
SELECT c.relname, i.indisvalid, obj_description(c.oid, 'pg_class')
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = 'storage_documents'::regclass AND c.relname LIKE 'storage\_q\_%'
"""


def index_names(collection: str, path: str) -> tuple[str, str, str, str]:
    digest = hashlib.blake2b(f"{collection}\x00{path}".encode(), digest_size=8).hexdigest()
    base = f"{_PREFIX}{digest}"
    return f"{base}_num", f"{base}_str", f"{base}_other", f"{base}_eq"


def _statements(collection: str, path: str) -> list[tuple[str, str]]:
    segments = tuple(path.split("."))
    e = field(segments)
    where = f"collection = {literal(collection)}"
    num, txt, other, eq = index_names(collection, path)
    return [
        (num, f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {num} ON storage_documents ({num_expr(segments)}) "
              f"WHERE {where} AND jsonb_typeof({e}) = 'number'"),
        (txt, f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {txt} ON storage_documents ({txt_expr(segments)}) "
              f"WHERE {where} AND jsonb_typeof({e}) = 'string'"),
        (other, f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {other} ON storage_documents (key) "
                f"WHERE {where} AND {other_types(segments)}"),
        (eq, f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {eq} ON storage_documents USING gin ({e} jsonb_path_ops) "
             f"WHERE {where}"),
    ]


async def _state(conn: Any) -> tuple[dict[str, bool], dict[str, str | None]]:
    valid: dict[str, bool] = {}
    comments: dict[str, str | None] = {}
    for name, ok, comment in await conn.fetch(_LIST):
        valid[name] = ok
        comments[name] = comment
    return valid, comments


async def indexed_paths(conn: Any, collection: str | None = None) -> dict[str, list[str]]:
    """``{collection: [path, ...]}`` of the complete, valid indexes (of one collection when given)."""
    valid, comments = await _state(conn)
    out: dict[str, list[str]] = {}
    for name, comment in comments.items():
        if not name.endswith("_eq") or comment is None:
            continue
        try:
            meta = orjson.loads(comment)
            coll, path = str(meta["collection"]), str(meta["path"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
        if collection is not None and coll != collection:
            continue
        if all(valid.get(n, False) for n in index_names(coll, path)):
            out.setdefault(coll, []).append(path)
    return {c: sorted(paths) for c, paths in out.items()}


async def ensure(conn: Any, collection: str, path: str) -> bool:
    """Build what is missing (``conn`` outside any transaction); True if anything was built."""
    valid, comments = await _state(conn)
    names = index_names(collection, path)
    eq = names[-1]
    if all(valid.get(n, False) for n in names) and comments.get(eq) is not None:
        return False
    for name, create in _statements(collection, path):
        if valid.get(name) is False:  # a failed concurrent build left it invalid: start over
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", timeout=BUILD_TIMEOUT)
        if not valid.get(name, False):
            await conn.execute(create, timeout=BUILD_TIMEOUT)
    comment = orjson.dumps({"collection": collection, "path": path}).decode()
    await conn.execute(f"COMMENT ON INDEX {eq} IS {literal(comment)}")
    await conn.execute("ANALYZE storage_documents", timeout=BUILD_TIMEOUT)  # statistics for the new expressions
    return True


async def drop(conn: Any, collection: str, path: str) -> bool:
    """Drop the four indexes (``conn`` outside any transaction); True if the index was listed."""
    listed = path in (await indexed_paths(conn, collection)).get(collection, [])
    valid, _comments = await _state(conn)
    for name in index_names(collection, path):
        if name in valid:
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", timeout=BUILD_TIMEOUT)
    return listed
