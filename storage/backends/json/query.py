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
so an index only ever narrows what is read, and a query gives the same answer with or without one. A scan first
reads the documents' JSON text (storage/backends/json/prefilter.py): only those that may match are decoded, which
is what makes an unindexed query cheaper than decoding the collection (100k members: about 40 ms of CPU for a
selective find, where decoding them all costs 90-150 ms; benchmarks/bench_queries.py).

Event loop: the documents a plan reads are first copied (:func:`considered`, a dict copy: a few ms for 100k), then
searched about :data:`PREFILTER_BYTES` and decoded :data:`SCAN_CHUNK` at a time, with a turn of the loop between
steps, and more than :data:`INLINE` matches are sorted in a worker thread. The copy is taken at one instant, so the
answer is a consistent snapshot even while other coroutines write meanwhile.

Visibility: :func:`considered` is the one place that says which stored documents a query sees (every plan goes
through it), so a rule such as expiry is added there once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from operator import truth
from typing import Any, Literal

import orjson

from ...offload import off_loop
from ...protocol import Document
from ...query.evaluate import OTHER, Predicate, compile_filter, sort_pairs, token
from ...query.plan import RANGE_OPS, Query
from .indexes import CollectionIndexes, PathIndex
from .prefilter import prefilter

__all__ = ["INLINE", "WALK_BUDGET", "Mode", "QueryAnswers", "run_query", "considered"]

#: Matches sorted on the event loop at most; more are sorted in a worker thread.
INLINE = 2000
#: Documents a scan decodes and checks between two turns of the event loop (about a millisecond of work).
SCAN_CHUNK = 500
#: Bytes of documents a prefiltered scan searches between two turns of the event loop (a few milliseconds: the
#: join, the position table and one regex search per condition, each about 1 ms per MB here).
PREFILTER_BYTES = 1 << 20
#: Documents an index walk (``order_by`` + ``limit``) checks on the loop before it gives up for a scan, and index
#: entries it steps over (keys without the prefix cost only a ``startswith``).
WALK_BUDGET = 2000
WALK_STEPS = 20_000

Mode = Literal["find", "count", "keys"]


class QueryAnswers:
    """``_find`` / ``_count_where`` of the store and of a transaction, over their one ``_query`` (which knows what
    each sees: the committed documents with their indexes, or the transaction's view)."""

    async def _query(self, collection: str, query: Query, mode: Mode) -> Any:
        raise NotImplementedError

    async def _find(self, collection: str, query: Query) -> list[tuple[str, Document]]:
        found: list[tuple[str, Document]] = await self._query(collection, query, "find")
        return found

    async def _count_where(self, collection: str, query: Query) -> int:
        counted: int = await self._query(collection, query, "count")
        return counted


def considered(coll: Mapping[str, bytes], keys: Iterable[str] | None = None) -> dict[str, bytes]:
    """THE documents a query sees: ``{key: encoded doc}`` for ``keys`` (every document when None) that are stored
    and visible, as a copy taken now. Every plan reads documents through here (see the module doc).

    A dict, not a list of pairs or a tuple of the documents: a copied dict of strings and bytes is not tracked by
    the garbage collector at all, where 100k fresh tuples would bring on a full collection, and the first
    collection that sees a 100k-long tuple reads the header of every document in it (cache misses: 2-17 ms, on
    the event loop, whatever thread triggers it)."""
    if keys is None:
        return dict(coll)
    get = coll.get
    out = {}
    for key in keys:
        raw = get(key)
        if raw is not None:
            out[key] = raw
    return out


