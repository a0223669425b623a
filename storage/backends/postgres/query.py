"""Queries (storage/query/plan.py) as SQL over ``storage_documents``: filtered, sorted and counted by the server.

Every rule of plan.py becomes a jsonb expression, so the server returns only what matches, already in order
(never every document to the client). With ``E`` the field (``doc -> 'a' -> 'b'``: objects only, SQL ``NULL``
when missing):

* ``$eq v`` (scalar ``v``): ``E @> v``. jsonb containment says exactly the rule: a scalar contains an equal scalar
  (numbers by value, ``true`` is not ``1``), an array contains a scalar it holds at its top level. A list or object
  ``v``: ``E = v`` (jsonb's deep equality) or an element of an array ``E`` equal to it.
* ``$ne`` / ``$nin``: ``NOT COALESCE(<$eq / $in>, false)``: a missing field matches, as in Python.
* ranges: ``jsonb_typeof(E) = 'number' AND num(E) > $n`` (or the string form with ``COLLATE "C"``, code point
  order), with ``num(E)`` / ``txt(E)`` the guarded extractions below (a ``CASE`` on ``jsonb_typeof``, so a
  mixed-type field never makes a cast fail). Number operands travel as the exact decimal of the JSON text orjson
  writes for them, which is what jsonb stored for the documents: ``0.1 >= 0.1`` holds on both backends.
* ``$contains``: ``strpos`` on a string field, containment / element equality on an array field.
* order: ``rank(E)`` (numbers 0, strings 1, the rest 2), ``num(E)``, ``txt(E)`` (descending for ``-path``), key.

Values are always bound parameters. Only two things are written into the SQL text: the collection name and the
path segments, as escaped string literals (``E'...'``), because an expression index and a partial index only match
a query whose expression and predicate have the same constants (a parameter would not match, at least not in a
generic plan). Collection names are restricted to ``[A-Za-z0-9_.-]`` (storage.codec), and segments are escaped.

Indexes (postgres/indexes.py) are built on exactly :func:`num_expr`, :func:`txt_expr` (partial: ``WHERE collection =
'...' AND jsonb_typeof(E) = 'number'`` / ``'string'``) and :func:`field` (GIN, ``jsonb_path_ops``, partial on the
collection). A range condition carries its ``jsonb_typeof`` test so the partial index's predicate is implied; an
``order_by`` on an indexed path with a ``limit`` (and no prefix) becomes three branches (numbers, strings, the
rest), each a top-N that an index scan answers (the rest through the ``_other`` index on the key), merged by an
outer sort of at most three times ``offset + limit`` rows.

Visibility: :func:`visible` returns THE conditions every query ANDs (the collection today); a rule such as expiry is
added there once and applies to ``find``, ``count`` and ``delete_many`` alike.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from ...query.evaluate import token
from ...query.plan import RANGE_OPS, Condition, Query
from .documents import live, prefix_upper_bound

__all__ = ["literal", "field", "num_expr", "txt_expr", "visible", "Built", "build_find", "build_count",
           "build_delete"]

_SYMBOLS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def literal(text: str) -> str:
    """An SQL string literal for a collection name or a path segment (escaped; no NUL can reach here)."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def field(path: tuple[str, ...]) -> str:
    """``(doc -> 'a' -> 'b')``: text keys only, so an array on the way gives NULL (paths never index lists)."""
    return "(doc" + "".join(f" -> {literal(segment)}" for segment in path) + ")"


def num_expr(path: tuple[str, ...]) -> str:
    e = field(path)
    return f"(CASE WHEN jsonb_typeof({e}) = 'number' THEN ({e})::numeric END)"


def txt_expr(path: tuple[str, ...]) -> str:
    e = field(path)
    return f"((CASE WHEN jsonb_typeof({e}) = 'string' THEN {e} #>> '{{}}' END) COLLATE \"C\")"


def rank_expr(path: tuple[str, ...]) -> str:
    return f"(CASE jsonb_typeof({field(path)}) WHEN 'number' THEN 0 WHEN 'string' THEN 1 ELSE 2 END)"


def other_types(path: tuple[str, ...]) -> str:
    """The field is missing or neither a number nor a string: the last group of the order."""
    e = field(path)
    return f"(jsonb_typeof({e}) IS NULL OR jsonb_typeof({e}) NOT IN ('number', 'string'))"


