"""Message analytics on PostgreSQL: the four primitives of :mod:`storage.analytics`, and its queries in SQL.

Records live in ``storage_messages`` (see pg_schema.py): typed columns for what the queries filter and group by,
ids shifted into ``bigint``, and an ``extra`` jsonb column only for what does not fit them (fields beyond the
seed's, or an ``analysis`` with other keys than a ``sentiment`` string and a ``topics`` list), so the common
record costs no JSON parsing on the server and every record still reads back exactly as it was written.

Ingest is a binary ``COPY`` straight into the table, fed by an asynchronous generator so that converting the
next rows in Python overlaps with the server inserting the previous ones. A ``COPY`` cannot skip existing ids, so
when one is already stored (the unique index refuses the whole ``COPY``, which then wrote nothing) the batch goes
again through a temporary table and ``INSERT ... SELECT ... ON CONFLICT (message_id) DO NOTHING``. New messages,
the usual case, pay for one pass.

The query methods override the generic (streaming, Python) versions of :class:`storage.analytics.AnalyticsMixin`
with one aggregate statement each and give identical answers; the conformance tests compare both to a reference.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import asyncpg

from ..analytics import BY_CHOICES, UNKNOWN_SENTIMENT, _bound, _limit
from ..codec import encode_doc
from ..errors import ValidationError
from ..models import iso_utc, snowflake
from ..protocol import TimeBound
from .pg_schema import ID_SHIFT

__all__ = ["PgMessagesMixin", "to_row", "to_record", "COLUMNS"]

Record = dict[str, Any]
COLUMNS = ("message_id", "guild_id", "channel_id", "author_id", "created_at", "content_length", "attachments",
           "reactions", "sentiment", "topics", "extra")
_TYPED = frozenset(("message_id", "guild_id", "channel_id", "author_id", "timestamp", "content_length",
                    "attachments", "reactions", "analysis"))
_TYPED_COUNT = len(_TYPED)
_BIGINT_MAX = 2**63 - 1
_UTC = timezone.utc
_ROWS_PER_YIELD = 5000  # let other tasks run while a large batch is being converted
_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM storage_messages"
_INSERT_ONE = ("INSERT INTO storage_messages (" + ", ".join(COLUMNS) + ") VALUES "
               "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (message_id) DO NOTHING")
_UPDATE = ("UPDATE storage_messages SET guild_id = $2, channel_id = $3, author_id = $4, created_at = $5, "
           "content_length = $6, attachments = $7, reactions = $8, sentiment = $9, topics = $10, extra = $11 "
           "WHERE message_id = $1")
_STAGE = "storage_messages_stage"
_STAGE_CREATE = f"CREATE TEMPORARY TABLE {_STAGE} (LIKE storage_messages) ON COMMIT DROP"
_STAGE_MERGE = (f"INSERT INTO storage_messages SELECT * FROM {_STAGE} ORDER BY message_id "
                "ON CONFLICT (message_id) DO NOTHING")
# Ties in the top lists are broken by the id *as text*, like the generic version (and Python's str order).
_ID_TEXT = "((({col})::numeric + 9223372036854775808)::text) COLLATE \"C\""


def _utc_from_canonical(ts: str) -> datetime:
    # A stored timestamp is canonical ("...Z"); fromisoformat reads the "Z" itself only from Python 3.11 on.
    return datetime.fromisoformat(ts[:-1]).replace(tzinfo=_UTC)


_parse_canonical: Callable[[str], datetime] = (
    datetime.fromisoformat if sys.version_info >= (3, 11) else _utc_from_canonical)


def _canonical(dt: datetime) -> str:
    """The stored text of a timestamp: ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (as :func:`storage.models.iso_utc`)."""
    if dt.year < 1000:  # isoformat pads the year, strftime (which iso_utc uses) does not
        return iso_utc(dt)
    text = dt.astimezone(_UTC).isoformat()
    return text[:-6] + "Z"


def to_row(rec: Record) -> tuple[Any, ...]:
    """A normalized record (see :func:`storage.models.validate_message`) as a row of ``storage_messages``.

    Runs once per ingested message, so it is written for speed.
    """
    analysis = rec["analysis"]
    sentiment = analysis.get("sentiment")
    topics = analysis.get("topics")
    extra: dict[str, Any] | None = None
    if len(rec) > _TYPED_COUNT:
        extra = {k: v for k, v in rec.items() if k not in _TYPED}
    # The typed columns rebuild ``analysis`` only if it holds nothing but a non-null sentiment and topics.
    if len(analysis) != (sentiment is not None) + (topics is not None):
        extra = extra or {}
        extra["analysis"] = analysis
    content_length, attachments, reactions = rec["content_length"], rec["attachments"], rec["reactions"]
    if content_length > _BIGINT_MAX or attachments > _BIGINT_MAX or reactions > _BIGINT_MAX:
        name = next(n for n in ("content_length", "attachments", "reactions") if rec[n] > _BIGINT_MAX)
        raise ValidationError(f"message {rec['message_id']}: {name} does not fit in a signed 64-bit integer",
                              field=name)
    return (
        int(rec["message_id"]) - ID_SHIFT,
        int(rec["guild_id"]) - ID_SHIFT,
        int(rec["channel_id"]) - ID_SHIFT,
        int(rec["author_id"]) - ID_SHIFT,
        _parse_canonical(rec["timestamp"]),
        content_length,
        attachments,
        reactions,
        sentiment,
        topics,
        encode_doc(extra, what="record") if extra else None,
    )


def to_record(row: Any) -> Record:
    """A row back as the record that was written (same fields and values, canonical ids and timestamp)."""
    mid, gid, cid, aid, ts, content_length, attachments, reactions, sentiment, topics, extra = row
    if extra is not None and "analysis" in extra:
        analysis = extra.pop("analysis")
    else:
        analysis = {}
        if sentiment is not None:
            analysis["sentiment"] = sentiment
        if topics is not None:
            analysis["topics"] = topics
    rec: Record = {
        "message_id": str(mid + ID_SHIFT),
        "channel_id": str(cid + ID_SHIFT),
        "author_id": str(aid + ID_SHIFT),
        "timestamp": _canonical(ts),
        "content_length": content_length,
        "attachments": attachments,
        "reactions": reactions,
        "analysis": analysis,
        "guild_id": str(gid + ID_SHIFT),
    }
    if extra:
        rec.update(extra)
    return rec


def _id_order(rec: Record) -> tuple[int, str]:
    mid: str = rec["message_id"]
    return len(mid), mid  # canonical ids have no leading zeros: this is numeric order


async def _rows(records: list[Record]) -> AsyncIterator[tuple[Any, ...]]:
    for start in range(0, len(records), _ROWS_PER_YIELD):
        for rec in records[start:start + _ROWS_PER_YIELD]:
            yield to_row(rec)
        await asyncio.sleep(0)


def _where(guild_id: str | None, since: datetime | None, until: datetime | None,
           args: list[Any]) -> str:
    """A WHERE clause over ``guild_id``/``created_at``; parameters are appended to ``args``."""
    clauses = []
    if guild_id is not None:
        args.append(int(guild_id) - ID_SHIFT)
        clauses.append(f"guild_id = ${len(args)}")
    if since is not None:
        args.append(since)
        clauses.append(f"created_at >= ${len(args)}")
    if until is not None:
        args.append(until)
        clauses.append(f"created_at < ${len(args)}")
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


class PgMessagesMixin:
    """The message primitives and SQL queries of :class:`storage.backends.postgres.PostgresStore`."""

    _connection: Callable[[str], Any]
    _guard_read: Callable[[], None]

    # -- primitives ----------------------------------------------------------------------------------------------
    async def _insert_messages(self, records: list[Record]) -> int:
        if not records:
            return 0
        async with self._connection("record_messages") as conn:
            if len(records) == 1:
                status: str = await conn.execute(_INSERT_ONE, *to_row(records[0]))
                return int(status.rsplit(" ", 1)[1])
            # In id order: two batches that share ids then wait for each other in the same order, never in a cycle
            # (inserting into the unique index waits for the other uncommitted insert of the same id).
            records = sorted(records, key=_id_order)
            try:
                await conn.copy_records_to_table("storage_messages", records=_rows(records), columns=COLUMNS)
                return len(records)
            except asyncpg.UniqueViolationError:
                pass  # some ids are stored already: the COPY wrote nothing, merge through a staging table
            async with conn.transaction():
                await conn.execute(_STAGE_CREATE)
                await conn.copy_records_to_table(_STAGE, records=_rows(records), columns=COLUMNS)
                status = await conn.execute(_STAGE_MERGE)
            return int(status.rsplit(" ", 1)[1])

    async def _modify_message(self, message_id: str, fn: Callable[[Record], Record]) -> bool:
        shifted = int(message_id) - ID_SHIFT
        async with self._connection("update_message") as conn, conn.transaction():
            row = await conn.fetchrow(_SELECT + " WHERE message_id = $1 FOR UPDATE", shifted)
            if row is None:
                return False
            new = fn(to_record(row))
            if new.get("message_id") != message_id:
                raise ValidationError(f"message_id cannot be changed ({message_id} -> {new.get('message_id')!r})",
                                      field="message_id")
            await conn.execute(_UPDATE, *to_row(new))
            return True

    async def _delete_messages_before(self, before: datetime) -> int:
        async with self._connection("prune_messages") as conn:
            status: str = await conn.execute("DELETE FROM storage_messages WHERE created_at < $1", before)
        return int(status.rsplit(" ", 1)[1])

    async def _scan_messages(self, guild_id: str | None = None, since: datetime | None = None,
                             until: datetime | None = None) -> AsyncIterator[Record]:
        args: list[Any] = []
        query = _SELECT + _where(guild_id, since, until, args) + " ORDER BY created_at, message_id"
        # A server-side cursor (inside a transaction, as PostgreSQL requires): memory stays flat however many
        # messages match, and the whole scan reads one snapshot.
        async with self._connection("scanning messages") as conn, conn.transaction(readonly=True):
            async for row in conn.cursor(query, *args, prefetch=2000):
                yield to_record(row)

    # -- queries in SQL ------------------------------------------------------------------------------------------
    async def _aggregate(self, what: str, template: str, guild_id: Any, since: TimeBound, until: TimeBound,
                         *params: Any) -> list[Any]:
        """Run ``template`` after the generic argument checks.

        ``{where}`` in the template becomes the guild and time filter; ``{0}``, ``{1}``... the placeholders of
        ``params``. Only fixed SQL fragments are formatted in: every value travels as a parameter.
        """
        self._guard_read()
        guild = snowflake(guild_id, "guild_id")
        args: list[Any] = []
        where = _where(guild, _bound(since, "since"), _bound(until, "until"), args)
        placeholders = [f"${len(args) + i + 1}" for i in range(len(params))]
        query = template.format(*placeholders, where=where)
        async with self._connection(what) as conn:
            rows: list[Any] = await conn.fetch(query, *args, *params)
        return rows

    async def message_counts(self, guild_id: int | str, by: str | None = None, *, since: TimeBound = None,
                             until: TimeBound = None) -> int | dict[str, int]:
        if by not in BY_CHOICES:
            raise ValidationError(f"by must be None, 'channel', 'author' or 'day', got {by!r}", field="by")
        if by is None:
            rows = await self._aggregate("message_counts", "SELECT count(*) FROM storage_messages{where}",
                                         guild_id, since, until)
            total: int = rows[0][0]
            return total
        if by == "day":
            rows = await self._aggregate(
                "message_counts",
                "SELECT (created_at AT TIME ZONE 'UTC')::date AS d, count(*) FROM storage_messages{where} GROUP BY d",
                guild_id, since, until)
            counts = {row[0].isoformat(): row[1] for row in rows}
        else:
            column = "channel_id" if by == "channel" else "author_id"
            rows = await self._aggregate(
                "message_counts", f"SELECT {column}, count(*) FROM storage_messages{{where}} GROUP BY {column}",
                guild_id, since, until)
            counts = {str(row[0] + ID_SHIFT): row[1] for row in rows}
        return dict(sorted(counts.items()))

    async def top_authors(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                          until: TimeBound = None) -> list[tuple[str, int]]:
        return await self._top_column("author_id", guild_id, limit, since, until)

    async def top_channels(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                           until: TimeBound = None) -> list[tuple[str, int]]:
        return await self._top_column("channel_id", guild_id, limit, since, until)

    async def _top_column(self, column: str, guild_id: Any, limit: int, since: TimeBound,
                          until: TimeBound) -> list[tuple[str, int]]:
        limit = _limit(limit)
        order = _ID_TEXT.format(col=column)
        rows = await self._aggregate(
            f"top {column}s",
            f"SELECT {column}, count(*) AS n FROM storage_messages{{where}} GROUP BY {column} "
            f"ORDER BY n DESC, {order} LIMIT {{0}}",
            guild_id, since, until, limit)
        return [(str(row[0] + ID_SHIFT), row[1]) for row in rows]

    async def top_topics(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                         until: TimeBound = None) -> list[tuple[str, int]]:
        limit = _limit(limit)
        # A topic counts once per message: DISTINCT over each message's own list.
        rows = await self._aggregate(
            "top_topics",
            "SELECT t.topic, count(*) AS n FROM storage_messages "
            "CROSS JOIN LATERAL (SELECT DISTINCT u FROM unnest(topics) AS u) AS t(topic){where} "
            "GROUP BY t.topic ORDER BY n DESC, t.topic COLLATE \"C\" LIMIT {0}",
            guild_id, since, until, limit)
        return [(row[0], row[1]) for row in rows]

    async def sentiment_breakdown(self, guild_id: int | str, *, since: TimeBound = None,
                                  until: TimeBound = None) -> dict[str, int]:
        rows = await self._aggregate(
            "sentiment_breakdown",
            "SELECT coalesce(sentiment, {0}) AS s, count(*) FROM storage_messages{where} GROUP BY s",
            guild_id, since, until, UNKNOWN_SENTIMENT)
        return dict(sorted((row[0], row[1]) for row in rows))

    async def last_activity(self, guild_id: int | str, author_id: int | str, *, since: TimeBound = None,
                            until: TimeBound = None) -> str | None:
        author = snowflake(author_id, "author_id")
        rows = await self._aggregate(
            "last_activity", "SELECT max(created_at) FROM storage_messages{where} AND author_id = {0}",
            guild_id, since, until, int(author) - ID_SHIFT)
        latest: datetime | None = rows[0][0]
        return None if latest is None else _canonical(latest)
