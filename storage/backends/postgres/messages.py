"""Message analytics on PostgreSQL: the message primitives of :mod:`storage.messages.queries`, the queries in SQL.

Records live in ``storage_messages`` (see postgres/schema.py): typed columns for what the queries filter and group by,
ids shifted into ``bigint``, and an ``extra`` jsonb column only for what does not fit them (fields beyond the
seed's, or an ``analysis`` with other keys than a ``sentiment`` string and a ``topics`` list), so the common
record costs no JSON parsing on the server and every record still reads back exactly as it was written.

Ingest is a binary ``COPY`` straight into the table, each record checked and encoded in one pass by postgres/ingest.py
(rows built by postgres/copy_rows.py: a third of the client time asyncpg's generic encoding took) and sent in chunks
by an
asynchronous generator, so that the client's work on the next chunk (which bounds ingest) overlaps with the server
inserting the previous one; a batch of several chunks is one transaction, rolled back if a later chunk holds a bad
record.
A ``COPY`` cannot skip existing ids, so when one is already stored (the unique index refuses the whole ``COPY``,
which then wrote nothing) the batch goes again through a temporary table and ``INSERT ... SELECT ... ON CONFLICT
(message_id) DO NOTHING``; a large batch whose first or last id is stored (a resent one) goes there directly. New
messages, the usual case, pay for one pass.

The query primitives (``_count_messages``, ``_group_messages``, ``_top_messages``, ``_last_message``) are one
aggregate statement each, given arguments the public methods have checked; the conformance tests hold their answers
to the same reference as the JSON backend's (Python, over column blocks). So is ``_refresh_statistics``, whose
statement also writes the member documents (see postgres/member_stats.py).

Where the time goes, and why the queries are written as they are
    A guild's messages are spread over every page of the table (guilds interleave as messages arrive), so any
    query that visits the heap reads all of it, whatever the guild's share. The queries therefore read only the
    covering index ``(guild_id, created_at) INCLUDE (channel_id, author_id, sentiment, topics)``: an index-only
    scan of one contiguous range. That works only for heap pages the visibility map marks all-visible, and pages
    just written by ``COPY`` are not until a ``VACUUM`` has seen them (autovacuum may take minutes, and does not
    come at all for a modest share of new rows). So after every :attr:`PgMessagesMixin.VACUUM_AFTER_ROWS` new
    rows the store runs a ``VACUUM`` of the table itself that skips index cleanup: it visits only the pages that
    are not all-visible yet (the new ones), costs well under a microsecond per ingested row, and never blocks
    readers or writers; ``SKIP_LOCKED`` lets it step aside when another one is running. Until it runs, the
    newest rows cost a heap visit each: queries stay exact, only slower for them. A prune is followed by a full
    ``VACUUM`` (the dead rows' index entries would cost a heap visit each in every query over their time); it
    costs about twice the ``DELETE`` (it reads every index whole), once, in the call that asked for the prune.

    Per-row expressions are kept cheap: days come from ``date_bin`` (integer arithmetic; ``AT TIME ZONE`` looks
    up the zone for every row and doubled the cost of ``by="day"``), topics are counted per distinct list first
    (a few hundred combinations) and only those are unnested, and ``sentiment`` is grouped as stored, ``NULL``
    folded into ``"unknown"`` in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import asyncpg

from ...errors import DatabaseError, ValidationError
from ...interfaces import Grouping, MessageSummary, TopColumn
from ...messages.records import INGEST_CHUNK
from ...models import iso_utc
from ...offload import off_loop
from . import conn as pg_conn
from . import member_stats as pg_member_stats
from .analyze import LoadStatistics
from .errors import DRIVER_ERRORS
from .ingest import Ingest, KeyedRow, RowEncoder, checked_rows, record_rows, replay, typed_columns
from .schema import ID_SHIFT

__all__ = ["PgMessagesMixin", "to_row", "to_record", "COLUMNS", "delete_before"]

log = logging.getLogger("storage.postgres")
#: ``_scan_messages`` gives the event loop a turn every this many records (see json/messages.py's SCAN_TURN); less
#: than SCAN_BLOCK, or the only turns are the fetches: a backup encodes and hashes each record in the scan's step,
#: and a block of 500 was one loop step of 14-21 ms CPU (``bench_stalls.py``, PostgreSQL ``create_backup``).
SCAN_TURN = 125
#: Rows per ``FETCH`` of ``_scan_messages``: asyncpg decodes a fetch's rows (their ``analysis`` jsonb through a
#: Python decoder) in the loop's socket reads, as many as one read brings, and their records are alive at once.
SCAN_BLOCK = 500

Record = dict[str, Any]
COLUMNS = ("message_id", "guild_id", "channel_id", "author_id", "created_at", "content_length", "attachments",
           "reactions", "sentiment", "topics", "extra")
_UTC = timezone.utc
_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM storage_messages"
# asyncpg sends 9999-12-31T23:59:59.999999 (its datetime.max) as 'infinity', which is another value. So a stored
# time travels as canonical text (PostgreSQL reads ISO 8601 the same under every DateStyle), and a bound as a
# datetime (the planner estimates how many rows a typed value selects, not a cast text) except that instant, which
# is written out (see _time_clause).
_TS = "::text::timestamptz"
_LAST_INSTANT = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
_LAST_INSTANT_SQL = "timestamptz '9999-12-31 23:59:59.999999+00'"
_INSERT_ONE = ("INSERT INTO storage_messages (" + ", ".join(COLUMNS) + ") VALUES "
               f"($1, $2, $3, $4, $5{_TS}, $6, $7, $8, $9, $10, $11) ON CONFLICT (message_id) DO NOTHING")
_UPDATE = (f"UPDATE storage_messages SET guild_id = $2, channel_id = $3, author_id = $4, created_at = $5{_TS}, "
           "content_length = $6, attachments = $7, reactions = $8, sentiment = $9, topics = $10, extra = $11 "
           "WHERE message_id = $1")
_ANY_STORED = "SELECT EXISTS (SELECT FROM storage_messages WHERE message_id IN ($1, $2))"
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+(?:-[0-9A-F]+)+\Z")  # what pg_export_snapshot() returns
_PROBE_FROM = 1000  # records: below this, a failed COPY costs less than the probe's round trip usually saves
#: Records checked and encoded on the event loop per ``COPY`` chunk (``record_messages``; a write of up to
#: INGEST_CHUNK normalized records): one chunk per loop step. A loop step with 1,000 records took 4-6 ms of CPU,
#: and a timer's waiter (a bot's heartbeat, a 1 ms ticker) waited through three such steps: the ingest's task runs
#: first in every loop iteration, and a timer wakes its task only in the iteration after it fired (gaps of 14-17
#: ms of CPU at 10k records a call). 250 records a step: 1-1.5 ms, gaps ~4.5 ms, the same ingest time
#: (benchmarks/README.md).
COPY_CHUNK = 250
_STAGE = "storage_messages_stage"
_STAGE_CREATE = f"CREATE TEMPORARY TABLE {_STAGE} (LIKE storage_messages) ON COMMIT DROP"
_STAGE_MERGE = (f"INSERT INTO storage_messages SELECT * FROM {_STAGE} ORDER BY message_id "
                "ON CONFLICT (message_id) DO NOTHING")

# The queries. ``{where}`` is the guild and time filter (see _where), ``{0}``... the query's own parameters; every
# one reads only columns of the covering index (tests/test_pg_messages.py checks each plan is index-only).
_COUNT = "SELECT count(*) FROM storage_messages{where}"
_BY_COLUMN = "SELECT {column}, count(*) FROM storage_messages{{where}} GROUP BY {column}"
# Ties in the top lists are broken by the id *as text*, like the Python version (and Python's str order).
_TOP_COLUMN = ("SELECT {column}, count(*) AS n FROM storage_messages{{where}} GROUP BY {column} "
               "ORDER BY n DESC, ((({column})::numeric + 9223372036854775808)::text) COLLATE \"C\" LIMIT {{0}}")
_SENTIMENTS = "SELECT sentiment, count(*) FROM storage_messages{where} GROUP BY sentiment"
# max() becomes a backward walk of the guild's index range that stops at the author's newest message.
_LAST_ACTIVITY = "SELECT max(created_at) FROM storage_messages{where} AND author_id = {0}"
# The UTC day of a message: date_bin is integer arithmetic (PostgreSQL 14+), AT TIME ZONE a zone lookup per row. The
# origin precedes every storable time (four-digit years), so no version's rounding of negative offsets matters.
_BY_DAY_BIN = ("SELECT (d AT TIME ZONE 'UTC')::date, n FROM (SELECT date_bin('1 day', created_at, "
               "timestamptz '0001-01-01 00:00:00+00') AS d, count(*) AS n FROM storage_messages{where} GROUP BY d) "
               "AS days")
_BY_DAY_ZONE = "SELECT (created_at AT TIME ZONE 'UTC')::date AS d, count(*) FROM storage_messages{where} GROUP BY d"
# A topic counts once per message: count each distinct list first, then its distinct topics.
_TOP_TOPICS = (
    "SELECT t.topic, sum(c.n)::bigint AS n FROM (SELECT topics, count(*) AS n FROM storage_messages{where} "
    "AND cardinality(topics) > 0 GROUP BY topics) AS c "
    "CROSS JOIN LATERAL (SELECT DISTINCT u FROM unnest(c.topics) AS u) AS t(topic) "
    "GROUP BY t.topic ORDER BY n DESC, t.topic COLLATE \"C\" LIMIT {0}")


def _canonical(dt: datetime) -> str:
    """The stored text of a timestamp: ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (as :func:`storage.models.iso_utc`)."""
    if dt.year < 1000:  # isoformat pads the year, strftime (which iso_utc uses) does not
        return iso_utc(dt)
    text = dt.astimezone(_UTC).isoformat()
    return text[:-6] + "Z"


def to_row(rec: Record) -> tuple[Any, ...]:
    """A normalized record (see :func:`storage.models.validate_message`) as a row of ``storage_messages``."""
    sentiment, topics, extra = typed_columns(rec)
    return (
        int(rec["message_id"]) - ID_SHIFT,
        int(rec["guild_id"]) - ID_SHIFT,
        int(rec["channel_id"]) - ID_SHIFT,
        int(rec["author_id"]) - ID_SHIFT,
        rec["timestamp"],  # see _TS
        rec["content_length"],
        rec["attachments"],
        rec["reactions"],
        sentiment,
        topics,
        extra,
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


def _encoded_in_order(records: list[Record]) -> list[list[Any]]:
    """``record_rows`` of the records in id order, every chunk at once (in a worker thread)."""
    return list(record_rows(sorted(records, key=_id_order), INGEST_CHUNK, RowEncoder()))


def _encoded_groups_in_order(groups: Iterable[list[Record]]) -> list[list[KeyedRow]]:
    """The rows of every record of ``groups`` in id order, INGEST_CHUNK a chunk (in a worker thread). Each group is
    encoded as it comes: rows are keyed bytes (postgres/ingest.py), which the garbage collector does not track,
    where a copy's 10k decoded records held at once were ~40k containers that reached its oldest generation."""
    encoder = RowEncoder()
    keyed: list[KeyedRow] = []
    for group in groups:
        keyed += map(encoder.record_keyed, group)
    keyed.sort()  # in id order (ids are distinct: only the keys are ever compared)
    return [keyed[start:start + INGEST_CHUNK] for start in range(0, len(keyed), INGEST_CHUNK)]


