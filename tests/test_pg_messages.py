"""The PostgreSQL message table beyond the conformance tests (which compare every query to a reference).

What is specific to this backend's speed work: the binary ``COPY`` rows built in Python must store exactly what
asyncpg's own encoding stores; a database made by schema version 1 is upgraded in place; the visibility map is kept
current by ingest and prune (index-only scans depend on it); every query is answered from the covering index
alone; and index-only answers stay exact after updates, prunes and concurrent ingest. ``refresh_member_statistics``
in SQL must leave exactly the documents the generic version leaves.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

import storage
from storage import StoreConfig
from storage.backends.json import message_queries
from storage.backends.postgres import member_stats as pg_member_stats
from storage.backends.postgres import messages as pm
from storage.backends.postgres import schema as pg_schema
from storage.messages.columns import columns_of
from storage.messages.records import normalize_messages
from storage.models import snowflake
from storage.stores import PostgresStore
from tests._turns import turns_during
from tests.test_analytics import (
    AUTHORS,
    GUILDS,
    Reference,
    assert_queries_match,
    canonical,
    random_stream,
    record_stream,
    windows,
)

UTC = timezone.utc
GUILD = "555000000000000001"
OTHER = "555000000000000002"
AUTHOR = "103"


class EagerVacuumStore(PostgresStore):
    """A store that vacuums after every 100 new rows, so that small tests cross the threshold often."""

    VACUUM_AFTER_ROWS = 100


def message(i: int, guild: str = GUILD, **fields: Any) -> dict[str, Any]:
    return {"message_id": i, "channel_id": 10 + i % 3, "author_id": 100 + i % 7, "guild_id": guild,
            "timestamp": (datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=37 * i)).isoformat(),
            "content_length": i % 400, "reactions": i % 5,
            "analysis": {"sentiment": ["positive", "neutral", "negative"][i % 3],
                         "topics": [["music"], ["art", "music"], []][i % 3]}, **fields}


async def lock_waits(conn: Any, task: asyncio.Future[Any], query_like: str) -> int:
    """How many sessions of this database run a statement matching ``query_like`` and wait for a lock: polled
    (up to 5 s) until one does or ``task`` is done. ``conn`` may be inside a transaction."""
    waiting = 0
    for _ in range(250):
        await conn.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees its first snapshot
        waiting = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND datname = current_database() AND query LIKE $1", query_like)
        if waiting or task.done():
            break
        await asyncio.sleep(0.02)
    return int(waiting)


async def visibility(store: PostgresStore) -> tuple[int, int]:
    async with store.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT relallvisible, relpages FROM pg_class "
                                  "WHERE oid = 'storage_messages'::regclass")
    return row["relallvisible"], row["relpages"]


# -- the binary COPY rows ---------------------------------------------------------------------------------------------
ODD_SHAPES: list[dict[str, Any]] = [
    {"timestamp": "1000-01-01T00:00:00Z"},  # the earliest storable time: far before PostgreSQL's 2000 epoch
    {"timestamp": "1969-12-31T23:59:59.999999Z", "analysis": {"sentiment": "", "topics": []}},
    {"timestamp": "1999-12-31T23:59:59.999999Z", "analysis": {"sentiment": None, "topics": None}},
    {"timestamp": "2000-01-01T00:00:00.000001Z", "analysis": None},
    {"timestamp": "9999-12-31T23:59:59.999999Z", "content_length": 2**63 - 1, "attachments": 2**63 - 1},
    {"analysis": {"sentiment": "日本語 😀", "topics": ["é", "\U0010ffff", "x" * 300, "music", "music"]}},
    {"analysis": {"topics": ["'); DROP TABLE storage_messages; --", "$1 $$ %s", "line\nbreak\ttab"]}},
    {"analysis": {"sentiment": "positive", "score": 0.25, "labels": {"a": [1, None]}}},
    {"analysis": {"topics": ["a"]}, "content": "héllo ✨ \"quoted\"", "edited": True, "embeds": [{"n": 1}]},
    {"channel_id": 2**64 - 1, "author_id": 2**63, "reactions": 0},  # shifted: the largest bigint, and zero
    {"channel_id": 1, "author_id": 2**63 - 1},
]


async def test_copy_rows_store_exactly_what_asyncpg_encoding_stores(pg_store: PostgresStore):
    """The same records through the batch path (our binary COPY rows) and one at a time (asyncpg's INSERT
    parameters) must give identical rows, compared as the server returns them, and read back as recorded."""
    batch = [message(i, **shape) for i, shape in enumerate(ODD_SHAPES, start=1)]
    batch.append(message(12, message_id=2**64 - 1))
    singles = [{**record, "message_id": 1000 + i, "guild_id": OTHER} for i, record in enumerate(batch[:-1])]
    assert await pg_store.record_messages(batch) == len(batch)
    for record in singles:
        assert await pg_store.record_message(record) is True
    async with pg_store.pool.acquire() as conn:
        rows = await conn.fetch(pm._SELECT + " ORDER BY message_id")
    by_guild: dict[int, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_guild.setdefault(row["guild_id"], []).append(tuple(row)[2:])  # all but message_id and guild_id
    copied, inserted = (by_guild[int(g) - pg_schema.ID_SHIFT] for g in (GUILD, OTHER))
    assert copied[:len(ODD_SHAPES)] == inserted
    expected = {r["message_id"]: r for r in normalize_messages(batch)}
    assert {r["message_id"]: r async for r in pg_store.scan_messages(GUILD)} == expected
    async with pg_store.pool.acquire() as conn:  # the server's own reading of the times we encoded
        for record in normalize_messages(batch):
            assert await conn.fetchval(
                "SELECT created_at = $2::text::timestamptz FROM storage_messages WHERE message_id = $1",
                int(record["message_id"]) - pg_schema.ID_SHIFT, record["timestamp"]) is True


async def test_the_last_instant_is_a_time_like_any_other(pg_store: PostgresStore):
    """asyncpg sends Python's datetime.max as 'infinity': neither stored times nor bounds may go that way."""
    last = "9999-12-31T23:59:59.999999Z"
    await pg_store.record_messages([message(1, timestamp=last), message(2, timestamp="9999-12-31T23:59:59.999998Z")])
    assert await pg_store.record_message(message(3, timestamp=last)) is True
    assert await pg_store.update_message(1, {"reactions": 3}) is True
    async with pg_store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT bool_and(isfinite(created_at)) FROM storage_messages") is True
    assert await pg_store.message_counts(GUILD, since=last) == 2
    assert await pg_store.message_counts(GUILD, until=last) == 1
    assert await pg_store.message_counts(GUILD, by="day", since=datetime.max) == {"9999-12-31": 2}
    assert await pg_store.last_activity(GUILD, message(1)["author_id"]) == last
    assert await pg_store.prune_messages(last) == 1
    assert await pg_store.message_counts(GUILD) == 2


