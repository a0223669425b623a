"""The JSON backend's analytics query primitives, computed in Python from column blocks.

JSON backend layer: :class:`JsonMessageQueries` gives :class:`~storage.backends.json.store.JsonBackend` the query
primitives of :mod:`storage.messages.queries` (whose public methods have checked the arguments already), reading
the message log's column blocks (:mod:`.message_cache`: one sequence per field, counted with
:class:`collections.Counter` in C). Each primitive is also a plain function over any stream of blocks, which is
how the tests run this Python version on the PostgreSQL store's records to compare it with the SQL one.

``refresh_statistics`` spells out in Python what storage/backends/postgres/member_stats.py does in SQL: the
member documents are read and the changed ones written in one transaction of the document store.
"""

from __future__ import annotations

import abc
import asyncio
import heapq
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

import orjson

from ...documents import normalize_items
from ...errors import ValidationError
from ...interfaces import BackendTransaction, Grouping, TopColumn
from ...messages.columns import DAY_MICROS, NEVER, MessageColumns, day_text, micros_text
from ...models import snowflake
from ...offload import off_loop
from ...protocol import Document
from ...sorting import sorted_in_runs

__all__ = ["JsonMessageQueries", "count", "group", "top", "last", "refresh_statistics"]

Blocks = AsyncIterator[MessageColumns]
#: Member documents encoded and staged at a time by refresh_statistics, with a loop turn between slices.
WRITE_SLICE = 1000
#: Member keys one C-level sort takes in refresh_statistics' worker thread (storage/sorting.py): 4096 random keys
#: sort in about half a ms, where the 100k keys of a guild's members took 34 ms in one ``sorted``.
KEY_RUN = 4096


async def count(blocks: Blocks) -> int:
    """How many rows the blocks hold."""
    total = 0
    async for block in blocks:
        total += len(block)
    return total