def _id_order(rec: Record) -> tuple[int, str]:
    mid: str = rec["message_id"]
    return len(mid), mid  # canonical ids have no leading zeros: this is numeric order


def _by_day(conn: Any) -> str:
    return _BY_DAY_BIN if conn.get_server_version().major >= 14 else _BY_DAY_ZONE


def _where(guild_id: str | None, since: datetime | None, until: datetime | None,
           args: list[Any]) -> str:
    """A WHERE clause over ``guild_id``/``created_at``; parameters are appended to ``args``."""
    clauses = []
    if guild_id is not None:
        args.append(int(guild_id) - ID_SHIFT)
        clauses.append(f"guild_id = ${len(args)}")
    if since is not None:
        clauses.append(_time_clause(">=", since, args))
    if until is not None:
        clauses.append(_time_clause("<", until, args))
    return (" WHERE " + " AND ".join(clauses)) if clauses else ""


def _time_clause(op: str, bound: datetime, args: list[Any]) -> str:
    """``created_at <op> bound``, the bound a parameter appended to ``args`` (see _LAST_INSTANT)."""
    if bound == _LAST_INSTANT:
        return f"created_at {op} {_LAST_INSTANT_SQL}"
    args.append(bound)
    return f"created_at {op} ${len(args)}"


async def delete_before(conn: Any, before: datetime, guild: str | None) -> int:
    """``prune_messages`` on ``conn`` (the store's own connection, or a transaction's): the records (of ``guild``,
    when given) with a timestamp before ``before`` deleted; returns how many."""
    args: list[Any] = []
    where = _time_clause('<', before, args)
    if guild is not None:
        args.append(int(guild) - ID_SHIFT)
        where += f" AND guild_id = ${len(args)}"
    status: str = await conn.execute(f"DELETE FROM storage_messages WHERE {where}", *args)
    return int(status.rsplit(" ", 1)[1])