async def test_a_bad_counter_late_in_a_large_batch_writes_nothing(pg_store: PostgresStore):
    batch = [message(i) for i in range(1, 6001)]
    batch[5500]["attachments"] = 2**63  # in the third COPY chunk: the first two were sent already
    with pytest.raises(storage.ValidationError) as info:
        await pg_store.record_messages(batch)
    assert info.value.field == "attachments"
    assert await pg_store.message_counts(GUILD) == 0
    assert await pg_store.record_messages(batch[:5500]) == 5500


async def test_large_batches_crossing_in_opposite_orders_count_each_message_once(pg_config: StoreConfig):
    """Big batches stream chunk by chunk, each chunk in id order but the chunks in the caller's order: two batches
    sharing ids in opposite orders meet each other's uncommitted or committed ids (or deadlock, see below)."""
    up = [message(i) for i in range(1, 4001)]
    down = [message(i) for i in range(6000, 2000, -1)]
    stores = [await storage.open_store(config=pg_config) for _ in range(2)]
    try:
        counts = await asyncio.gather(stores[0].record_messages(up), stores[1].record_messages(down))
        assert sum(counts) == 6000
        assert await stores[0].message_counts(GUILD) == 6000
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_copy_that_deadlocks_goes_through_the_merge(pg_store: PostgresStore, pg_dsn: str):
    """A real deadlock: another transaction holds id 3500 uncommitted, the batch's COPY waits for it holding ids
    1-3499, then the other transaction asks for id 10. PostgreSQL fails the COPY (whose wait began first, so its
    deadlock check runs first); the batch must then be merged, counting only the ids that are new."""
    first, stuck = normalize_messages([message(3500), message(10)])
    other = await asyncpg.connect(pg_dsn)
    try:
        # The COPY's deadlock check must be the one that runs (1 s after its wait began, the server's default):
        # this session checks only after 60 s (under load, its own check had sometimes run first and failed it).
        await other.execute("SET deadlock_timeout = '60s'")
        tx = other.transaction()
        await tx.start()
        await other.execute(pm._INSERT_ONE, *pm.to_row(first))
        ingest = asyncio.ensure_future(pg_store.record_messages([message(i) for i in range(1, 4001)]))
        # until the COPY waits for the other transaction's lock on id 3500
        assert await lock_waits(other, ingest, "COPY%") == 1, "the COPY never waited for the other transaction"
        await other.execute(pm._INSERT_ONE, *pm.to_row(stuck))  # the cycle; the COPY is the one cancelled
        await tx.commit()
        assert await ingest == 3998
    finally:
        await other.close()
    assert await pg_store.message_counts(GUILD) == 4000