async def group(blocks: Blocks, by: Grouping) -> dict[str | None, int]:
    """Rows per channel, author, UTC day (``YYYY-MM-DD``) or sentiment (None: no sentiment)."""
    if by == "day":
        days: Counter[int] = Counter()
        async for block in blocks:
            days.update(m // DAY_MICROS for m in block.micros)
        return {day_text(day): n for day, n in days.items()}
    counts: Counter[str | None] = Counter()
    async for block in blocks:
        if by == "sentiment":
            counts.update(block.sentiments)
        else:
            counts.update(block.channels if by == "channel" else block.authors)
    return dict(counts)


async def top(blocks: Blocks, column: TopColumn, limit: int) -> list[tuple[str, int]]:
    """The ``limit`` first ``(key, rows)``: rows descending, then key ascending, so that ties have one answer."""
    counts: Counter[str] = Counter()
    async for block in blocks:
        if column == "topic":
            for topics, n in Counter(block.topics).items():  # few distinct combinations: count those first
                for topic in topics:
                    counts[topic] += n
        else:
            counts.update(block.authors if column == "author" else block.channels)
    return _first(counts, limit)


def _first(counts: Counter[str], limit: int) -> list[tuple[str, int]]:
    """The ``limit`` first of ``counts`` by rows descending, then key. Sorting every author of a large guild with
    a Python key function held the loop 15-30 ms: the ``limit``-th largest count is found in C first, and only the
    entries at or above it are sorted (ties at that count included, so the answer is the same)."""
    items: Iterable[tuple[str, int]] = counts.items()
    if 0 < limit < len(counts):
        floor = heapq.nlargest(limit, counts.values())[-1]
        items = [kv for kv in items if kv[1] >= floor]
    return sorted(items, key=lambda kv: (-kv[1], kv[0]))[:limit]


async def last(blocks: Blocks, author: str) -> str | None:
    """The canonical time of the author's latest row, or None."""
    latest: int | None = None
    async for block in blocks:
        found = max((m for m, a in zip(block.micros, block.authors) if a == author), default=None)
        if found is not None and (latest is None or found > latest):
            latest = found
    return None if latest is None else micros_text(latest)


def _tally(block: MessageColumns, counts: Counter[str], latest: dict[str, int]) -> None:
    """Add one block's authors to the per-author count and latest time (in a worker thread)."""
    counts.update(block.authors)
    for m, author in zip(block.micros, block.authors):
        if m > latest.get(author, NEVER):
            latest[author] = m


def _member_writes(collection: str, guild: str, members: list[tuple[str, Any]], counts: Counter[str],
                   latest: dict[str, int]) -> tuple[list[str], list[bytes]]:
    """The member documents to write, encoded as stored (``_put_stored``'s check and encoding, no collection
    rule): ``members`` are the guild's ``(key, encoded or decoded doc)`` in key order.

    Runs in a worker thread: at 20k members the decoding and comparing would hold the event loop for a long time.
    Each new document is encoded as soon as it is made, so its dicts die young: 25k decoded documents held until
    the writes (a dict and a list each) were walked by every full collection meanwhile (2 x 40-50 ms holding the
    GIL at 100k members), and their encoding was the loop's work. Keys and documents come back as two lists: a
    list of pairs is as many tuples, which the collector tracks until it has walked them once.
    """
    keys: list[str] = []
    raws: list[bytes] = []
    for key, doc in _decoded_writes(collection, guild, members, counts, latest):
        key, raw = normalize_items([(key, doc)], collection, rule=False)[0]
        keys.append(key)
        raws.append(raw)
    return keys, raws


def _decoded_writes(collection: str, guild: str, members: list[tuple[str, Any]], counts: Counter[str],
                    latest: dict[str, int]) -> Iterable[tuple[str, Document]]:
    """The member documents to write, one at a time (see :func:`_member_writes`)."""
    def fresh(user: str) -> dict[str, Any]:
        last_time = micros_text(latest[user]) if user in latest else None
        return {"message_count": counts.get(user, 0), "last_active": last_time}

    prefix = f"{guild}_"
    seen: set[str] = set()
    loads = orjson.loads
    for key, stored in members:
        user = key[len(prefix):]
        try:
            snowflake(user, "user_id")
        except ValidationError:
            continue  # not a member key (``<guild>_<user>``): not ours to touch
        doc = loads(stored) if isinstance(stored, bytes) else stored
        seen.add(user)
        old = doc.get("statistics")
        if old is None:
            old = {}
        if not isinstance(old, dict):
            raise ValidationError(f"{collection}/{key}: statistics is a {type(old).__name__}, not an object; "
                                  "nothing was written", field="statistics")
        new = fresh(user)
        if "statistics" in doc and all(old.get(name) == value for name, value in new.items()):
            continue
        yield key, {**doc, "statistics": {**old, **new}}
    for user in sorted_in_runs(list(counts.keys() - seen), run=KEY_RUN):
        yield f"{prefix}{user}", {"user_id": user, "guild_id": guild, "statistics": fresh(user)}


def _guild_members(view: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """The ``(key, stored)`` of ``view`` whose key starts with ``prefix``, in key order (in a worker thread: sorted
    a run at a time, see :data:`KEY_RUN`)."""
    return [(key, view[key]) for key in sorted_in_runs([key for key in view if key.startswith(prefix)], run=KEY_RUN)]


async def refresh_statistics(transaction: Callable[[], AbstractAsyncContextManager[BackendTransaction]],
                             collection: str, guild: str, blocks: Blocks) -> int:
    """Write each author's message count and latest time (from ``blocks``: the guild's messages) into the member
    documents ``<guild>_<user>`` of ``collection``, as ``refresh_member_statistics`` promises; returns how many
    documents were written.

    ``transaction`` is the store's: every member document is read and the changed ones written in one. The
    counting and the comparing run in a worker thread, and the writes go in slices with a loop turn between them,
    so a large guild never holds the event loop (a bot's heartbeat) for long.
    """
    counts: Counter[str] = Counter()
    latest: dict[str, int] = {}  # author -> time of the latest message
    async for block in blocks:
        await off_loop(_tally, block, counts, latest)
    prefix = f"{guild}_"
    async with transaction() as tx:
        view = tx.encoded_documents(collection)
        if view is not None:  # in a thread: sorting 100k keys held the loop ~50 ms, and a lazy collection
            # (json/lazy.py) is read whole on first walk (the transaction holds the lock: nothing changes it)
            members: list[tuple[str, Any]] = await off_loop(_guild_members, view, prefix)
        else:
            members = [pair async for pair in tx.items(collection, prefix=prefix)]
        # as stored, like the SQL version: only statistics change, and an odd member stored by an older version
        # (storage/rules.py) must not stop the refresh of the others (encoded in the thread: see _member_writes)
        keys, raws = await off_loop(_member_writes, collection, guild, members, counts, latest)
        del members
        expiring = await tx._expiries(collection, None)  # a member that expires keeps its expiry (storage/expiry.py)
        tx._guard_write()
        for start in range(0, len(keys), WRITE_SLICE):
            if start:
                await asyncio.sleep(0)
            groups: dict[datetime | None, list[tuple[str, bytes]]] = {}
            for key, raw in zip(keys[start:start + WRITE_SLICE], raws[start:start + WRITE_SLICE]):
                groups.setdefault(expiring.get(key), []).append((key, raw))
            for when, group in groups.items():
                await tx._put_encoded(collection, group, when)
    return len(keys)


class JsonMessageQueries(abc.ABC):
    """The query primitives of :class:`storage.messages.queries.AnalyticsMixin`, over ``_scan_message_columns``."""

    @abc.abstractmethod
    def _scan_message_columns(self, guild_id: str | None, since: datetime | None,
                              until: datetime | None) -> Blocks:
        """The records in ``[since, until)`` as column blocks, in any order."""

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[BackendTransaction]: ...

    async def _count_messages(self, guild: str, since: datetime | None, until: datetime | None) -> int:
        return await count(self._scan_message_columns(guild, since, until))

    async def _group_messages(self, by: Grouping, guild: str,
                              since: datetime | None, until: datetime | None) -> dict[str | None, int]:
        return await group(self._scan_message_columns(guild, since, until), by)

    async def _top_messages(self, column: TopColumn, guild: str, limit: int,
                            since: datetime | None, until: datetime | None) -> list[tuple[str, int]]:
        return await top(self._scan_message_columns(guild, since, until), column, limit)

    async def _last_message(self, guild: str, author: str, since: datetime | None,
                            until: datetime | None) -> str | None:
        return await last(self._scan_message_columns(guild, since, until), author)

    async def _refresh_statistics(self, collection: str, guild: str, since: datetime | None,
                                  until: datetime | None) -> int:
        return await refresh_statistics(self.transaction, collection, guild,
                                        self._scan_message_columns(guild, since, until))
