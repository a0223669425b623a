"""Running a query (storage/query/plan.py) over a JSON store's documents: with an index when one fits, else a scan.

The plan, in order:

1. **Equality / ``$in`` on an indexed path** (scalar operands): the index gives the candidate keys (the smallest
   set when several fit).
2. **A range on an indexed path**: two bisections give the candidates.
3. **``order_by`` on an indexed path with a ``limit``**, when 1-2 found nothing smaller: the index is walked in query
   order, each document checked, until ``offset + limit`` matched. The walk runs on the loop for at most
   :data:`WALK_BUDGET` documents (:data:`WALK_STEPS` index entries); a walk that needs more (a selective filter or
   prefix the index does not serve) gives up and the query is a scan.
4. **A scan** of the collection.

Every candidate is then checked against the whole filter in Python (:func:`storage.query.evaluate.compile_filter`),
so an index only ever narrows what is read, and a query gives the same answer with or without one.

Event loop: candidates are checked on the loop when there are at most :data:`INLINE` of them; more (a scan of a
large collection, a common value) are copied as ``(key, bytes)`` pairs on the loop (a few ms for 100k) and filtered,
decoded and sorted in a worker thread. The copy is taken at one instant, so the answer is a consistent snapshot
even while other coroutines write; the thread gives the GIL back every switch interval, so the loop keeps ticking.

Visibility: :func:`considered` is the one place that says which stored documents a query sees (every plan goes
through it), so a rule such as expiry is added there once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import orjson

from ...offload import off_loop
from ...protocol import Document
from ...query.evaluate import Predicate, compile_filter, needles, sort_pairs, token
from ...query.plan import RANGE_OPS, Condition, Query
from .indexes import PathIndex

__all__ = ["INLINE", "WALK_BUDGET", "Mode", "run_query", "considered"]

#: Candidates checked on the event loop at most; more go to a worker thread.
INLINE = 2000
#: Documents a scan in a worker thread checks between two releases of the GIL.
GIL_TURN = 500
#: Documents an index walk (``order_by`` + ``limit``) checks on the loop before it gives up for a scan, and index
#: entries it steps over (keys without the prefix cost only a ``startswith``).
WALK_BUDGET = 2000
WALK_STEPS = 20_000

Mode = Literal["find", "count", "keys"]


def considered(coll: Mapping[str, bytes], keys: Iterable[str] | None = None) -> dict[str, bytes]:
    """THE documents a query sees: ``{key: encoded doc}`` for ``keys`` (every document when None) that are stored
    and visible, as a copy taken now. Every plan reads documents through here (see the module doc).

    A dict, not a list of pairs: copying a dict makes no per-document objects for the garbage collector to track
    (100k fresh tuples would bring on a full collection, which holds the event loop whatever thread triggers it)."""
    if keys is None:
        return dict(coll)
    get = coll.get
    out = {}
    for key in keys:
        raw = get(key)
        if raw is not None:
            out[key] = raw
    return out


def _candidates(indexes: Mapping[str, PathIndex], conditions: tuple[Condition, ...]) -> tuple[Any, bool] | None:
    """Candidate keys from the indexes (a set or list), and whether they are exactly the matches (one condition
    that the index answers exactly); None when no index fits."""
    best: Any = None
    for c in conditions:
        index = indexes.get(c.dotted)
        if index is None:
            continue
        keys: Any = None
        if c.op == "$eq" and token(c.value) is not None:
            keys = index.equal(c.value)
        elif c.op == "$in" and all(token(v) is not None for v in c.value):
            keys = set().union(*(index.equal(v) for v in c.value)) if c.value else set()
        if keys is not None and (best is None or len(keys) < len(best)):
            best = keys
    if best is not None:
        return best, len(conditions) == 1
    for c in conditions:
        index = indexes.get(c.dotted)
        if index is None or c.op not in RANGE_OPS:
            continue
        kind = type(c.value) is str
        same = [d for d in conditions if d.path == c.path and d.op in RANGE_OPS and (type(d.value) is str) == kind]
        low = high = None
        for d in same:  # the tightest bound of each side
            if d.op in ("$gt", "$gte"):
                if low is None or d.value > low[0] or (d.value == low[0] and d.op == "$gt"):
                    low = (d.value, d.op == "$gte")
            elif high is None or d.value < high[0] or (d.value == high[0] and d.op == "$lt"):
                high = (d.value, d.op == "$lte")
        return index.range(low, high), len(same) == len(conditions)
    return None


def _scan(docs: Mapping[str, bytes], query: Query, mode: Mode, predicate: Predicate, marks: list[bytes],
          in_thread: bool = False) -> Any:
    """Filter (prefix, byte needles, the predicate), then count, list keys, or sort and slice the documents.

    ``in_thread``: give the GIL away every :data:`GIL_TURN` documents (``time.sleep(0)``), so the event loop's
    thread gets it at once instead of after a whole switch interval. Only what the mode needs is kept (no decoded
    document for a count): fewer survivors, fewer full garbage collections."""
    prefix = query.prefix
    loads = orjson.loads
    matched: list[tuple[str, Document]] = []
    keys: list[str] = []
    keep_doc, keep_key = matched.append, keys.append
    counted = 0
    turn = GIL_TURN if in_thread else len(docs) + 1
    for index, (key, raw) in enumerate(docs.items()):
        if index == turn:
            turn += GIL_TURN
            time.sleep(0)
        if prefix is not None and not key.startswith(prefix):
            continue
        if marks and b"\\" not in raw and not all(m in raw for m in marks):
            continue  # without escapes, a document lacking a needle's bytes cannot match
        doc = loads(raw)
        if predicate(doc):
            if mode == "find":
                keep_doc((key, doc))
            elif mode == "keys":
                keep_key(key)
            else:
                counted += 1
    if mode == "count":
        return counted
    if mode == "keys":
        return keys
    ordered = sort_pairs(matched, query.order)
    end = None if query.limit is None else query.offset + query.limit
    return ordered[query.offset:end]


def _walk(coll: Mapping[str, bytes], index: PathIndex, query: Query,
          predicate: Predicate) -> list[tuple[str, Document]] | None:
    """``order_by`` + ``limit`` by walking the index (see the module doc); None when it would cost too much."""
    assert query.order is not None and query.limit is not None
    wanted = query.offset + query.limit
    prefix = query.prefix
    loads = orjson.loads
    found: list[tuple[str, Document]] = []
    budget, steps = WALK_BUDGET, WALK_STEPS
    for key in index.ordered(query.order.descending):
        steps -= 1
        if steps < 0:
            return None  # a prefix that few indexed keys have: cheaper to select its keys and sort them
        if prefix is not None and not key.startswith(prefix):
            continue
        budget -= 1
        if budget < 0:
            return None
        for raw in considered(coll, (key,)).values():
            doc = loads(raw)
            if predicate(doc):
                found.append((key, doc))
                if len(found) >= wanted:
                    return found[query.offset:]
    # The numbers and strings ran out first: the rest (missing or other types) is not in the index.
    return found[query.offset:] if len(found) >= wanted or index.typed_count() == len(coll) else None


async def run_query(coll: Mapping[str, bytes], indexes: Mapping[str, PathIndex], query: Query, mode: Mode) -> Any:
    """The answer to ``query`` over ``coll`` (committed documents with their ``indexes``, or a transaction's view
    with none): matching pairs (``find``), their number (``count``) or their keys (``keys``)."""
    predicate = compile_filter(query.conditions)
    found = _candidates(indexes, query.conditions) if indexes else None
    if found is not None and found[1] and mode == "count" and query.prefix is None:
        return len(considered(coll, found[0]))  # the index answered exactly: no document to decode
    order_index = indexes.get(query.order.dotted) if indexes and query.order is not None else None
    if mode == "find" and order_index is not None and query.limit is not None and \
            (found is None or len(found[0]) > WALK_BUDGET):
        walked = _walk(coll, order_index, query, predicate)
        if walked is not None:
            return walked
    prefix = query.prefix
    if found is None and (prefix is None or len(coll) <= INLINE):
        docs = considered(coll)
    else:  # keys only, on the loop: what is left may not need a thread
        keys = coll if found is None else found[0]
        docs = considered(coll, keys if prefix is None else [key for key in keys if key.startswith(prefix)])
    marks = needles(query.conditions)
    if len(docs) > INLINE:
        return await off_loop(_scan, docs, query, mode, predicate, marks, True)
    return _scan(docs, query, mode, predicate, marks)