async def test_a_scan_in_an_exported_snapshot_reads_the_transactions_instant(pg_store: PostgresStore,
                                                                             pg_config: StoreConfig):
    """What backups use: messages read on another connection, in the snapshot of the documents' transaction."""
    await pg_store.record_messages([message(i) for i in range(1, 11)])
    other = await storage.open_store(config=pg_config)
    try:
        async with pg_store.transaction() as tx:
            await tx.pin_snapshot()
            assert tx.snapshot_id
            assert await other.record_messages([message(i) for i in range(11, 21)]) == 10  # committed meanwhile
            in_snapshot = [r["message_id"] async for r in pg_store._scan_messages(snapshot=tx.snapshot_id)]
            now = [r["message_id"] async for r in pg_store._scan_messages()]
        assert sorted(map(int, in_snapshot)) == list(range(1, 11))
        assert sorted(map(int, now)) == list(range(1, 21))
    finally:
        await other.close()
    with pytest.raises(storage.ValidationError):
        async for _ in pg_store._scan_messages(snapshot="1'; DROP TABLE storage_messages; --"):
            pass
    assert await pg_store.message_counts(GUILD) == 20


async def test_resent_and_overlapping_large_batches_count_only_new_ids(pg_store: PostgresStore):
    first = [message(i) for i in range(1001, 2501)]
    assert await pg_store.record_messages(first) == 1500
    assert await pg_store.record_messages(first) == 0  # resent: its first id is stored, straight to the merge
    assert await pg_store.record_messages([message(i, content_length=7) for i in range(1, 4001)]) == 2500  # middle
    assert await pg_store.record_messages([message(i, content_length=8) for i in range(3001, 5001)]) == 1000  # first
    assert await pg_store.message_counts(GUILD) == 5000
    stored = {r["message_id"]: r["content_length"] async for r in pg_store.scan_messages(GUILD)}
    assert (stored["1000"], stored["1001"], stored["2501"], stored["4000"], stored["4001"]) == (7, 1001 % 400, 7, 7, 8)


