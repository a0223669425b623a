"""The JSON backend's indexes: in memory, kept current on every committed write, declared in ``storage.indexes``.

An index on ``(collection, path)`` holds, for every document whose field at ``path`` is present:

* ``nums`` / ``strs``: ``(value, key)`` pairs of the documents whose field is a number / a string, sorted: ranges
  are two bisections, and ``order_by`` walks them (numbers, then strings: the query order of plan.py);
* ``eq``: the keys per scalar value (see :func:`storage.query.evaluate.token`), the value itself or the scalars of a
  list field: an equality or ``$in`` on scalars is a dict lookup, list fields included ("members with role X");

and an indexed collection keeps its keys sorted (:class:`CollectionIndexes`), so a ``prefix`` is a bisection.

Where it is kept current: :class:`~storage.backends.json.tables.Tables` calls :meth:`JsonIndexes.apply` for every
committed record it applies (this process's commits, records replayed from other processes' journal lines,
restores, which commit through a transaction) and :meth:`JsonIndexes.build` after every (re)load, so an index is
always exactly the committed data. Compaction does not change documents, so it does not touch indexes.

Declarations: ``storage.indexes`` in the data folder, ``{"<collection>": ["<path>", ...]}``, written atomically
under the store lock by ``ensure_index`` / ``drop_index`` and read at every (re)load (so another process's new index
is built by this one at its next open), and again under the lock before ``ensure_index`` / ``drop_index`` change
them: each starts from what the file holds, so one process's declaration never undoes another's (two shards
declaring different indexes both keep theirs). ``ensure_index`` builds under the store lock, in a worker thread: writers
wait for it (about 0.3 s per index at 100k members on an idle machine), readers do not. Its ``storage.`` name makes
it the store's own file: it is never loaded as a collection nor reported as foreign, and a backup leaves the file
out but records the declarations in its manifest; a restore keeps the current store's indexes, declares the
backup's it lacks, and they index the restored documents (storage/backup/indexes.py). A declaration file that
cannot be read is logged and ignored (indexes are only an optimization: every query gives the same answer without
them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from ...fsutil import atomic_write, fsync_dir
from ...query.evaluate import MISSING, NUMBER, OTHER, STRING, getter, sort_rank, token
from .journal import Op
from .sorted_chunks import SortedChunks

__all__ = ["INDEX_FILE", "PathIndex", "CollectionIndexes", "JsonIndexes", "BATCH_MERGE", "build_indexes"]

log = logging.getLogger("storage.json")

INDEX_FILE = "storage.indexes"
#: A commit touching more documents of a collection than this updates its sorted lists in one merge (O(n)) rather
#: than one bisected insert per document (O(n) each).
BATCH_MERGE = 64

#: An index entry: (sort group, the number or string or None, scalar tokens). Only atoms and tuples of atoms, which
#: the garbage collector stops tracking: a full collection then costs the same with or without indexes (with sets
#: and lists in them, 100k members under three indexes were 900k tracked objects and a 0.9 s full collection, which
#: holds the event loop whichever thread triggers it).
Entry = tuple[int, Any, tuple[Any, ...]]


def _entry(value: Any) -> Entry | None:
    if value is MISSING:
        return None
    rank = sort_rank(value)
    tok = token(value)
    if tok is not None:
        tokens: tuple[Any, ...] = (tok,)
    elif type(value) is list:
        tokens = tuple({t for t in map(token, value) if t is not None})
    else:
        tokens = ()
    if rank == OTHER:
        return (rank, None, tokens) if tokens else None
    return rank, value, tokens


class PathIndex:
    """The index of one path of one collection (see the module doc)."""

    __slots__ = ("_unsorted", "entries", "eq", "get", "nums", "path", "strs")

    def __init__(self, path: tuple[str, ...]) -> None:
        self.path = path
        self.get = getter(path)
        self.entries: dict[str, Entry] = {}
        #: (value, key) pairs, sorted, in chunks of tuples (sorted_chunks.py: what the garbage collector skips)
        self.nums = SortedChunks()
        self.strs = SortedChunks()
        self._unsorted: tuple[list[tuple[Any, str]], list[tuple[str, str]]] = ([], [])  # while building
        #: token -> the one key that has it, or a dict of two or more keys (an insertion-ordered set): a dict of
        #: str -> None is never tracked by the garbage collector, a set always is and every full collection
        #: visits each of its members (100k members under a ``roles`` index: ~100k visits, several ms a pass)
        self.eq: dict[Any, str | dict[str, None]] = {}

    def _sorted(self, rank: int) -> SortedChunks:
        return self.nums if rank == NUMBER else self.strs

    def _unlink(self, key: str) -> Entry | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            eq = self.eq
            for tok in entry[2]:
                keys = eq.get(tok)
                if keys is None:
                    continue
                if isinstance(keys, str):
                    if keys == key:
                        del eq[tok]
                    continue
                keys.pop(key, None)
                if len(keys) == 1:
                    eq[tok] = next(iter(keys))  # back to a plain str (see Entry)
        return entry

    def _link(self, key: str, entry: Entry) -> None:
        self.entries[key] = entry
        eq = self.eq
        for tok in entry[2]:
            keys = eq.get(tok)
            if keys is None:
                eq[tok] = key  # most values are unique (ids, counters): no set for them
            elif isinstance(keys, str):
                if keys != key:
                    eq[tok] = {keys: None, key: None}
            else:
                keys[key] = None

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``{key: decoded doc or None (deleted)}``."""
        removed: list[tuple[int, Any, str]] = []
        added: list[tuple[int, Any, str]] = []
        for key, doc in changes.items():
            old = self._unlink(key)
            if old is not None and old[0] != OTHER:
                removed.append((old[0], old[1], key))
            new = _entry(self.get(doc)) if doc is not None else None
            if new is not None:
                self._link(key, new)
                if new[0] != OTHER:
                    added.append((new[0], new[1], key))
        if len(removed) + len(added) <= BATCH_MERGE:
            for rank, value, key in removed:
                self._sorted(rank).discard((value, key))
            for rank, value, key in added:
                self._sorted(rank).add((value, key))
            return
        for rank in (NUMBER, STRING):
            gone = {key for r, _v, key in removed if r == rank}
            fresh = [(value, key) for r, value, key in added if r == rank]
            if not gone and not fresh:
                continue
            lst = self._sorted(rank)
            pairs = [pair for pair in lst if pair[1] not in gone] if gone else list(lst)
            pairs.extend(fresh)
            pairs.sort()  # two sorted runs once ``fresh`` is sorted: timsort merges them in linear time
            lst.rebuild(pairs)

    def clear(self) -> None:
        self.entries, self.nums, self.strs, self.eq = {}, SortedChunks(), SortedChunks(), {}
        self._unsorted = ([], [])

    def add_unsorted(self, key: str, doc: Any) -> None:
        """While building: add a document (:meth:`finish` sorts once at the end)."""
        entry = _entry(self.get(doc))
        if entry is not None:
            self._link(key, entry)
            if entry[0] == NUMBER:
                self._unsorted[0].append((entry[1], key))
            elif entry[0] == STRING:
                self._unsorted[1].append((entry[1], key))

    def finish(self) -> None:
        nums, strs = self._unsorted
        nums.sort()
        strs.sort()
        self.nums.rebuild(nums)
        self.strs.rebuild(strs)
        self._unsorted = ([], [])

    # -- reading -----------------------------------------------------------------------------------------------------
    def equal(self, value: Any) -> dict[str, None] | tuple[str, ...]:
        """Keys whose field equals the scalar ``value`` or is a list holding it (the ``$eq`` rule, exactly)."""
        keys = self.eq.get(token(value))
        if keys is None:
            return ()
        return (keys,) if isinstance(keys, str) else keys

    def range(self, low: tuple[Any, bool] | None, high: tuple[Any, bool] | None) -> list[str]:
        """Keys whose field is of the bounds' kind and within them (``(value, inclusive)``); exactly the range
        rule. The bounds are of one kind (both numbers or both strings)."""
        bound = (low or high)
        assert bound is not None
        lst = self.strs if type(bound[0]) is str else self.nums
        start, end = 0, len(lst)
        if low is not None:
            start = lst.position(low[0], right=not low[1], key=_value)
        if high is not None:
            end = lst.position(high[0], right=high[1], key=_value)
        return [key for _value_, key in lst.slice(start, end)] if start < end else []

    def ordered(self, descending: bool) -> Iterator[str]:
        """Keys of the number then string group in query order (ties by key ascending); the rest is not here."""
        for lst in (self.nums, self.strs):
            if not descending:
                for pair in lst:
                    yield pair[1]
                continue
            run: list[str] = []  # backwards by value, but each run of equal values by key ascending
            value: Any = None
            for pair in reversed(lst):
                if run and pair[0] != value:
                    yield from reversed(run)
                    run = []
                value = pair[0]
                run.append(pair[1])
            yield from reversed(run)

    def typed_count(self) -> int:
        return len(self.nums) + len(self.strs)


