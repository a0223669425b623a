"""The PostgreSQL message table beyond the conformance tests (which compare every query to a reference).

What is specific to this backend's speed work: the binary ``COPY`` rows built in Python must store exactly what
asyncpg's own encoding stores; a database made by schema version 1 is upgraded in place; the visibility map is kept
current by ingest and prune (index-only scans depend on it); every query is answered from the covering index
alone; and index-only answers stay exact after updates, prunes and concurrent ingest.
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
from storage.analytics import AnalyticsMixin, normalize_messages
from storage.backends import pg_messages as pm
from storage.backends import pg_schema
from storage.backends.postgres import PostgresStore
from tests.test_analytics import GUILDS, Reference, assert_queries_match, random_stream, record_stream, windows

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
    assert {r["message_id"]: r async for r in pg_store._scan_messages(GUILD)} == expected
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
        tx = other.transaction()
        await tx.start()
        await other.execute(pm._INSERT_ONE, *pm.to_row(first))
        ingest = asyncio.ensure_future(pg_store.record_messages([message(i) for i in range(1, 4001)]))
        for _ in range(250):  # until the COPY waits for the other transaction's lock on id 3500
            await other.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees its first snapshot
            waiting = await other.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND query LIKE 'COPY%'")
            if waiting or ingest.done():
                break
            await asyncio.sleep(0.02)
        assert waiting == 1, "the COPY never waited for the other transaction"
        await other.execute(pm._INSERT_ONE, *pm.to_row(stuck))  # the cycle; the COPY is the one cancelled
        await tx.commit()
        assert await ingest == 3998
    finally:
        await other.close()
    assert await pg_store.message_counts(GUILD) == 4000


async def test_resent_and_overlapping_large_batches_count_only_new_ids(pg_store: PostgresStore):
    first = [message(i) for i in range(1001, 2501)]
    assert await pg_store.record_messages(first) == 1500
    assert await pg_store.record_messages(first) == 0  # resent: its first id is stored, straight to the merge
    assert await pg_store.record_messages([message(i, content_length=7) for i in range(1, 4001)]) == 2500  # middle
    assert await pg_store.record_messages([message(i, content_length=8) for i in range(3001, 5001)]) == 1000  # first
    assert await pg_store.message_counts(GUILD) == 5000
    stored = {r["message_id"]: r["content_length"] async for r in pg_store._scan_messages(GUILD)}
    assert (stored["1000"], stored["1001"], stored["2501"], stored["4000"], stored["4001"]) == (7, 1001 % 400, 7, 7, 8)


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
            assert await conn.fetchval("SELECT value FROM storage_meta WHERE name = 'schema_version'") == "2"
            assert await conn.fetchval("SELECT bool_and(isfinite(created_at)) FROM storage_messages") is True
        assert await indexes(store) == {"storage_messages_pkey", "storage_messages_guild_time_covering",
                                        "storage_messages_time_brin"}
        assert {r["message_id"]: r async for r in store._scan_messages()} == {
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
            "columns scan": pm._SELECT_COLUMNS + "{where}",
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


async def test_the_column_scan_matches_the_generic_one(pg_store: PostgresStore):
    ref = Reference()
    await record_stream(pg_store, ref, random.Random(8), random_stream(8, 300))
    for guild in GUILDS:
        for since, until in [(None, None), (datetime(2023, 12, 1, tzinfo=UTC), datetime(2024, 1, 15, tzinfo=UTC))]:
            mine = await columns(pg_store._scan_message_columns(guild, since, until))
            generic = await columns(AnalyticsMixin._scan_message_columns(pg_store, guild, since, until))
            assert mine == generic and len(mine) == len(ref.select(guild, since, until))


async def columns(blocks: AsyncIterator[Any]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    async for block in blocks:
        rows.extend(zip(block.micros, block.authors, block.channels, block.sentiments, block.topics))
    return sorted(rows, key=repr)