def _candidates(indexes: CollectionIndexes, query: Query) -> tuple[Any, bool] | None:
    """Candidate keys from the indexes (a set, tuple or list), and whether they are exactly the matches (one
    condition that the index answers exactly, no prefix); None when no index fits."""
    conditions, paths = query.conditions, indexes.paths
    best: Any = None
    for c in conditions:
        index = paths.get(c.dotted)
        if index is None:
            continue
        keys: Any = None
        if c.op == "$eq" and token(c.value) is not None:
            keys = index.equal(c.value)
        elif c.op == "$in" and all(token(v) is not None for v in c.value):
            keys = set().union(*(index.equal(v) for v in c.value)) if c.value else set()
        if keys is not None and (best is None or len(keys) < len(best)):
            best = keys
    exact = len(conditions) == 1 and query.prefix is None
    if best is None:
        for c in conditions:
            index = paths.get(c.dotted)
            if index is None or c.op not in RANGE_OPS:
                continue
            kind = type(c.value) is str
            same = [d for d in conditions
                    if d.path == c.path and d.op in RANGE_OPS and (type(d.value) is str) == kind]
            low = high = None
            for d in same:  # the tightest bound of each side
                if d.op in ("$gt", "$gte"):
                    if low is None or d.value > low[0] or (d.value == low[0] and d.op == "$gt"):
                        low = (d.value, d.op == "$gte")
                elif high is None or d.value < high[0] or (d.value == high[0] and d.op == "$lt"):
                    high = (d.value, d.op == "$lte")
            best = index.range(low, high)
            exact = len(same) == len(conditions) and query.prefix is None
            break
    if query.prefix is not None:
        prefixed = indexes.prefixed(query.prefix)
        if best is None or len(prefixed) < len(best):
            return prefixed, not conditions
    return (best, exact) if best is not None else None


def _ordered(index: PathIndex, keys: Iterable[str], descending: bool) -> list[str]:
    """``keys`` in the query order of ``index``'s path, from its entries (nothing decoded)."""
    entries = index.entries
    groups: tuple[list[tuple[Any, str]], list[tuple[Any, str]], list[str]] = ([], [], [])
    for key in keys:
        entry = entries.get(key)
        if entry is None or entry[0] == OTHER:
            groups[2].append(key)
        else:
            groups[entry[0]].append((entry[1], key))  # type: ignore[arg-type]
    out: list[str] = []
    for group in groups[:2]:
        group.sort(key=_second)
        group.sort(key=_first, reverse=descending)
        out.extend(key for _value, key in group)
    out.extend(sorted(groups[2]))
    return out


def _first(pair: tuple[Any, str]) -> Any:
    return pair[0]


def _second(pair: tuple[Any, str]) -> str:
    return pair[1]


class _Scan:
    """Filter documents (the predicate), fed a chunk at a time; keeps only what the mode needs (no decoded document
    for a count: fewer survivors, fewer full garbage collections)."""

    def __init__(self, query: Query, mode: Mode, predicate: Predicate) -> None:
        self.query, self.mode, self.predicate = query, mode, predicate
        self.matched: list[tuple[str, Document]] = []
        self.keys: list[str] = []
        self.counted = 0

    def feed(self, keys: Sequence[str], raws: Sequence[bytes], which: Iterable[int]) -> None:
        """Decode and check the documents ``which`` (indexes into ``keys`` / ``raws``), each dropped as soon as it
        is checked unless it is kept (a batch of decoded documents held at once would be promoted by the garbage
        collector's young collections and bring on full ones, which hold the loop for 10 ms and more)."""
        predicate, loads = self.predicate, orjson.loads
        if self.mode == "count":  # iterated in C: map, no Python loop per document
            self.counted += sum(map(truth, map(predicate, map(loads, map(raws.__getitem__, which)))))
            return
        keep = self.matched.append if self.mode == "find" else None
        for i in which:
            doc = loads(raws[i])
            if predicate(doc):
                if keep is not None:
                    keep((keys[i], doc))
                else:
                    self.keys.append(keys[i])

    async def result(self) -> Any:
        if self.mode == "count":
            return self.counted
        if self.mode == "keys":
            return self.keys
        query = self.query
        end = None if query.limit is None else query.offset + query.limit
        if len(self.matched) > INLINE:  # sorting many: in a worker thread
            return (await off_loop(sort_pairs, self.matched, query.order))[query.offset:end]
        return sort_pairs(self.matched, query.order)[query.offset:end]