def _value(pair: tuple[Any, str]) -> Any:
    return pair[0]


class CollectionIndexes:
    """The indexes of one collection: its :class:`PathIndex` per dotted path, and every key of the collection in
    order (a prefix is then a bisection: a guild's members without looking at the others')."""

    __slots__ = ("keys", "paths")

    def __init__(self, paths: dict[str, PathIndex], keys: list[str]) -> None:
        self.paths = paths
        self.keys = SortedChunks(keys)  # sorted, in chunks of tuples (sorted_chunks.py)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``{key: decoded doc or None (deleted)}``."""
        for index in self.paths.values():
            index.update(changes)
        keys = self.keys
        if len(changes) <= BATCH_MERGE:
            for key, doc in changes.items():
                if doc is None:
                    keys.discard(key)
                elif key not in keys:
                    keys.add(key)
            return
        gone = {key for key, doc in changes.items() if doc is None}
        every = list(keys)
        known = set(every)
        kept = [key for key in every if key not in gone] if gone else every
        kept.extend(key for key, doc in changes.items() if doc is not None and key not in known)
        kept.sort()
        keys.rebuild(kept)

    def prefixed(self, prefix: str) -> list[str]:
        """The keys that start with ``prefix``, in order."""
        keys = self.keys
        out = []
        for key in keys.iter_from(keys.position(prefix)):
            if not key.startswith(prefix):
                break
            out.append(key)
        return out