def visible(collection: str, b: Built) -> list[str]:
    """THE conditions every query on ``collection`` ANDs: which stored rows exist for a query (see module doc):
    the collection, and the rows visible at the store's now (expiry: postgres/documents.py ``live``)."""
    return [f"collection = {literal(collection)}", live(b.param(b.now, "timestamptz"))]


class Built:
    """An SQL statement being built: its parameters, bound in order."""

    def __init__(self, now: datetime) -> None:
        self.params: list[Any] = []
        self.now = now  # the store's now, for the expiry condition (bound as a parameter, never SQL's now())

    def param(self, value: Any, cast: str) -> str:
        self.params.append(value)
        return f"${len(self.params)}::{cast}"

    def jsonb(self, value: Any) -> str:
        """A JSON value as a jsonb parameter (pre-encoded: ``None`` is JSON ``null``, not SQL ``NULL``)."""
        return self.param(orjson.dumps(value), "jsonb")


def _number(value: int | float) -> Decimal:
    """The exact decimal jsonb holds for this number's JSON text (see the module doc)."""
    return Decimal(orjson.dumps(value).decode())


def _element_equal(e: str, p: str) -> str:
    return (f"CASE WHEN jsonb_typeof({e}) = 'array' THEN EXISTS (SELECT 1 FROM jsonb_array_elements({e}) AS "
            f"x(v) WHERE x.v = {p}) ELSE false END")


def _eq(e: str, value: Any, b: Built) -> str:
    if token(value) is not None:
        return f"({e} @> {b.jsonb(value)})"
    p = b.jsonb(value)
    return f"({e} = {p} OR {_element_equal(e, p)})"


def _in(e: str, values: list[Any], b: Built) -> str:
    scalars = [orjson.dumps(v) for v in values if token(v) is not None]
    parts = [f"({e} @> ANY({b.param(scalars, 'jsonb[]')}))"] if scalars else []
    parts += [_eq(e, v, b) for v in values if token(v) is None]
    return "(" + " OR ".join(parts) + ")" if parts else "false"


def _contains(e: str, value: Any, b: Built) -> str:
    if type(value) is str:
        return (f"(CASE jsonb_typeof({e}) WHEN 'string' THEN strpos({e} #>> '{{}}', {b.param(value, 'text')}) > 0 "
                f"WHEN 'array' THEN {e} @> {b.jsonb(value)} ELSE false END)")
    if token(value) is not None:
        return f"(jsonb_typeof({e}) = 'array' AND {e} @> {b.jsonb(value)})"
    return f"({_element_equal(e, b.jsonb(value))})"


def condition(c: Condition, b: Built) -> str:
    e = field(c.path)
    op, value = c.op, c.value
    if op == "$eq":
        return _eq(e, value, b)
    if op == "$ne":
        return f"NOT COALESCE({_eq(e, value, b)}, false)"
    if op == "$in":
        return _in(e, value, b)
    if op == "$nin":
        return f"NOT COALESCE({_in(e, value, b)}, false)"
    if op == "$contains":
        return _contains(e, value, b)
    if op == "$exists":
        return f"({e} IS {'NOT ' if value else ''}NULL)"
    assert op in RANGE_OPS
    if type(value) is str:
        return f"(jsonb_typeof({e}) = 'string' AND {txt_expr(c.path)} {_SYMBOLS[op]} {b.param(value, 'text')})"
    return f"(jsonb_typeof({e}) = 'number' AND {num_expr(c.path)} {_SYMBOLS[op]} {b.param(_number(value), 'numeric')})"


def where_clause(collection: str, query: Query, b: Built) -> str:
    parts = visible(collection, b)
    if query.prefix is not None:
        p = b.param(query.prefix, "text")
        bound = prefix_upper_bound(query.prefix)
        parts.append(f"key >= {p}")
        if bound is not None:
            parts.append(f"key < {b.param(bound, 'text')}")
        parts.append(f"starts_with(key, {p})")
    parts += [condition(c, b) for c in query.conditions]
    return " AND ".join(parts)


def _window(query: Query, b: Built) -> str:
    out = ""
    if query.limit is not None:
        out += f" LIMIT {b.param(query.limit, 'bigint')}"
    if query.offset:
        out += f" OFFSET {b.param(query.offset, 'bigint')}"
    return out