async def _scan(docs: dict[str, bytes], query: Query, mode: Mode, predicate: Predicate) -> Any:
    """The scan of a snapshot (``docs``, this call's own copy from :func:`considered`, already restricted to the
    prefix), a chunk at a time on the loop, which gets a turn after each step of a few milliseconds. (A worker
    thread was tried: under load its GIL handoffs with the loop made the scan 2-3x slower than decoding every
    document, and the loop waited a switch interval at each.)

    With a :mod:`prefilter <storage.backends.json.prefilter>` (some condition can be told from the text), a chunk
    is about :data:`PREFILTER_BYTES` of documents, searched in one step, and only its survivors are decoded,
    :data:`SCAN_CHUNK` per step; once a chunk lets more than half of its documents through, the prefilter is not
    worth its search and the rest is decoded directly, :data:`SCAN_CHUNK` documents per chunk. A chunk's keys and
    documents are two short lists (the snapshot itself stays an untracked dict, see :func:`considered`)."""
    scan = _Scan(query, mode, predicate)
    filtering = prefilter(query.conditions)
    key_iter, raw_iter = iter(docs), iter(docs.values())  # the same order: nothing changes docs meanwhile
    per_chunk = 1000 if filtering is not None else SCAN_CHUNK  # then sized to PREFILTER_BYTES
    while True:
        keys, raws = list(islice(key_iter, per_chunk)), list(islice(raw_iter, per_chunk))
        if not keys:
            break
        if filtering is None:
            scan.feed(keys, raws, range(len(raws)))
        else:
            survivors, size = filtering.survivors(raws)
            per_chunk = max(1, PREFILTER_BYTES * len(raws) // max(1, size))
            if 2 * len(survivors) > len(raws):
                filtering, per_chunk = None, SCAN_CHUNK  # most get through: cheaper to decode them all
            for first in range(0, len(survivors), SCAN_CHUNK):
                if first:
                    await asyncio.sleep(0)
                scan.feed(keys, raws, survivors[first:first + SCAN_CHUNK])
        await asyncio.sleep(0)
    return await scan.result()


def _walk(coll: Mapping[str, bytes], keys: Iterable[str], query: Query, predicate: Predicate,
          complete: bool) -> list[tuple[str, Document]] | None:
    """``order_by`` + ``limit`` by checking ``keys`` in query order until enough matched (see the module doc);
    None when it would cost too much, or when ``keys`` (not ``complete``: an index's numbers and strings only) ran
    out while documents outside them may match."""
    wanted = query.offset + (query.limit or 0)
    prefix = query.prefix
    loads = orjson.loads
    found: list[tuple[str, Document]] = []
    budget, steps = WALK_BUDGET, WALK_STEPS
    for key in keys:
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
    return found[query.offset:] if complete else None


async def run_query(coll: Mapping[str, bytes], indexes: CollectionIndexes | None, query: Query, mode: Mode) -> Any:
    """The answer to ``query`` over ``coll`` (committed documents with their ``indexes``, or a transaction's view
    with None): matching pairs (``find``), their number (``count``) or their keys (``keys``)."""
    predicate = compile_filter(query.conditions)
    found = _candidates(indexes, query) if indexes is not None else None
    if found is not None and found[1] and mode == "count":
        return len(considered(coll, found[0]))  # the index answered exactly: no document to decode
    order = query.order
    order_index = indexes.paths.get(order.dotted) if indexes is not None and order is not None else None
    if mode == "find" and order is not None and order_index is not None and query.limit is not None:
        if found is not None and len(found[0]) <= WALK_STEPS:  # few candidates: ordered from the index entries
            walked = _walk(coll, _ordered(order_index, found[0], order.descending), query, predicate, True)
        else:  # many: the index in order, numbers then strings (the rest is not in it)
            walked = _walk(coll, order_index.ordered(order.descending), query, predicate,
                           order_index.typed_count() == len(coll))
        if walked is not None:
            return walked
    prefix = query.prefix
    if found is None and prefix is None:
        docs = considered(coll)
    else:  # keys only, on the loop: what is left may not need a thread
        keys = coll if found is None else found[0]
        docs = considered(coll, keys if prefix is None else [key for key in keys if key.startswith(prefix)])
    return await _scan(docs, query, mode, predicate)