class JsonIndexes:
    """Every index of a store: the declarations and the live :class:`PathIndex` objects."""

    def __init__(self, folder: Path) -> None:
        self.file = folder / INDEX_FILE
        self.declared: dict[str, list[str]] = {}
        #: collection -> its indexes; built after each load, for the declared indexes
        self.live: dict[str, CollectionIndexes] = {}

    def read(self) -> None:
        """(Re)read the declarations (at every load)."""
        self.declared = self.on_file() or {}

    def on_file(self) -> dict[str, list[str]] | None:
        """The declarations ``storage.indexes`` holds now (none when it is missing); None when it cannot be read or
        is not a declaration file (logged)."""
        try:
            raw = self.file.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("%s: cannot read the index declarations (%s); queries run without indexes", self.file, exc)
            return None
        try:
            obj = orjson.loads(raw)
            declared = {str(c): sorted({str(p) for p in paths}) for c, paths in obj.items()
                        if isinstance(paths, list)}
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            log.warning("%s is not a valid index declaration file (%s); queries run without indexes", self.file,
                        exc)
            return None
        return {c: paths for c, paths in declared.items() if paths}

    def adopt(self, declared: dict[str, list[str]], built: Mapping[str, CollectionIndexes]) -> None:
        """Make ``declared`` the declarations and the live indexes match it: ``built`` holds the indexes of the
        paths newly declared (by :func:`build_indexes`), the live ones no longer declared are dropped."""
        for collection in list(self.live):
            live = self.live[collection]
            keep = set(declared.get(collection, ()))
            for path in [p for p in live.paths if p not in keep]:
                del live.paths[path]
            if not live.paths:
                del self.live[collection]
        for collection, fresh in built.items():
            current = self.live.get(collection)
            if current is None:
                self.live[collection] = fresh
            else:
                current.paths.update(fresh.paths)
        self.declared = declared

    def write(self, replaced: Callable[[], None] = lambda: None) -> None:
        """Persist the declarations (atomically; under the store lock). ``replaced`` is called the moment the
        file holds them (before the folder's fsync, which may still fail): from then on they are the declarations,
        whatever happens to the caller (see JsonBackend._declare_indexes)."""
        atomic_write(self.file, orjson.dumps(self.declared, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS),
                     sync_dir=False)
        replaced()
        fsync_dir(self.file.parent)

    def reset(self) -> None:
        self.live = {}

    def build(self, data: Mapping[str, Mapping[str, bytes]]) -> None:
        """Build every declared index from ``data`` (after a load; in the loading thread)."""
        live: dict[str, CollectionIndexes] = {}
        for collection, paths in self.declared.items():
            live[collection] = build_indexes(data.get(collection, {}), paths)
        self.live = live

    def apply(self, ops: Sequence[Op]) -> None:
        """A committed record's operations, for the indexed collections (see the module doc)."""
        live = self.live
        changes: dict[str, dict[str, Any]] = {}
        loads = orjson.loads
        for op in ops:
            if op[1] in live:
                changes.setdefault(op[1], {})[op[2]] = loads(op[3]) if op[0] == "p" else None  # type: ignore[misc]
        for collection, changed in changes.items():
            live[collection].update(changed)

    def of(self, collection: str) -> CollectionIndexes | None:
        return self.live.get(collection)


def build_indexes(coll: Mapping[str, bytes], paths: list[str]) -> CollectionIndexes:
    """Fresh indexes of ``paths`` over a collection (each document decoded once, one at a time)."""
    indexes = {path: PathIndex(tuple(path.split("."))) for path in paths}
    fill = list(indexes.values())
    if fill:
        loads = orjson.loads
        for key, raw in coll.items():
            doc = loads(raw)
            for index in fill:
                index.add_unsorted(key, doc)
        for index in fill:
            index.finish()
    return CollectionIndexes(indexes, sorted(coll))