async def test_record_messages_encodes_small_chunks_a_loop_step_each(pg_store: PostgresStore,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """``record_messages`` checks and encodes COPY_CHUNK records per loop step (a timer's waiter waits through
    about three steps: 1,000 records a step made gaps of 14-17 ms of CPU); a list and an iterator of the same
    records store the same, and either, sent again, goes through the merge and counts nothing new."""
    chunks: list[int] = []
    real = pm.checked_rows

    def counted(*args: Any) -> Any:
        for chunk in real(*args):
            chunks.append(len(chunk))
            yield chunk

    monkeypatch.setattr(pm, "checked_rows", counted)
    batch = [message(i) for i in range(1, 3001)]
    recorded, turns = await turns_during(pg_store.record_messages(batch))
    assert recorded == 3000
    assert max(chunks) == pm.COPY_CHUNK and sum(chunks) == 3000
    assert turns >= 3000 // pm.COPY_CHUNK - 1
    assert await pg_store.record_messages(iter(batch)) == 0  # type: ignore[arg-type]
    assert await pg_store.record_messages(batch) == 0
    more = (message(i) for i in range(2001, 4001))
    assert await pg_store.record_messages(more) == 1000  # type: ignore[arg-type]
    assert await pg_store.message_counts(GUILD) == 4000


# -- schema version 1 -> 2 -----------------------------------------------------------------------------------------
async def make_version_1(dsn: str, records: list[dict[str, Any]]) -> None:
    """What the previous release left behind: its tables and indexes, version 1, and some messages."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(pg_schema._CREATE_V1)
        await conn.execute("INSERT INTO storage_meta (name, value) VALUES ('schema_version', '1')")
        await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=lambda v: b"\x01" + v,
                                  decoder=lambda b: b[1:], format="binary")
        rows = [pm.to_row(r) for r in normalize_messages(records)]  # times as datetimes, as version 1 sent them
        await conn.copy_records_to_table("storage_messages", columns=pm.COLUMNS, records=[
            (*row[:4], datetime.fromisoformat(row[4].replace("Z", "+00:00")), *row[5:]) for row in rows])
    finally:
        await conn.close()


async def indexes(store: PostgresStore) -> set[str]:
    async with store.pool.acquire() as conn:
        rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'storage_messages' "
                                "AND schemaname = current_schema()")
    return {row[0] for row in rows}


async def test_a_version_1_database_is_upgraded_in_place(pg_config: StoreConfig):
    old = [message(i) for i in range(1, 301)] + [message(i, guild=OTHER, content="kept") for i in range(301, 331)]
    old[-1]["timestamp"] = "9999-12-31T23:59:59.999999Z"  # stored as 'infinity' by version 1, repaired by 2
    await make_version_1(pg_config.dsn, old)
    stores = await asyncio.gather(*(PostgresStore.open(pg_config) for _ in range(4)))  # racing to upgrade
    try:
        store = stores[0]
        async with store.pool.acquire() as conn:
            version = await conn.fetchval("SELECT value FROM storage_meta WHERE name = 'schema_version'")
            assert version == str(pg_schema.SCHEMA_VERSION)
            assert await conn.fetchval("SELECT bool_and(isfinite(created_at)) FROM storage_messages") is True
        assert await indexes(store) == {"storage_messages_pkey", "storage_messages_guild_time_covering",
                                        "storage_messages_time_brin"}
        assert {r["message_id"]: r async for r in store.scan_messages()} == {
            r["message_id"]: r for r in normalize_messages(old)}
        assert await store.message_counts(GUILD) == 300
        assert await store.record_messages([message(i) for i in range(295, 341)]) == 10  # 295-330 are stored
        assert await store.message_counts(GUILD) == 310
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    again = await PostgresStore.open(pg_config)  # already current: opening changes nothing
    try:
        assert await again.message_counts(OTHER) == 30
        assert await again.last_activity(OTHER, old[-1]["author_id"]) == "9999-12-31T23:59:59.999999Z"
        assert await again.message_counts(OTHER, until="9999-12-31T23:59:59.999999Z") == 29  # half-open
    finally:
        await again.close()


async def test_a_fresh_database_gets_only_the_current_indexes(pg_store: PostgresStore):
    assert await indexes(pg_store) == {"storage_messages_pkey", "storage_messages_guild_time_covering",
                                    "storage_messages_time_brin"}
    async with pg_store.pool.acquire() as conn:  # the store's own vacuums skip index work: autovacuum summarizes
        assert await conn.fetchval("SELECT reloptions FROM pg_class WHERE oid = 'storage_messages_time_brin'::regclass"
                                   ) == ["autosummarize=on"]


# -- the visibility map ------------------------------------------------------------------------------------------
async def test_ingest_and_prune_keep_the_visibility_map_current(pg_store: PostgresStore):
    per_batch = PostgresStore.VACUUM_AFTER_ROWS // 4
    for start in range(0, PostgresStore.VACUUM_AFTER_ROWS, per_batch):
        await pg_store.record_messages([message(i) for i in range(start + 1, start + per_batch + 1)])
    visible, pages = await visibility(pg_store)
    assert pages > 10 and visible == pages
    async with pg_store.pool.acquire() as conn:  # our VACUUM, not autovacuum's (before 15, statistics lag a little)
        for _ in range(50):
            if await conn.fetchval("SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables "
                                   "WHERE relid = 'storage_messages'::regclass"):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the store did not vacuum storage_messages")
    cut = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=37 * 6000)
    assert await pg_store.prune_messages(cut) == 5999
    visible, pages = await visibility(pg_store)
    assert visible == pages
    assert await pg_store.message_counts(GUILD) == PostgresStore.VACUUM_AFTER_ROWS - 5999


async def test_every_query_is_an_index_only_scan(pg_config: StoreConfig):
    store = await EagerVacuumStore.open(pg_config)
    try:
        await store.record_messages([message(i, guild=[GUILD, OTHER][i % 2]) for i in range(1, 3001)])
        assert (await visibility(store))[0] > 0
        since, until = datetime(2024, 1, 3, tzinfo=UTC), datetime(2024, 1, 20, tzinfo=UTC)
        templates = {
            "count": pm._COUNT, "by channel": pm._BY_COLUMN.format(column="channel_id"),
            "by author": pm._BY_COLUMN.format(column="author_id"), "by day": pm._BY_DAY_BIN,
            "by day (before 14)": pm._BY_DAY_ZONE, "top authors": pm._TOP_COLUMN.format(column="author_id"),
            "top channels": pm._TOP_COLUMN.format(column="channel_id"), "top topics": pm._TOP_TOPICS,
            "sentiments": pm._SENTIMENTS, "last activity": pm._LAST_ACTIVITY,
        }
        async with store.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")  # a tiny table: make the planner use an index,
            await conn.execute("SET LOCAL enable_bitmapscan = off")  # then an uncovered column shows as heap reads
            for bounds in ((None, None), (since, until)):
                args: list[Any] = []
                where = pm._where(GUILD, *bounds, args)
                for name, template in templates.items():
                    query = template.format(f"${len(args) + 1}", where=where)
                    params = [*args] + ([] if "{0}" not in template else
                                        [int(AUTHOR) - pg_schema.ID_SHIFT] if "author_id = {0}" in template else [10])
                    plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *params)
                    scans = list(scan_nodes(json.loads(plan)[0]["Plan"]))
                    assert scans, name
                    for node in scans:
                        assert node["Node Type"] == "Index Only Scan", (name, node["Node Type"])
                        assert node["Index Name"] == "storage_messages_guild_time_covering", name
                        assert node["Heap Fetches"] == 0, name
    finally:
        await store.close()


def scan_nodes(plan: dict[str, Any]) -> Any:
    if plan.get("Relation Name") == "storage_messages":
        yield plan
    for child in plan.get("Plans", ()):
        yield from scan_nodes(child)


async def test_day_bins_agree_with_the_time_zone_form_in_any_session_zone(pg_store: PostgresStore):
    times = ["1000-01-01T00:00:00Z", "1969-12-31T23:59:59.999999Z", "1970-01-01T00:00:00Z", "1999-12-31T00:00:00Z",
             "2000-01-01T00:00:00Z", "2024-02-29T23:59:59.999999Z", "2024-03-01T00:00:00Z", "9999-12-31T23:59:59Z"]
    await pg_store.record_messages([message(i, timestamp=ts) for i, ts in enumerate(times, start=1)])
    expected = {ts[:10]: 1 for ts in times}
    assert await pg_store.message_counts(GUILD, by="day") == expected
    args: list[Any] = []
    where = pm._where(GUILD, None, None, args)
    async with pg_store.pool.acquire() as conn:
        await conn.execute("SET TIME ZONE 'Pacific/Kiritimati'")  # UTC+14: a session zone must not move days
        try:
            for template in (pm._BY_DAY_BIN, pm._BY_DAY_ZONE):
                rows = await conn.fetch(template.format(where=where), *args)
                assert {row[0].isoformat(): row[1] for row in rows} == expected
        finally:
            await conn.execute("RESET TIME ZONE")


# -- exact answers from the index --------------------------------------------------------------------------------
async def test_index_only_answers_follow_updates_prunes_and_duplicates(pg_config: StoreConfig):
    store = await EagerVacuumStore.open(pg_config)
    try:
        rnd = random.Random(77)
        ref = Reference()
        await record_stream(store, ref, rnd, random_stream(77, 600))
        assert (await visibility(store))[0] > 0  # vacuumed: the queries below read the index alone
        for mid in rnd.sample(sorted(ref.messages), 80):
            sentiment, topics = rnd.choice(["positive", "angry", None]), rnd.choice([None, [], ["gaming", "new"]])
            assert await store.update_message(mid, {"analysis": {"sentiment": sentiment, "topics": topics}})
            ref.messages[mid].update(sentiment=sentiment, topics=topics)
        await record_stream(store, ref, rnd, random_stream(77, 600))  # the same stream again: all duplicates
        cut = sorted(m["dt"] for m in ref.messages.values())[len(ref.messages) // 3]
        pruned = [k for k, m in ref.messages.items() if m["dt"] < cut]
        assert await store.prune_messages(cut) == len(pruned)
        for key in pruned:
            del ref.messages[key]
        for since, until in windows(rnd, ref):
            await assert_queries_match(store, ref, since, until)
    finally:
        await store.close()


async def test_concurrent_ingest_with_vacuums_counts_each_message_once(pg_config: StoreConfig):
    stores = [await EagerVacuumStore.open(pg_config) for _ in range(3)]
    try:
        rnd = random.Random(3)
        batches = []
        for n in range(3):  # overlapping ranges, shuffled, in batches that cross the vacuum threshold
            ids = list(range(1 + n * 700, 1401 + n * 700))
            rnd.shuffle(ids)
            batches.append([[message(i) for i in ids[k:k + 150]] for k in range(0, len(ids), 150)])

        async def ingest(s: PostgresStore, parts: list[list[dict[str, Any]]]) -> int:
            return sum([await s.record_messages(part) for part in parts])

        counts = await asyncio.gather(*(ingest(s, b) for s, b in zip(stores, batches)))
        assert sum(counts) == 2800
        assert await stores[0].message_counts(GUILD) == 2800
        assert sum((await stores[1].message_counts(GUILD, by="day")).values()) == 2800
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_the_sql_queries_match_the_python_ones(pg_store: PostgresStore):
    """Each SQL primitive against the JSON backend's Python one (over column blocks of the same records)."""
    ref = Reference()
    await record_stream(pg_store, ref, random.Random(8), random_stream(8, 300))

    for guild in GUILDS:
        for since, until in [(None, None), (datetime(2023, 12, 1, tzinfo=UTC), datetime(2024, 1, 15, tzinfo=UTC))]:

            def blocks(guild: str = guild, since: Any = since, until: Any = until) -> AsyncIterator[Any]:
                return columns_of(pg_store.scan_messages(guild, since, until), size=50)

            assert await pg_store._count_messages(guild, since, until) == await message_queries.count(blocks()) \
                == len(ref.select(guild, since, until))
            for by in ("channel", "author", "day", "sentiment"):
                assert await pg_store._group_messages(by, guild, since, until) == \
                    await message_queries.group(blocks(), by)
            for column in ("author", "channel", "topic"):
                for limit in (0, 2, 100):
                    assert await pg_store._top_messages(column, guild, limit, since, until) == \
                        await message_queries.top(blocks(), column, limit)
            for author in [*AUTHORS, "12345"]:
                assert await pg_store._last_message(guild, author, since, until) == \
                    await message_queries.last(blocks(), author)


async def python_refresh(store: PostgresStore, guild: Any, since: Any = None, until: Any = None) -> int:
    """The JSON backend's ``refresh_member_statistics`` (Python, over column blocks), run on the PostgreSQL store."""
    checked = snowflake(guild, "guild_id")
    return await message_queries.refresh_statistics(store.transaction, "members", checked,
                                                    columns_of(store.scan_messages(checked, since, until)))


# -- refresh_member_statistics in SQL ------------------------------------------------------------------------------
# message_count and last_active values an existing member may hold (``None`` here: the field is absent); "right"
# and "right, another way" (equal in Python: 3.0 and 3, True and 1) are filled in per author.
RIGHT, RIGHT_AS_FLOAT = object(), object()
ODD_COUNTS: list[Any] = [RIGHT, RIGHT, RIGHT_AS_FLOAT, None, 0, 0.0, -0.0, 1, True, False, 2.5, "3", [3], 5e-324,
                         1e16, 2**64 - 1, -(2**63)]
ODD_LAST: list[Any] = [RIGHT, RIGHT, RIGHT_AS_FLOAT, None, "2024-01-01T00:00:00Z", "2024-01-01T00:00:00+00:00", 0]
MEMBER_USERS = [*AUTHORS, "0", "12345", "18446744073709551615"]  # some with messages, some without
NOT_MEMBER_SUFFIXES = ["abc", "007", "18446744073709551616", "99999999999999999999", "100000000000000000000", "",
                       "1 ", "١٢", "_5", "5_", "5\n"]


def member_docs(rnd: random.Random, ref: Reference) -> dict[str, dict[str, Any]]:
    """Member documents of every shape for the guilds of the random streams (and keys that are not members)."""
    docs: dict[str, dict[str, Any]] = {}
    for guild in [*GUILDS, "77", "424242"]:
        mine = ref.select(guild)
        for user in MEMBER_USERS:
            times = [m["dt"] for m in mine if m["author"] == user]
            right = (len(times), canonical(max(times)) if times else None)
            shape = rnd.randrange(6)
            if shape == 0:
                continue  # no document: created when the user has messages
            doc: dict[str, Any] = {"roles": ["mod"], "preferences": {"dm": rnd.random() < 0.5}, "xp": 1.5}
            if shape == 1:
                doc["user_id"] = user
            elif shape == 2:
                doc["statistics"] = None
            elif shape >= 3:
                stats: dict[str, Any] = {"voice_minutes": rnd.randrange(100)} if rnd.random() < 0.5 else {}
                for name, odd, value in (("message_count", ODD_COUNTS, right[0]), ("last_active", ODD_LAST, right[1])):
                    pick = rnd.choice(odd)
                    if pick is RIGHT or (pick is RIGHT_AS_FLOAT and value is None):
                        stats[name] = value
                    elif pick is RIGHT_AS_FLOAT:
                        stats[name] = float(value) if name == "message_count" else value[:19] + "+00:00"
                    elif pick is not None:
                        stats[name] = pick
                doc["statistics"] = stats
            docs[f"{guild}_{user}"] = doc
        for suffix in NOT_MEMBER_SUFFIXES:
            docs[f"{guild}_{suffix}"] = {"statistics": "not a member: never looked at"}
    docs["7"] = {"note": "the guild id alone"}
    return docs


async def member_texts(store: PostgresStore) -> dict[str, str]:
    """Every member document as jsonb text (which tells 1 from 1.0 and true, unlike ``==`` on decoded dicts)."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch("SELECT key, doc::text FROM storage_documents WHERE collection = 'members'")
    return dict(rows)


async def restore_members(store: PostgresStore, texts: dict[str, str]) -> None:
    async with store.pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM storage_documents WHERE collection = 'members'")
        await conn.executemany("INSERT INTO storage_documents (collection, key, doc) "
                               "VALUES ('members', $1, $2::text::jsonb)", list(texts.items()))


async def refreshed_both_ways(store: PostgresStore, guild: Any, **bounds: Any) -> tuple[int, dict[str, str]]:
    """The Python version and the SQL one from the same documents: what each returns and leaves behind."""
    before = await member_texts(store)
    generic = await python_refresh(store, guild, **bounds)
    after_generic = await member_texts(store)
    await restore_members(store, before)
    mine = await store.refresh_member_statistics(guild, **bounds)
    after = await member_texts(store)
    assert (mine, after) == (generic, after_generic), (guild, bounds)
    return mine, after


@pytest.mark.parametrize("seed", [41, 42, 43])
async def test_refresh_in_sql_matches_the_generic_version(pg_store: PostgresStore, seed: int):
    """Random messages and member documents of every shape; every guild (20-digit ids too) and window. The SQL
    version must return the same count and leave byte-identical documents (as jsonb text) to the generic one."""
    rnd = random.Random(seed)
    ref = Reference()
    await record_stream(pg_store, ref, rnd, random_stream(seed, 300))
    await pg_store._put_stored("members", member_docs(rnd, ref))  # odd members, as older versions stored them
    initial = await member_texts(pg_store)
    total = 0
    for since, until in windows(rnd, ref):
        for guild in [*GUILDS, 77, "424242"]:
            await restore_members(pg_store, initial)
            written, after = await refreshed_both_ways(pg_store, guild, since=since, until=until)
            assert {k for k in after if after[k] != initial.get(k)} <= {f"{guild}_{u}" for u in MEMBER_USERS}
            assert await pg_store.refresh_member_statistics(guild, since=since, until=until) == 0  # nothing left
            total += written
    assert total > 100


async def test_refresh_in_sql_agrees_on_edge_times_in_any_session_zone(pg_store: PostgresStore):
    """Canonical text of last_active from the server's clock: years below 1000, the last instant, fractions that
    are and are not whole, whatever the session's time zone (the statement is also run on a connection set to
    two odd zones)."""
    times = ["0005-01-02T03:04:05.000007Z", "0999-12-31T23:59:59Z", "1969-12-31T23:59:59.999999Z",
             "2000-01-01T00:00:00Z", "2024-02-29T23:59:59.5Z", "2024-03-01T00:00:00.000001Z",
             "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:58Z"]
    await pg_store.record_messages([message(i, author_id=1000 + i // 2, timestamp=ts)
                                    for i, ts in enumerate(times)])
    written, after = await refreshed_both_ways(pg_store, GUILD)
    assert written == 4
    last = {key: json.loads(text)["statistics"]["last_active"] for key, text in after.items()}
    assert last == {f"{GUILD}_{1000 + i}": max(times[2 * i:2 * i + 2], key=to_utc) for i in range(4)}
    for zone in ("Pacific/Kiritimati", "America/St_Johns"):
        await restore_members(pg_store, {})
        args = pg_member_stats.member_parameters("members", GUILD)
        where = pm._where(GUILD, None, None, args)
        async with pg_store.pool.acquire() as conn:
            await conn.execute(f"SET TIME ZONE '{zone}'")
            try:
                async with conn.transaction():
                    now = datetime.now(timezone.utc)
                    assert len(await pg_member_stats.refresh(conn, "members", where, args, now)) == 4
            finally:
                await conn.execute("RESET TIME ZONE")
        assert await member_texts(pg_store) == after


def to_utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_refresh_in_sql_refuses_a_malformed_member_like_the_generic_version(pg_store: PostgresStore):
    await pg_store.record_messages([message(i) for i in range(1, 30)])
    good = {f"{GUILD}_{100 + i}": {"statistics": {"message_count": 1}} for i in range(7)}
    for bad in ("lots", 3, 2.5, True, [1]):
        docs = {**good, f"{GUILD}_104": {"statistics": bad}, f"{GUILD}_106": {"statistics": {"x": 1}},
                f"{GUILD}_105": {"statistics": ["later in key order"]}, f"{GUILD}_x": {"statistics": "no member"}}
        await restore_members(pg_store, {})
        await pg_store._put_stored("members", docs)  # as an older version stored them (storage/rules.py)
        before = await member_texts(pg_store)
        errors = []
        for refresh in (lambda: python_refresh(pg_store, GUILD),
                        lambda: pg_store.refresh_member_statistics(GUILD)):
            with pytest.raises(storage.ValidationError) as info:
                await refresh()
            errors.append((str(info.value), info.value.field))
            assert await member_texts(pg_store) == before
        assert errors[0] == errors[1]
        assert errors[1] == (f"members/{GUILD}_104: statistics is a {type(bad).__name__}, not an object; nothing was "
                             "written", "statistics")


async def test_refresh_in_sql_drops_what_the_cache_holds(pg_config: StoreConfig):
    store = await PostgresStore.open(StoreConfig(backend="postgres", dsn=pg_config.dsn, cache_ttl=60,
                                                 source="tests"))
    try:
        await store.save_member_data(100, GUILD, {"roles": ["a"], "statistics": {"message_count": 9}})
        await store.save_member_data(101, GUILD, {"roles": ["b"]})
        await store.save_member_data(103, GUILD, {"statistics": {"message_count": 0, "last_active": None}})
        for user in (100, 101, 102, 103):  # cached (or, for 102, known absent: absence is never cached)
            await store.get_member_data(user, GUILD)
        assert len(store._cache) == 3
        await store.record_messages([message(7), message(8), message(9)])  # authors 100, 101 and 102
        assert await store.refresh_member_statistics(GUILD) == 3  # 100 and 101 updated, 102 created
        assert len(store._cache) == 1  # 103 did not change: its entry stays
        assert await store.get_member_data(100, GUILD) == {
            "roles": ["a"], "statistics": {"message_count": 1, "last_active": "2024-01-01T04:19:00Z"}}
        assert await store.get_member_data(101, GUILD) == {
            "roles": ["b"], "statistics": {"message_count": 1, "last_active": "2024-01-01T04:56:00Z"}}
        assert (await store.get_member_data(102, GUILD))["statistics"]["message_count"] == 1
    finally:
        await store.close()


async def test_refresh_in_sql_keeps_a_concurrent_change_to_a_member(pg_store: PostgresStore, pg_dsn: str):
    """Another process changes a member (uncommitted) while the refresh runs: the refresh waits for its row lock,
    then merges the statistics into the document as committed, instead of writing back what it read before
    (which is what ``put_many`` of the generic version's snapshot would do)."""
    await pg_store.save_member_data(100, GUILD, {"xp": 1, "statistics": {"message_count": 5, "voice": 2}})
    await pg_store.record_messages([message(7), message(14)])  # author 100
    other = await asyncpg.connect(pg_dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("UPDATE storage_documents SET doc = doc || '{\"xp\": 2}' WHERE key = $1", f"{GUILD}_100")
        refresh = asyncio.ensure_future(pg_store.refresh_member_statistics(GUILD))
        # until the refresh waits for the other transaction's row lock
        assert await lock_waits(other, refresh, "%WITH agg AS%") == 1, "the refresh never waited for the other one"
        await tx.commit()
        assert await refresh == 1
    finally:
        await other.close()
    assert await pg_store.get_member_data(100, GUILD) == {
        "xp": 2, "statistics": {"message_count": 2, "voice": 2, "last_active": message(14)["timestamp"]
                                .replace("+00:00", "Z")}}


async def test_refresh_in_sql_counts_from_the_covering_index_alone(pg_config: StoreConfig):
    store = await EagerVacuumStore.open(pg_config)
    try:
        await store.record_messages([message(i, guild=[GUILD, OTHER][i % 2]) for i in range(1, 3001)])
        await store.save_member_data(101, GUILD, {"roles": []})
        since, until = datetime(2024, 1, 3, tzinfo=UTC), datetime(2024, 1, 20, tzinfo=UTC)
        async with store.pool.acquire() as conn:
            for bounds in ((None, None), (since, until)):
                args = pg_member_stats.member_parameters("members", GUILD)
                where = pm._where(GUILD, *bounds, args)
                tx = conn.transaction()  # ANALYZE runs the statement: rolled back below
                await tx.start()
                try:
                    await conn.execute("SET LOCAL enable_seqscan = off")
                    await conn.execute("SET LOCAL enable_bitmapscan = off")
                    plan = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) "
                                               + pg_member_stats.refresh_statement(where, args), *args,
                                               datetime.now(UTC))
                finally:
                    await tx.rollback()
                scans = list(scan_nodes(json.loads(plan)[0]["Plan"]))
                assert len(scans) == 1
                assert scans[0]["Node Type"] == "Index Only Scan"
                assert scans[0]["Index Name"] == "storage_messages_guild_time_covering"
                assert scans[0]["Heap Fetches"] == 0
        assert await store.get_member_data(101, GUILD) == {"roles": []}  # the plans wrote nothing
    finally:
        await store.close()
