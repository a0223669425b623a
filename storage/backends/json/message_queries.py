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
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

from ...errors import ValidationError
from ...interfaces import Grouping, TopColumn
from ...messages.columns import DAY_MICROS, NEVER, MessageColumns, day_text, micros_text
from ...models import snowflake
from ...protocol import Document, Transaction

__all__ = ["JsonMessageQueries", "count", "group", "top", "last", "refresh_statistics"]

Blocks = AsyncIterator[MessageColumns]


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
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


async def last(blocks: Blocks, author: str) -> str | None:
    """The canonical time of the author's latest row, or None."""
    latest: int | None = None
    async for block in blocks:
        found = max((m for m, a in zip(block.micros, block.authors) if a == author), default=None)
        if found is not None and (latest is None or found > latest):
            latest = found
    return None if latest is None else micros_text(latest)


async def refresh_statistics(transaction: Callable[[], AbstractAsyncContextManager[Transaction]], collection: str,
                             guild: str, blocks: Blocks) -> int:
    """Write each author's message count and latest time (from ``blocks``: the guild's messages) into the member
    documents ``<guild>_<user>`` of ``collection``, as ``refresh_member_statistics`` promises; returns how many
    documents were written.

    ``transaction`` is the store's: every member document is read and the changed ones written in one.
    """
    counts: Counter[str] = Counter()
    latest: dict[str, int] = {}  # author -> time of the latest message
    async for block in blocks:
        counts.update(block.authors)
        for m, author in zip(block.micros, block.authors):
            if m > latest.get(author, NEVER):
                latest[author] = m

    def fresh(user: str) -> dict[str, Any]:
        last_time = micros_text(latest[user]) if user in latest else None
        return {"message_count": counts.get(user, 0), "last_active": last_time}

    prefix = f"{guild}_"
    async with transaction() as tx:
        writes: list[tuple[str, Document]] = []
        seen: set[str] = set()
        async for key, doc in tx.items(collection, prefix=prefix):
            user = key[len(prefix):]
            try:
                snowflake(user, "user_id")
            except ValidationError:
                continue  # not a member key (``<guild>_<user>``): not ours to touch
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
            writes.append((key, {**doc, "statistics": {**old, **new}}))
        for user in sorted(counts.keys() - seen):
            writes.append((f"{prefix}{user}", {"user_id": user, "guild_id": guild, "statistics": fresh(user)}))
        if writes:
            await tx.put_many(collection, writes)
    return len(writes)


class JsonMessageQueries(abc.ABC):
    """The query primitives of :class:`storage.messages.queries.AnalyticsMixin`, over ``_scan_message_columns``."""

    @abc.abstractmethod
    def _scan_message_columns(self, guild_id: str | None, since: datetime | None,
                              until: datetime | None) -> Blocks:
        """The records in ``[since, until)`` as column blocks, in any order."""

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

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
