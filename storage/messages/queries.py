"""Message analytics, the public API written once for every backend: ingest, changes, scans and the queries.

Feature layer: mixed into every store (:class:`storage.stores.StoreFeatures`); no backend imports it. Message
records are the highest-volume data a bot writes (a busy guild produces millions), so they are not documents in a
collection: each backend keeps them in its own append-friendly form behind the message primitives of
:class:`storage.interfaces.Backend`. Every public method here checks its arguments first, once (so both backends
reject exactly the same input, with the same error, and write nothing), then calls one primitive with checked,
canonical arguments (ids as canonical text, bounds as aware UTC datetimes): ``_insert_messages``,
``_modify_message``, ``_delete_messages_before`` and ``_scan_messages`` for the records, ``_count_messages``,
``_group_messages``, ``_top_messages`` and ``_last_message`` for the queries, ``_refresh_statistics`` for
``refresh_member_statistics``.

PostgreSQL answers them in SQL (storage/backends/postgres/messages.py, member_stats.py), the JSON backend from
column blocks (storage/backends/json/message_queries.py); the conformance tests hold both to one reference.
``record_messages`` goes through the optional ``_ingest(records, size_hint)``, whose default here checks the whole
batch and then calls ``_insert_messages``; PostgreSQL overrides it to write while it checks, in a transaction
(storage/backends/postgres/ingest.py). Both check with :func:`storage.messages.records.checked_chunks`, so they
accept and refuse the same. Which record wins among duplicates, and which fields an update cannot change:
:mod:`storage.messages.records`.

What the answers mean, stated once:

* **Missing sentiment** is counted as ``"unknown"``, so a breakdown always sums to the message count.
* **Topics** are counted once per message: ``["music", "music"]`` is one message about music.
* **Top lists** are ordered by count descending, then by key ascending as a string, so ties have one answer.
* **Bounds** are half-open ``[since, until)``, in UTC; naive datetimes and texts without an offset are UTC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, cast

from ..codec import canonical_numbers, encode_doc
from ..errors import ValidationError
from ..interfaces import Backend, Grouping, TopColumn
from ..models import MEMBERS, prune_bound, snowflake, time_bound
from ..protocol import TimeBound
from ..types import MessageRecord as TypedRecord
from .records import (
    INGEST_CHUNK,
    VALIDATE_IN_THREAD,
    checked_changes,
    checked_record,
    joined,
    merged_record,
    message_records,
    normalized_chunks,
)

__all__ = ["AnalyticsMixin", "UNKNOWN_SENTIMENT", "BY_CHOICES", "time_bound", "check_limit"]

#: The ``sentiment_breakdown`` key of messages without ``analysis.sentiment``.
UNKNOWN_SENTIMENT = "unknown"
BY_CHOICES = (None, "channel", "author", "day")


def check_limit(limit: Any) -> int:
    """A ``top_*`` query's ``limit``: a non-negative int (a bool is refused, though Python counts it as one)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValidationError(f"limit must be a non-negative integer, got {limit!r}", field="limit")
    return limit


def _sorted_counts(counts: Mapping[str | None, int]) -> dict[str, int]:
    """Counts by key, sorted by key; None (no sentiment) and ``"unknown"`` are one key."""
    merged: dict[str, int] = {}
    for key, n in counts.items():
        name = UNKNOWN_SENTIMENT if key is None else key
        merged[name] = merged.get(name, 0) + n
    return dict(sorted(merged.items()))