def _vacuum_statement(conn: Any, *, index_cleanup: bool) -> str:
    """``VACUUM`` of the messages table with the options the server knows.

    ``SKIP_LOCKED`` (12+): another vacuum of the table (autovacuum, another store) is running, so do not queue
    behind it. ``INDEX_CLEANUP OFF`` (12+), after ingest: only the visibility map is wanted, and removing the dead
    rows of earlier updates would scan every index whole, inside someone's ``record_messages`` call; autovacuum
    does that in the background. ``PARALLEL 0`` (13+): a worker process costs more to start than it saves here.
    """
    major = conn.get_server_version().major
    if major < 12:
        return "VACUUM storage_messages"
    options = ["SKIP_LOCKED"]
    if not index_cleanup:
        options.append("INDEX_CLEANUP OFF")
    if major >= 13:
        options.append("PARALLEL 0")
    return f"VACUUM ({', '.join(options)}) storage_messages"


async def _cursor_blocks(conn: Any, query: str, args: Sequence[Any], size: int) -> AsyncIterator[list[Any]]:
    """The rows of ``query``, ``size`` at a time, through a server-side cursor in ``conn``'s open transaction: memory
    stays flat however many rows match.

    An SQL cursor (``DECLARE`` + ``FETCH``), not asyncpg's ``conn.cursor()``: that one always prepares a *named*
    statement (``__asyncpg_stmt_N__``, numbered per client connection), which behind a transaction pooler collides
    with another client's on the shared server connection (``DuplicatePreparedStatementError``, seen in
    ``copy --from`` and backups through PgBouncer even with ``STORAGE_PGBOUNCER=1``). These statements are unnamed.
    """
    await conn.execute(f"DECLARE storage_scan NO SCROLL CURSOR FOR {query}", *args)
    fetch = f"FETCH {int(size)} FROM storage_scan"
    while True:
        rows: list[Any] = await conn.fetch(fetch)
        if rows:
            yield rows
        if len(rows) < size:
            return


