"""``open_store(..., read_only=True)`` on both backends: reads work, every write raises ReadOnlyError, transactions
give a consistent read-only view, and nothing in the store changes (issue 11 item 12)."""

from __future__ import annotations

import dataclasses

import asyncpg
import pytest

import storage
from storage import DatabaseError, ReadOnlyError, StoreConfig


async def test_a_read_only_store_reads_and_refuses_every_write(store_config: StoreConfig):
    async with storage.open_store(config=store_config) as store:
        await store.put_many("settings", {"1": {"prefix": "!"}, "2": {"prefix": "?"}})
        await store.save_member_data(5, 1, {"roles": ["a"]})
        await store.record_messages([{"message_id": "10", "guild_id": "1", "channel_id": "5", "author_id": "7",
                                      "timestamp": "2024-01-01T00:00:00Z"}])
    ro_config = dataclasses.replace(store_config, read_only=True)
    async with storage.open_store(config=ro_config) as ro:
        assert await ro.get("settings", "1") == {"prefix": "!"}
        assert await ro.get_member_data(5, 1) == {"roles": ["a"]}
        assert await ro.message_counts(1) == 1
        writes = [ro.put("settings", "3", {}), ro.delete("settings", "1"), ro.update("settings", "1", lambda d: d),
                  ro.put_many("x", {"a": {}}), ro.save_member_data(1, 2, {}),
                  ro.batch_update_members([{"user_id": "1", "guild_id": "2", "data": {}}]),
                  ro.record_messages([{"message_id": "11", "guild_id": "1", "channel_id": "5", "author_id": "7",
                                       "timestamp": "2024-01-01T00:00:00Z"}]),
                  ro.update_message(10, {"content_length": 3}), ro.prune_messages("2030-01-01T00:00:00Z"),
                  ro.refresh_member_statistics(1)]
        for write in writes:
            with pytest.raises(ReadOnlyError):
                await write
        async with ro.transaction() as tx:
            assert await tx.count("settings") == 2
            with pytest.raises(ReadOnlyError):
                await tx.put("settings", "4", {"prefix": "$"})
        backup = await ro.create_backup()  # a backup of a read-only store (a mounted snapshot) works
        assert backup.counts["settings"] == 2 and backup.messages == 1
    async with storage.open_store(config=store_config) as store:
        assert await store.count("settings") == 2
        assert await store.message_counts(1) == 1
        assert await store.get_member_data(5, 1) == {"roles": ["a"]}


async def test_postgres_read_only_is_enforced_by_the_server_too(pg_config: StoreConfig):
    async with storage.open_store(config=pg_config) as store:
        await store.put("s", "k", {"v": 1})
    ro = await storage.open_store(config=dataclasses.replace(pg_config, read_only=True))
    try:
        async with ro.pool.acquire() as conn:  # the escape hatch for hand-written SQL is read-only as well
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("DELETE FROM storage_documents")
        assert await ro.get("s", "k") == {"v": 1}
    finally:
        await ro.close()


async def test_postgres_read_only_open_never_creates_the_schema(pg_dsn: str):
    config = StoreConfig(backend="postgres", dsn=pg_dsn, read_only=True, source="tests")
    with pytest.raises(DatabaseError, match="read-only open never creates"):
        await storage.open_store(config=config)
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('storage_meta')") is None
    finally:
        await conn.close()