def build_find(collection: str, query: Query, indexed: frozenset[str], now: datetime) -> tuple[str, list[Any]]:
    """``SELECT key, doc`` for ``find``; ``indexed``: the collection's indexed paths (they choose the SQL's shape,
    never its answer); ``now``: the store's now (expiry)."""
    b = Built(now)
    where = where_clause(collection, query, b)
    order = query.order
    if order is None:
        return f"SELECT key, doc FROM storage_documents WHERE {where} ORDER BY key{_window(query, b)}", b.params
    d = " DESC" if order.descending else ""
    num, txt, e = num_expr(order.path), txt_expr(order.path), field(order.path)
    if order.dotted not in indexed or query.limit is None or query.prefix is not None:
        # With a prefix the key range is the better path (a guild's members), and a prepared statement's generic
        # plan, which cannot see how narrow the prefix is, might otherwise walk the whole order index instead.
        return (f"SELECT key, doc FROM storage_documents WHERE {where} ORDER BY {rank_expr(order.path)}, "
                f"{num}{d}, {txt}{d}, key{_window(query, b)}"), b.params
    top = f" LIMIT {b.param(query.offset + query.limit, 'bigint')}"
    branches = [
        f"SELECT 0 AS r, {num} AS n, NULL::text AS s, key, doc FROM storage_documents WHERE {where} AND "
        f"jsonb_typeof({e}) = 'number' ORDER BY {num}{d}, key{top}",
        f"SELECT 1, NULL::numeric, {txt}, key, doc FROM storage_documents WHERE {where} AND "
        f"jsonb_typeof({e}) = 'string' ORDER BY {txt}{d}, key{top}",
        f"SELECT 2, NULL::numeric, NULL::text, key, doc FROM storage_documents WHERE {where} AND "
        f"{other_types(order.path)} ORDER BY key{top}",
    ]
    union = " UNION ALL ".join(f"({branch})" for branch in branches)
    return (f"SELECT key, doc FROM ({union}) AS q ORDER BY r, n{d}, s COLLATE \"C\"{d}, key COLLATE \"C\""
            f"{_window(query, b)}"), b.params


def build_count(collection: str, query: Query, now: datetime) -> tuple[str, list[Any]]:
    b = Built(now)
    return f"SELECT count(*) FROM storage_documents WHERE {where_clause(collection, query, b)}", b.params


def build_delete(collection: str, query: Query, now: datetime, *, returning: bool) -> tuple[str, list[Any]]:
    """``returning``: the deleted keys come back (a cache to invalidate); else only their number (no row to send
    and decode, however many were deleted). Expired rows are neither counted nor deleted (the sweep takes them)."""
    b = Built(now)
    tail = " RETURNING key" if returning else ""
    return f"DELETE FROM storage_documents WHERE {where_clause(collection, query, b)}{tail}", b.params


#: ``find`` results larger than this (or without a limit) are read through a cursor, this many rows per round trip:
#: the rows of one fetch are decoded on the event loop, so a fetch stays a few milliseconds.
FETCH_ROWS = 2000


async def fetch_pairs(conn: Any, sql: str, params: list[Any], limit: int | None) -> list[tuple[str, Any]]:
    """The ``(key, doc)`` rows of a ``find``; ``conn`` must be inside a transaction when ``limit`` is None or
    above :data:`FETCH_ROWS` (a cursor, one snapshot, read :data:`FETCH_ROWS` at a time)."""
    if limit is not None and limit <= FETCH_ROWS:
        return [(row[0], row[1]) for row in await conn.fetch(sql, *params)]
    out: list[tuple[str, Any]] = []
    cursor = await conn.cursor(sql, *params)
    while True:
        rows = await cursor.fetch(FETCH_ROWS)
        out.extend((row[0], row[1]) for row in rows)
        if len(rows) < FETCH_ROWS:
            return out


async def delete_rows(conn: Any, sql: str, params: list[Any], *, returning: bool) -> tuple[int, list[str]]:
    """How many rows the ``DELETE`` removed, and their keys when it returns them."""
    if returning:
        keys = [row[0] for row in await conn.fetch(sql, *params)]
        return len(keys), keys
    status: str = await conn.execute(sql, *params)
    return int(status.rsplit(" ", 1)[1]), []