class AnalyticsMixin(Backend):
    """The public analytics API of every store (mixed into :class:`storage.stores.StoreFeatures`), over the message
    primitives of :class:`storage.interfaces.Backend`."""

    # -- ingest and changes --------------------------------------------------------------------------------------
    async def record_messages(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Record a batch (the fast path); returns how many were new.

        Every record is validated before anything is committed: one bad record raises :class:`ValidationError`
        naming its index and the field, and nothing is stored. Duplicates are not double-counted (see
        :mod:`storage.messages.records` for which version wins).
        """
        self._guard_write()
        return await self._ingest(message_records(records), len(records) if isinstance(records, list) else 0)

    async def _ingest(self, records: Iterator[Any], size_hint: int) -> int:
        """Check and write the caller's records (``size_hint`` of them, when known), all or nothing.

        This default checks everything first and then calls ``_insert_messages`` once; a backend that can undo a
        write (a transaction) overrides it to write while it checks.
        """
        chunks = normalized_chunks(records, INGEST_CHUNK)
        if size_hint > VALIDATE_IN_THREAD:
            # the checks cost per record: a big batch would hold the event loop (and the bot's heartbeat) too long
            unique = await asyncio.to_thread(joined, chunks)
        else:
            unique = joined(chunks)
        if not unique:
            return 0
        return await self._insert_messages(unique)

    async def record_message(self, record: Mapping[str, Any]) -> bool:
        """Record one message; False when its ``message_id`` was already recorded (nothing changes then)."""
        self._guard_write()
        return await self._insert_messages([checked_record(record)]) == 1

    async def update_message(self, message_id: int | str, changes: Mapping[str, Any]) -> bool:
        """Merge ``changes`` into a stored record (shallowly: ``analysis`` is replaced as a whole).

        For what changes after a message was recorded: reaction counts, a later analysis. The identity fields
        and the timestamp cannot change (:class:`ValidationError`). Returns False when there is no such message.
        """
        self._guard_write()
        mid = snowflake(message_id, "message_id")
        checked = checked_changes(mid, changes)
        encode_doc(checked, what="changes")
        checked = canonical_numbers(checked)  # numbers as every backend gives them back (see codec.py)
        return await self._modify_message(mid, lambda current: merged_record(current, checked))

    async def prune_messages(self, before: str | datetime, *, guild_id: int | str | None = None) -> int:
        """Delete messages older than ``before`` (timestamp < before), of one guild when ``guild_id`` is given;
        returns how many were deleted."""
        self._guard_write()
        return await self._delete_messages_before(*prune_bound(before, guild_id))

    # -- reads ---------------------------------------------------------------------------------------------------
    async def scan_messages(self, guild_id: int | str | None = None, since: TimeBound = None,
                            until: TimeBound = None) -> AsyncIterator[TypedRecord]:
        """Every stored record of a guild (of every guild when ``guild_id`` is None) in ``[since, until)``, ordered
        by (timestamp, message_id), as the normalized dicts ``record_messages`` stored (current versions).

        Streams: memory stays flat however many records match. The arguments are checked when iteration starts.
        """
        self._guard_read()
        guild = None if guild_id is None else snowflake(guild_id, "guild_id")
        lo, hi = time_bound(since, "since"), time_bound(until, "until")
        async for record in self._scan_messages(guild, lo, hi):
            yield cast(TypedRecord, record)

    def _window(self, guild_id: Any, since: TimeBound,
                until: TimeBound) -> tuple[str, datetime | None, datetime | None]:
        """The checked guild and bounds of a query (after the guards: a closed store says so first)."""
        self._guard_read()
        return snowflake(guild_id, "guild_id"), time_bound(since, "since"), time_bound(until, "until")

    async def message_counts(self, guild_id: int | str, by: str | None = None, *, since: TimeBound = None,
                             until: TimeBound = None) -> int | dict[str, int]:
        """How many messages; ``by`` = ``"channel"``/``"author"``/``"day"`` (UTC ``YYYY-MM-DD``) groups them.

        A grouped result has one sorted key per group that has messages.
        """
        if by not in BY_CHOICES:
            raise ValidationError(f"by must be None, 'channel', 'author' or 'day', got {by!r}", field="by")
        guild, lo, hi = self._window(guild_id, since, until)
        if by is None:
            return await self._count_messages(guild, lo, hi)
        grouping: Grouping = "channel" if by == "channel" else "author" if by == "author" else "day"
        return _sorted_counts(await self._group_messages(grouping, guild, lo, hi))

    async def top_authors(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                          until: TimeBound = None) -> list[tuple[str, int]]:
        """The ``limit`` most active authors as ``(author_id, messages)``."""
        return await self._top("author", guild_id, limit, since, until)

    async def top_channels(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                           until: TimeBound = None) -> list[tuple[str, int]]:
        """The ``limit`` busiest channels as ``(channel_id, messages)``."""
        return await self._top("channel", guild_id, limit, since, until)

    async def top_topics(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                         until: TimeBound = None) -> list[tuple[str, int]]:
        """The ``limit`` most discussed topics as ``(topic, messages)``; a topic counts once per message."""
        return await self._top("topic", guild_id, limit, since, until)

    async def _top(self, column: TopColumn, guild_id: Any, limit: Any, since: TimeBound,
                   until: TimeBound) -> list[tuple[str, int]]:
        checked = check_limit(limit)
        guild, lo, hi = self._window(guild_id, since, until)
        return await self._top_messages(column, guild, checked, lo, hi)

    async def sentiment_breakdown(self, guild_id: int | str, *, since: TimeBound = None,
                                  until: TimeBound = None) -> dict[str, int]:
        """Messages per ``analysis.sentiment``, sorted by key; no sentiment counts as ``"unknown"``."""
        guild, lo, hi = self._window(guild_id, since, until)
        return _sorted_counts(await self._group_messages("sentiment", guild, lo, hi))

    async def last_activity(self, guild_id: int | str, author_id: int | str, *, since: TimeBound = None,
                            until: TimeBound = None) -> str | None:
        """The timestamp (canonical ISO text) of the author's latest message in the guild, or None."""
        author = snowflake(author_id, "author_id")
        guild, lo, hi = self._window(guild_id, since, until)
        return await self._last_message(guild, author, lo, hi)

    async def refresh_member_statistics(self, guild_id: int | str, *, since: TimeBound = None,
                                        until: TimeBound = None) -> int:
        """Recompute ``statistics.message_count`` and ``statistics.last_active`` of the guild's members.

        The numbers come from the messages stored now (in ``[since, until)`` when given; after a prune, from what
        is left). Every other field of a member document, and every other ``statistics`` field, is kept.
        Members without messages get ``message_count`` 0 and ``last_active`` None; an author without a member
        document gets a minimal one (``user_id``, ``guild_id``, ``statistics``), so that ``get_member_data``
        agrees with ``message_counts``. A member document is a key ``<guild>_<user>`` whose ``<user>`` is a valid
        snowflake (other keys with the guild's prefix are not looked at); one whose ``statistics`` is neither an
        object nor null raises :class:`ValidationError` naming the first such key, and nothing is written. Only
        documents whose statistics change are written, all in one transaction; returns how many were written.
        """
        guild, lo, hi = self._window(guild_id, since, until)
        self._guard_write()  # it writes documents: refused on a read-only store, and inside a transaction
        return await self._refresh_statistics(MEMBERS, guild, lo, hi)