class PgMessagesMixin:
    """The message primitives and SQL queries of :class:`storage.backends.postgres.store.PostgresStore`."""

    #: New rows this store writes between two ``VACUUM`` runs that keep the visibility map current (module doc).
    VACUUM_AFTER_ROWS = 10_000

    _connection: Callable[[str], Any]
    _invalidate: Callable[[str, Any], None]
    _notify_written: Callable[[Any, str, list[tuple[str, bytes | None]]], Awaitable[None]]
    _now: Callable[[], datetime]
    config: Any
    _unvacuumed = 0  # rows this store inserted since its last VACUUM (per instance once assigned)
    _load_stats: LoadStatistics  # ANALYZE after bulk loads (postgres/analyze.py)

    # -- primitives ----------------------------------------------------------------------------------------------
    async def _insert_messages(self, records: list[Record]) -> int:
        if not records:
            return 0
        if len(records) == 1:
            async with self._connection("record_messages") as conn:
                status: str = await conn.execute(_INSERT_ONE, *to_row(records[0]))
                new = int(status.rsplit(" ", 1)[1])
                await self._count_for_vacuum(conn, new)
            return new
        # In id order: two batches that share ids then wait for each other in the same order, never in a cycle
        # (inserting into the unique index waits for the other uncommitted insert of the same id).
        if len(records) <= INGEST_CHUNK:
            return await self._copy_messages(Ingest(record_rows(sorted(records, key=_id_order), COPY_CHUNK,
                                                                RowEncoder()), COPY_CHUNK), len(records))
        # A copy's or restore's 10k records sorted and encoded on the loop held it ~80 ms: a worker thread does it
        # (they are the caller's, already normalized: nothing else touches them meanwhile).
        chunks = await off_loop(_encoded_in_order, records)
        return await self._copy_messages(Ingest(iter(chunks)))

    async def _insert_message_groups(self, groups: Iterable[list[Record]]) -> int:
        # encoded a group at a time in a worker thread, so that only rows are held (see _encoded_groups_in_order)
        chunks = await off_loop(_encoded_groups_in_order, groups)
        if not chunks:
            return 0
        return await self._copy_messages(Ingest(iter(chunks)))

    async def _ingest(self, records: Iterator[Any], size_hint: int) -> int:
        """``record_messages``: checked, encoded and sent a chunk at a time (see postgres/ingest.py)."""
        ingest = Ingest(checked_rows(records, COPY_CHUNK, RowEncoder()), COPY_CHUNK)
        if ingest.first is None:
            return 0
        # an iterator's count is unknown: a batch of more than one chunk is probed
        return await self._copy_messages(ingest, size_hint or (len(ingest.first) if ingest.whole else _PROBE_FROM))

    async def _copy_messages(self, ingest: Ingest, size: int = 0) -> int:
        """Write an ingest: one ``COPY`` (the usual case), or the staging-table merge when ids are stored already.
        ``size``: how many records the batch has, when known (whether to probe for a resent batch).

        A batch of one chunk (already checked whole) is one ``COPY``; a longer one runs in a transaction, rolled
        back if a later chunk holds a bad record. Chunks are in id order one at a time, so two big batches that
        share ids could still wait on each other in a cycle: PostgreSQL then fails one of them with a deadlock
        error after ``deadlock_timeout`` (1 s), and that one goes through the merge, which takes its ids in order.
        """
        first = ingest.first
        assert first is not None
        whole = ingest.whole
        async with self._connection("record_messages") as conn:
            # A resent batch (a retry, a replayed backup) would fail its COPY only after all of it was sent: when
            # the first or last id of the first chunk is stored already, go straight to the merge. ``size``: the
            # batch's records when known (else the first chunk's).
            low, high = ingest.first_ids
            resent = max(size, len(first)) >= _PROBE_FROM and await conn.fetchval(
                _ANY_STORED, low - ID_SHIFT, high - ID_SHIFT)
            new: int | None = None
            if not resent:
                try:
                    async with contextlib.nullcontext() if whole else pg_conn.transaction(conn):
                        await conn.copy_to_table("storage_messages", source=ingest.stream(), columns=COLUMNS,
                                                 format="binary")
                        ingest.check()  # a bad record ended the data early: roll back what was sent
                    new = ingest.rows
                except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError) as exc:
                    # nothing was written: merge through a staging table
                    log.debug("record_messages: COPY refused (%s), merging instead", type(exc).__name__)
            if new is None:
                encoded = replay(ingest.finish())  # may raise ValidationError: nothing is written then
                async with pg_conn.transaction(conn):
                    await conn.execute(_STAGE_CREATE)
                    await conn.copy_to_table(_STAGE, source=encoded, columns=COLUMNS, format="binary")
                    status: str = await conn.execute(_STAGE_MERGE)
                new = int(status.rsplit(" ", 1)[1])
            await self._count_for_vacuum(conn, new)
            await self._load_stats.after_load(conn, "storage_messages", new)
        return new

    async def _count_for_vacuum(self, conn: Any, new: int) -> None:
        """After :attr:`VACUUM_AFTER_ROWS` new rows, vacuum (see the module doc); the rows are committed already."""
        self._unvacuumed += new
        if self._unvacuumed >= self.VACUUM_AFTER_ROWS:
            self._unvacuumed = 0
            await self._vacuum(conn, index_cleanup=False)

    @staticmethod
    async def _vacuum(conn: Any, *, index_cleanup: bool) -> None:
        # Only an optimization: the write it follows is committed, so a failure here must not make the caller
        # believe the write failed (and retry it). Logged; autovacuum does the job later.
        try:
            await conn.execute(_vacuum_statement(conn, index_cleanup=index_cleanup))
        except DRIVER_ERRORS as exc:
            log.warning("VACUUM of storage_messages after a write failed (queries are slower until autovacuum "
                        "runs): %s: %s", type(exc).__name__, exc)

    async def _modify_message(self, message_id: str, fn: Callable[[Record], Record]) -> bool:
        shifted = int(message_id) - ID_SHIFT
        async with self._connection("update_message") as conn, pg_conn.transaction(conn):
            row = await conn.fetchrow(_SELECT + " WHERE message_id = $1 FOR UPDATE", shifted)
            if row is None:
                return False
            new = fn(to_record(row))
            if new.get("message_id") != message_id:
                raise ValidationError(f"message_id cannot be changed ({message_id} -> {new.get('message_id')!r})",
                                      field="message_id")
            await conn.execute(_UPDATE, *to_row(new))
            return True

    async def _delete_messages_before(self, before: datetime, guild: str | None = None) -> int:
        async with self._connection("prune_messages") as conn:
            deleted = await delete_before(conn, before, guild)
            if deleted:
                # Until a vacuum removes them, the index entries of deleted rows each cost a heap visit in every
                # query that spans their time (and autovacuum waits for 20% of the table to be dead).
                await self._vacuum(conn, index_cleanup=True)
        return deleted

    async def _scan_messages(self, guild_id: str | None = None, since: datetime | None = None,
                             until: datetime | None = None, *, snapshot: str | None = None) -> AsyncIterator[Record]:
        """``snapshot``: an exported snapshot (``PgTransaction.snapshot_id``) to read in instead of a fresh one, so
        that a backup's messages come from the same instant as its documents."""
        args: list[Any] = []
        query = _SELECT + _where(guild_id, since, until, args) + " ORDER BY created_at, message_id"
        if snapshot is not None and not _SNAPSHOT_ID.match(snapshot):
            raise ValidationError(f"not an exported snapshot id: {snapshot!r}", field="snapshot")
        if snapshot is not None and self.config.pool_max < 2:
            # The snapshot's own transaction holds the only connection: waiting for another would only time out.
            raise DatabaseError("reading messages in a transaction's snapshot (a backup, a copy) needs a second "
                                "connection: set STORAGE_POOL_MAX >= 2 (pool_max)")
        # A server-side cursor (inside a transaction, as PostgreSQL requires): memory stays flat however many
        # messages match, and the whole scan reads one snapshot.
        async with self._connection("scanning messages") as conn, pg_conn.transaction(
                conn, readonly=True, isolation="repeatable_read" if snapshot else None):
            if snapshot is not None:  # a utility statement: no parameters, hence the check of the id above
                await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            async for rows in _cursor_blocks(conn, query, args, SCAN_BLOCK):
                for index, row in enumerate(rows):
                    if index and not index % SCAN_TURN:
                        await asyncio.sleep(0)  # what the consumer does per record (a backup hashes it) runs here
                    yield to_record(row)

    # -- queries in SQL ------------------------------------------------------------------------------------------
    async def _aggregate(self, what: str, template: str | Callable[[Any], str], guild: str, since: datetime | None,
                         until: datetime | None, *params: Any) -> list[Any]:
        """Run ``template`` for checked arguments.

        ``{where}`` in the template becomes the guild and time filter; ``{0}``, ``{1}``... the placeholders of
        ``params``. Only fixed SQL fragments are formatted in: every value travels as a parameter. A callable
        template is given the connection first (for SQL that depends on the server version).
        """
        args: list[Any] = []
        where = _where(guild, since, until, args)
        placeholders = [f"${len(args) + i + 1}" for i in range(len(params))]
        async with self._connection(what) as conn:
            text = template if isinstance(template, str) else template(conn)
            rows: list[Any] = await conn.fetch(text.format(*placeholders, where=where), *args, *params)
        return rows

    async def _message_summary(self) -> MessageSummary:
        async with self._connection("message summary") as conn:
            row = await conn.fetchrow("SELECT count(*), count(DISTINCT guild_id), min(created_at), max(created_at) "
                                      "FROM storage_messages")
        count, guilds, oldest, newest = row
        return MessageSummary(count, guilds, None if oldest is None else _canonical(oldest),
                              None if newest is None else _canonical(newest))

    async def _count_messages(self, guild: str, since: datetime | None, until: datetime | None) -> int:
        rows = await self._aggregate("message_counts", _COUNT, guild, since, until)
        total: int = rows[0][0]
        return total

    async def _group_messages(self, by: Grouping, guild: str, since: datetime | None,
                              until: datetime | None) -> dict[str | None, int]:
        if by == "day":
            rows = await self._aggregate("message_counts", _by_day, guild, since, until)
            return {row[0].isoformat(): row[1] for row in rows}
        if by == "sentiment":
            rows = await self._aggregate("sentiment_breakdown", _SENTIMENTS, guild, since, until)
            return {row[0]: row[1] for row in rows}
        column = "channel_id" if by == "channel" else "author_id"
        rows = await self._aggregate("message_counts", _BY_COLUMN.format(column=column), guild, since, until)
        return {str(row[0] + ID_SHIFT): row[1] for row in rows}

    async def _top_messages(self, column: TopColumn, guild: str, limit: int, since: datetime | None,
                            until: datetime | None) -> list[tuple[str, int]]:
        if column == "topic":
            rows = await self._aggregate("top_topics", _TOP_TOPICS, guild, since, until, limit)
            return [(row[0], row[1]) for row in rows]
        name = f"{column}_id"
        rows = await self._aggregate(f"top_{column}s", _TOP_COLUMN.format(column=name), guild, since, until, limit)
        return [(str(row[0] + ID_SHIFT), row[1]) for row in rows]

    async def _last_message(self, guild: str, author: str, since: datetime | None,
                            until: datetime | None) -> str | None:
        rows = await self._aggregate("last_activity", _LAST_ACTIVITY, guild, since, until, int(author) - ID_SHIFT)
        latest: datetime | None = rows[0][0]
        return None if latest is None else _canonical(latest)

    async def _refresh_statistics(self, collection: str, guild: str, since: datetime | None,
                                  until: datetime | None) -> int:
        """One statement, which counts in the covering index and upserts the changed member documents (see
        postgres/member_stats.py)."""
        args = pg_member_stats.member_parameters(collection, guild)
        where = _where(guild, since, until, args)
        written: list[str] = []
        try:
            # A transaction although it is one statement: the keys written are known before the commit, so that a
            # commit whose outcome is lost with the connection still drops them from the cache.
            async with self._connection("refresh_member_statistics") as conn, pg_conn.transaction(conn):
                written = await pg_member_stats.refresh(conn, collection, where, args, self._now())
                await self._notify_written(conn, collection, [(key, None) for key in written])
        finally:
            if written:
                self._invalidate(collection, written)
        return len(written)
