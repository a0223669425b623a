"""Expiring documents (``put(..., ttl=)``/``expires_at=``) on both backends, measured by a controllable clock.

The clock is injected through ``StoreConfig.clock`` (never by patching ``time``): both backends read "now" from it,
PostgreSQL as a parameter of its statements, so every instant here is exact and the tests never sleep.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import storage
from storage import StoreConfig, ValidationError
from storage.backends.json.indexes import build_indexes
from storage.backends.postgres import schema as pg_schema
from storage.backup.copy import copy
from storage.expiry import to_micros
from storage.stores import PostgresStore

T0 = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        """Set the time to ``T0 + seconds``."""
        self.now = T0 + timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def clocked_config(store_config: StoreConfig, clock: Clock) -> StoreConfig:
    return dataclasses.replace(store_config, clock=clock)


@pytest.fixture
async def st(clocked_config: StoreConfig) -> AsyncIterator[Any]:
    s = await storage.open_store(config=clocked_config)
    try:
        yield s
    finally:
        await s.close()


async def visible_everywhere(s: Any, collection: str, key: str) -> bool:
    """Whether every read agrees that the document is there (True) or absent (False); fails if they disagree."""
    views = [
        await s.get(collection, key) is not None,
        key in await s.get_many(collection, [key]),
        key in [k async for k, _ in s.items(collection)],
        key in [k async for k, _ in s.items(collection, prefix=key[:1])],
    ]
    assert len(set(views)) == 1, views
    return views[0]


async def test_a_document_expires_at_its_instant_and_reads_as_absent_everywhere(st, clock):
    await st.put("cooldowns", "a", {"cmd": "daily"}, ttl=30)
    await st.put("cooldowns", "b", {"cmd": "weekly"}, expires_at=T0 + timedelta(seconds=60))
    await st.put("cooldowns", "keep", {"cmd": "none"})
    clock.at(29.999999)
    assert await visible_everywhere(st, "cooldowns", "a")
    assert await st.count("cooldowns") == 3
    clock.at(30)  # the instant itself: gone
    assert not await visible_everywhere(st, "cooldowns", "a")
    assert await st.get("cooldowns", "a", "dflt") == "dflt"
    assert await st.count("cooldowns") == 2
    assert await st.delete("cooldowns", "a") is False  # absent: nothing to delete
    # update treats it as absent: fn gets the default, and the result is permanent (no ttl given)
    assert await st.update("cooldowns", "a", lambda d: {**d, "n": d.get("n", 0) + 1}, {"n": 10}) == {"n": 11}
    clock.at(10_000)
    assert await st.get("cooldowns", "a") == {"n": 11}
    assert not await visible_everywhere(st, "cooldowns", "b")
    assert [k async for k, _ in st.items("cooldowns")] == ["a", "keep"]
    assert await st.collections() == ["cooldowns"]


async def test_a_collection_of_expired_documents_is_not_listed(st, clock):
    await st.put("reminders", "r1", {"text": "hi"}, ttl=5)
    assert await st.collections() == ["reminders"]
    clock.at(5)
    assert await st.collections() == []
    assert await st.count("reminders") == 0


async def test_ttl_on_other_writes_is_explicit(st, clock):
    await st.put("mutes", "u1", {"v": 1}, ttl=10)
    await st.put("mutes", "u1", {"v": 2})  # a put without ttl: permanent again
    await st.put("mutes", "u2", {"v": 1}, ttl=10)
    await st.update("mutes", "u2", lambda d: {**d, "v": 2})  # so is an update without ttl
    await st.put("mutes", "u3", {"v": 1}, ttl=10)
    clock.at(5)
    await st.update("mutes", "u3", lambda d: {**d, "v": 2}, ttl=10)  # counted from the update: T0 + 15
    await st.put("mutes", "u4", {"v": 1})
    await st.put("mutes", "u4", {"v": 2}, ttl=1)  # a permanent document can become an expiring one
    clock.at(14.9)
    assert {k: d["v"] async for k, d in st.items("mutes")} == {"u1": 2, "u2": 2, "u3": 2}
    clock.at(15)
    assert {k: d["v"] async for k, d in st.items("mutes")} == {"u1": 2, "u2": 2}


async def test_put_many_gives_the_whole_batch_one_expiry_all_or_nothing(st, clock):
    assert await st.put_many("temp", {"a": {}, "b": {}}, ttl=2.5) == 2
    with pytest.raises(ValidationError):
        await st.put_many("temp", {"c": {}, "d": {"bad": math.nan}}, ttl=100)
    clock.at(2.4)
    assert await st.count("temp") == 2
    clock.at(2.5)
    assert await st.count("temp") == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"ttl": 0}, "ttl"), ({"ttl": -1}, "ttl"), ({"ttl": "5"}, "ttl"), ({"ttl": True}, "ttl"),
    ({"ttl": math.nan}, "ttl"), ({"ttl": math.inf}, "ttl"), ({"ttl": 1e300}, "ttl"),
    ({"ttl": 5, "expires_at": T0}, "ttl"), ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_at": datetime(2030, 1, 1)}, "expires_at"),  # naive: refused, never guessed
])
async def test_bad_expiry_arguments_are_refused_and_write_nothing(st, kwargs, field):
    for write in (lambda: st.put("c", "k", {}, **kwargs), lambda: st.put_many("c", {"k": {}}, **kwargs),
                  lambda: st.update("c", "k", lambda d: d, **kwargs)):
        with pytest.raises(ValidationError) as info:
            await write()
        assert info.value.field == field
    async with st.transaction() as tx:
        with pytest.raises(ValidationError):
            await tx.put("c", "k", {}, **kwargs)
    assert await st.count("c") == 0 and await st.collections() == []


async def test_expiry_in_a_transaction(st, clock):
    await st.put("cd", "old", {"v": 0}, ttl=5)
    async with st.transaction() as tx:
        await tx.put("cd", "a", {"v": 1}, ttl=10)
        await tx.put_many("cd", {"b": {"v": 2}}, ttl=20)
        assert await tx.get("cd", "a") == {"v": 1}
        clock.at(5)
        assert await tx.get("cd", "old") is None  # expired while the transaction runs
        assert await tx.delete("cd", "old") is False
        assert sorted(await tx.get_many("cd", ["a", "b", "old"])) == ["a", "b"]
        assert await tx.count("cd") == 2
        assert await tx._expiries("cd", None) == {"a": T0 + timedelta(seconds=10), "b": T0 + timedelta(seconds=20)}
    assert await st.get("cd", "a") == {"v": 1}
    clock.at(10)
    async with st.transaction() as tx:
        assert [k async for k, _ in tx.items("cd")] == ["b"]
        assert await tx.update("cd", "a", lambda d: {"v": d.get("v", 100) + 1}, ttl=1) == {"v": 101}
    with pytest.raises(RuntimeError):
        async with st.transaction() as tx:
            await tx.put("cd", "c", {"v": 3}, ttl=100)
            raise RuntimeError("rolled back")
    assert await st.get("cd", "c") is None
    assert await st.get("cd", "a") == {"v": 101}
    clock.at(11)
    assert await st.count("cd") == 1


async def test_expiry_survives_reopen_and_compaction_and_is_seen_by_a_second_store(clocked_config, clock):
    first = await storage.open_store(config=clocked_config)
    try:
        await first.put("cd", "a", {"v": 1}, ttl=10)
        await first.put("cd", "b", {"v": 2}, ttl=20)
        await first.put("cd", "p", {"v": 3})
        second = await storage.open_store(config=clocked_config)  # another "process" on the same data
        try:
            assert await second.get("cd", "a") == {"v": 1}
            clock.at(10)
            assert await second.get("cd", "a") is None and await first.get("cd", "a") is None
            await second.put("cd", "c", {"v": 4}, ttl=5)  # T0 + 15
            assert await first.get("cd", "c") == {"v": 4}
        finally:
            await second.close()
    finally:
        await first.close()  # JSON: compacts (purging "a") and writes the expiry sidecar
    clock.at(14)
    again = await storage.open_store(config=clocked_config)
    try:
        assert {k async for k, _ in again.items("cd")} == {"b", "c", "p"}
        clock.at(15)
        assert {k async for k, _ in again.items("cd")} == {"b", "p"}
        clock.at(20)
        assert {k async for k, _ in again.items("cd")} == {"p"}
    finally:
        await again.close()


async def test_purge_removes_what_expired_and_nothing_else(st, clock):
    await st.put_many("cd", {f"k{i}": {"i": i} for i in range(30)}, ttl=10)
    await st.put_many("cd", {f"p{i}": {"i": i} for i in range(5)})
    await st.put("cd", "late", {}, ttl=100)
    assert await st.purge_expired() == 0
    clock.at(10)
    assert await st.purge_expired() == 30
    assert await st.purge_expired() == 0
    assert sorted([k async for k, _ in st.items("cd")]) == sorted([f"p{i}" for i in range(5)] + ["late"])
    assert await st._expiries("cd", None) == {"late": T0 + timedelta(seconds=100)}


async def test_json_files_keep_the_seed_shape_and_expiry_sits_beside_them(clocked_config, clock):
    if clocked_config.backend != "json":
        pytest.skip("the JSON backend's files")
    folder = Path(clocked_config.path)
    s = await storage.open_store(config=clocked_config)
    await s.put("cd", "a", {"v": 1}, ttl=10)
    await s.put("cd", "b", {"v": 2}, expires_at=T0 + timedelta(hours=1))
    await s.put("cd", "p", {"v": 3})
    await s.compact()
    assert json.loads((folder / "cd.json").read_text()) == {"a": {"v": 1}, "b": {"v": 2}, "p": {"v": 3}}
    assert json.loads((folder / "storage.expires.json").read_text()) == {
        "cd": {"a": "2030-01-02T03:04:15.123456Z", "b": "2030-01-02T04:04:05.123456Z"}}
    assert s.owns_entry("storage.expires.json", False) and s.foreign_files() == {}
    clock.at(10)
    await s.close()  # a close compacts when something has expired: "a" leaves the files
    assert json.loads((folder / "cd.json").read_text()) == {"b": {"v": 2}, "p": {"v": 3}}
    assert json.loads((folder / "storage.expires.json").read_text()) == {"cd": {"b": "2030-01-02T04:04:05.123456Z"}}
    with pytest.raises(ValidationError):
        await (await storage.open_store(config=clocked_config)).put("storage.expires", "x", {})
    # a key removed from a snapshot by hand while the store is closed: its expiry entry is simply ignored
    (folder / "cd.json").write_text(json.dumps({"p": {"v": 3}}))
    s = await storage.open_store(config=clocked_config)
    try:
        assert [k async for k, _ in s.items("cd")] == ["p"]
        await s.put("cd", "b", {"v": 5})
        clock.at(10_000)
        assert await s.get("cd", "b") == {"v": 5}
    finally:
        await s.close()


async def test_backups_leave_out_what_expired_and_restore_keeps_each_expiry(st, clock):
    await st.put("cd", "short", {"v": 1}, ttl=10)
    await st.put("cd", "long", {"v": 2}, ttl=100)
    await st.put("cd", "gone", {"v": 3}, ttl=1)
    await st.put("cd", "perm", {"v": 4})
    clock.at(1)
    info = await st.create_backup()
    assert info.counts["cd"] == 3
    assert (await st.verify_backup(info.id)).ok
    await st.put("cd", "long", {"v": 2})  # now permanent: the restore brings its expiry back
    await st.put("cd", "perm", {"v": 4}, ttl=5)  # now expiring: the restore makes it permanent again
    await st.delete("cd", "short")
    await st.restore_backup(info.id)
    assert await st._expiries("cd", None) == {"short": T0 + timedelta(seconds=10),
                                              "long": T0 + timedelta(seconds=100)}
    clock.at(10)  # "short" has expired since the backup: a restore now leaves it out
    await st.restore_backup(info.id)
    assert sorted([k async for k, _ in st.items("cd")]) == ["long", "perm"]
    clock.at(1000)
    assert [k async for k, _ in st.items("cd")] == ["perm"]


async def test_copy_carries_expiry_and_leaves_out_what_expired(st, clock, clocked_config, tmp_path):
    await st.put("cd", "a", {"v": 1}, ttl=10)
    await st.put("cd", "gone", {"v": 1}, ttl=1)
    await st.put("cd", "p", {"v": 2})
    clock.at(1)
    target_config = StoreConfig(backend="json", path=str(tmp_path / "twin"), clock=clock, source="tests")
    async with storage.open_store(config=target_config) as target:
        report = await copy(st, target)
        assert report.counts == {"cd": 2}
        assert await target._expiries("cd", None) == {"a": T0 + timedelta(seconds=10)}
        clock.at(10)
        assert [k async for k, _ in target.items("cd")] == ["p"]


async def test_a_clock_must_give_aware_datetimes(store_config):
    config = dataclasses.replace(store_config, clock=lambda: datetime(2030, 1, 1))
    async with storage.open_store(config=config) as s:
        with pytest.raises(ValidationError):
            await s.put("c", "k", {}, ttl=1)


async def test_a_version_2_postgres_database_gains_the_expiry_column(pg_config: StoreConfig, clock):
    """An existing database of the previous release keeps its documents and gets ``expires_at`` and its index."""
    conn = await asyncpg.connect(pg_config.dsn)
    try:
        await conn.execute(pg_schema._CREATE_V1)
        await conn.execute(pg_schema._V2)
        await conn.execute("INSERT INTO storage_meta (name, value) VALUES ('schema_version', '2')")
        await conn.execute("""INSERT INTO storage_documents (collection, key, doc) VALUES ('cd', 'old', '{"v": 1}')""")
    finally:
        await conn.close()
    s = await PostgresStore.open(dataclasses.replace(pg_config, clock=clock))
    try:
        assert await s.get("cd", "old") == {"v": 1}
        await s.put("cd", "new", {"v": 2}, ttl=1)
        async with s.pool.acquire() as c:
            assert await c.fetchval("SELECT value FROM storage_meta WHERE name = 'schema_version'") == str(
                pg_schema.SCHEMA_VERSION)
            assert await c.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = 'storage_documents_expiring' "
                                    "AND schemaname = current_schema()") is not None
            assert await c.fetchval("SELECT expires_at FROM storage_documents WHERE key = 'new'") == T0 + timedelta(
                seconds=1)
        clock.at(1)
        assert await s.count("cd") == 1
        assert await s.purge_expired() == 1
        async with s.pool.acquire() as c:
            assert await c.fetchval("SELECT count(*) FROM storage_documents") == 1
    finally:
        await s.close()


async def test_postgres_never_caches_an_expiring_document(pg_config: StoreConfig, clock):
    s = await PostgresStore.open(dataclasses.replace(pg_config, clock=clock, cache_ttl=300))
    try:
        await s.put("cd", "a", {"v": 1}, ttl=10)
        assert await s.get("cd", "a") == {"v": 1}
        clock.at(10)
        assert await s.get("cd", "a") is None
    finally:
        await s.close()


def test_a_journal_record_carries_the_expiry_as_canonical_text_and_refuses_a_bad_one():
    from storage.backends.json import journal

    ops = journal._parse_record(b'[["p","cd","b",{"v":2},"2030-01-01T00:00:00.5+01:00"],["d","cd","c"]]')
    when = to_micros(datetime(2029, 12, 31, 23, 0, 0, 500000, tzinfo=timezone.utc))
    assert ops == [("p", "cd", "b", b'{"v":2}', when), ("d", "cd", "c")]
    assert journal.encode_record(ops) == b'[["p","cd","b",{"v":2},"2029-12-31T23:00:00.500000Z"],["d","cd","c"]]\n'
    for bad in (b'"soon"', b"5", b"null", b'"2030-02-30T00:00:00Z"'):
        with pytest.raises(journal._Invalid, match="not a timestamp"):
            journal._parse_record(b'[["p","cd","b",{"v":2},' + bad + b"]]")


async def test_refresh_member_statistics_keeps_an_expiry_and_treats_an_expired_member_as_absent(st, clock):
    """The same on both backends (Python over the JSON store, one SQL statement on PostgreSQL)."""
    await st.put("members", "100_300", {"roles": ["a"]}, ttl=100)
    await st.put("members", "100_301", {"roles": ["b"]}, ttl=1)
    await st.record_messages([
        {"message_id": str(i), "guild_id": "100", "channel_id": "9", "author_id": author,
         "timestamp": "2024-01-01T00:00:00Z"} for i, author in ((1, "300"), (2, "301"), (3, "301"))])
    clock.at(1)
    assert await st.refresh_member_statistics(100) == 2
    assert await st.get_member_data(300, 100) == {
        "roles": ["a"], "statistics": {"message_count": 1, "last_active": "2024-01-01T00:00:00Z"}}
    assert await st.get_member_data(301, 100) == {
        "user_id": "301", "guild_id": "100", "statistics": {"message_count": 2, "last_active": "2024-01-01T00:00:00Z"}}
    assert await st._expiries("members", None) == {"100_300": T0 + timedelta(seconds=100)}


def test_a_live_view_hides_the_dead_keys_without_copying():
    from storage.backends.json.expiry import LiveView, live_mapping

    coll = {"a": b"{}", "b": b"{}", "c": b"{}"}
    assert live_mapping(coll, set()) is coll
    view = LiveView(coll, {"b", "zz"})
    assert dict(view) == {"a": b"{}", "c": b"{}"} and len(view) == 2 and list(view) == ["a", "c"]
    assert view.get("b") is None and view.get("b", 5) == 5 and view.get("a") == b"{}" and "b" not in view
    with pytest.raises(KeyError):
        view["b"]
    coll["d"] = b"{}"  # read through: no copy
    assert "d" in view


async def test_queries_do_not_see_expired_documents(st, clock):
    """find / count(where) / delete_many, on the store and in a transaction, with and without an index."""
    await st.put_many("cd", {f"u{i}": {"n": i, "kind": "mute"} for i in range(6)}, ttl=10)
    await st.put_many("cd", {f"p{i}": {"n": i, "kind": "mute"} for i in range(3)})
    for indexed in (False, True):
        if indexed:
            await st.ensure_index("cd", "n")
        clock.at(9)
        assert await st.count("cd", {"kind": "mute"}) == 9
        assert len(await st.find("cd", {"n": {"$gte": 0}}, order_by="-n", limit=5)) == 5
        clock.at(10)
        assert await st.count("cd", {"kind": "mute"}) == 3
        assert [k for k, _ in await st.find("cd", {"n": {"$gte": 0}}, order_by="-n", limit=5)] == ["p2", "p1", "p0"]
        assert await st.find("cd", {"n": 1}) == [("p1", {"n": 1, "kind": "mute"})]
        async with st.transaction() as tx:
            assert await tx.count("cd", {"kind": "mute"}) == 3
            assert [k for k, _ in await tx.find("cd", {"n": {"$lt": 2}})] == ["p0", "p1"]
        clock.at(0)
    clock.at(10)
    assert await st.delete_many("cd", {"kind": "mute"}) == 3  # the expired ones are not counted as deleted
    assert await st.count("cd") == 0 and await st.collections() == []


async def test_a_purge_keeps_the_json_indexes_equal_to_the_documents(st, clock):
    await st.ensure_index("cd", "n")
    await st.put_many("cd", {f"u{i}": {"n": i} for i in range(5)}, ttl=10)
    await st.put("cd", "p", {"n": 2})
    clock.at(10)
    assert await st.purge_expired() == 5
    if st.backend_name == "json":  # the in-memory index is what a rebuild from the documents gives
        live = st._tables.indexes.of("cd")
        fresh = build_indexes(st._tables.data["cd"], ["n"])
        index, rebuilt = live.paths["n"], fresh.paths["n"]
        assert {name: getattr(index, name) for name in ("entries", "eq", "nums", "strs")} == {
            name: getattr(rebuilt, name) for name in ("entries", "eq", "nums", "strs")}
        assert live.keys == fresh.keys
    await st.put("cd", "u1", {"n": 2})
    assert [k for k, _ in await st.find("cd", {"n": 2})] == ["p", "u1"]
    assert await st.count("cd", {"n": {"$gte": 0}}) == 2
