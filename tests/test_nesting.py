"""Calls nested in a transaction, and pools too small for what is asked of them: progress or a clear error, never a
hang (issue 11, item 6).

The rule, the same on both backends: inside ``async with store.transaction()``, every call on the *store* (read or
write) from that task, or a task it spawned, raises :class:`storage.TransactionError`, and the transaction stays
usable. The transaction holds what such a call would wait for (the JSON store's lock; on PostgreSQL a connection of
a pool that may have no other one free), so the call could only deadlock, or read around the transaction. Any other
wait for a pooled connection ends after the command timeout with :class:`storage.ConnectionError`.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import storage
from storage import StoreConfig

GUILD = "42"
HANG = 60  # seconds: only a bound that turns a hang into a failure, never a speed expectation


def outside_transaction(coro: Any) -> Any:
    """``coro`` as a task that did not inherit the current task's open transaction."""
    return contextvars.Context().run(asyncio.ensure_future, coro)


async def _listed(aiter: Any) -> list[Any]:
    return [pair async for pair in aiter]


STORE_CALLS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "get": lambda s: s.get("things", "k"),
    "get_many": lambda s: s.get_many("things", ["k"]),
    "items": lambda s: _listed(s.items("things")),
    "count": lambda s: s.count("things"),
    "collections": lambda s: s.collections(),
    "get_member_data": lambda s: s.get_member_data(1, 2),
    "message_counts": lambda s: s.message_counts(GUILD),
    "top_authors": lambda s: s.top_authors(GUILD),
    "put": lambda s: s.put("things", "k", {"v": 9}),
    "put_many": lambda s: s.put_many("things", {"k": {"v": 9}}),
    "delete": lambda s: s.delete("things", "k"),
    "update": lambda s: s.update("things", "k", lambda d: {"v": 9}),
    "save_member_data": lambda s: s.save_member_data(1, 2, {"v": 9}),
    "batch_update_members": lambda s: s.batch_update_members([{"user_id": 1, "guild_id": 2, "data": {"v": 9}}]),
    "record_messages": lambda s: s.record_messages([{"message_id": 5, "channel_id": 1, "author_id": 2,
                                                     "guild_id": GUILD, "timestamp": "2024-03-01T12:00:00Z"}]),
    "transaction": lambda s: s.transaction().__aenter__(),
}


@pytest.mark.parametrize("call", sorted(STORE_CALLS))
async def test_a_store_call_inside_its_own_transaction_is_refused_and_the_transaction_goes_on(store: Any,
                                                                                             call: str):
    await store.put("things", "k", {"v": 1})
    async with store.transaction() as tx:
        await tx.put("things", "k", {"v": 2})
        with pytest.raises(storage.TransactionError, match="transaction open in the current task"):
            await asyncio.wait_for(STORE_CALLS[call](store), HANG)
        # ... also from a task the transaction's task spawned (it inherits the open transaction)
        with pytest.raises(storage.TransactionError, match="transaction open in the current task"):
            await asyncio.wait_for(asyncio.ensure_future(STORE_CALLS[call](store)), HANG)
        assert await tx.get("things", "k") == {"v": 2}
    assert await store.get("things", "k") == {"v": 2}
    assert await store.get_member_data(1, 2) == {}
    assert await store.message_counts(GUILD) == 0


async def test_a_transaction_lists_its_collections_itself(store: Any):
    await store.put("a", "k", {})
    await store.put("b", "k", {})
    async with store.transaction() as tx:
        await tx.delete("a", "k")
        await tx.put("c", "k", {})
        assert await tx.collections() == ["b", "c"]
    assert await store.collections() == ["b", "c"]


@pytest.mark.parametrize("pool_max", [1, 2, 3])
async def test_transactions_and_readers_make_progress_on_any_pool_size(pg_config: StoreConfig, pool_max: int):
    config = dataclasses.replace(pg_config, pool_min=0, pool_max=pool_max)
    async with storage.open_store(config=config) as store:
        await store.put_many("things", {str(i): {"v": i} for i in range(10)})

        async def reader() -> None:
            for i in range(40):
                assert await store.get("things", str(1 + i % 9)) == {"v": 1 + i % 9}
                assert len(await store.get_many("things", ["1", "2"])) == 2

        async def incrementer() -> None:
            for _ in range(10):
                async with store.transaction() as tx:
                    doc = await tx.get("things", "0")
                    with pytest.raises(storage.TransactionError):
                        await store.get("things", "1")  # the nesting of the issue: refused, not a hang
                    await tx.put("things", "0", {"v": doc["v"] + 1})

        await asyncio.wait_for(asyncio.gather(reader(), reader(), incrementer(), incrementer()), HANG)
        assert await store.get("things", "0") == {"v": 20}


async def test_a_wait_for_the_pool_that_cannot_end_fails_with_a_clear_error(pg_config: StoreConfig):
    # The transaction's task waits for another task that needs a connection: with a pool of one, nothing can
    # ever give it one. The wait ends after the command timeout with a ConnectionError that says so.
    # (2 s: long enough for a loaded machine's own statements, which 0.5 s was not)
    config = dataclasses.replace(pg_config, pool_min=0, pool_max=1, command_timeout=2.0)
    async with storage.open_store(config=config) as store:
        await store.put("things", "k", {"v": 1})
        async with store.transaction() as tx:
            await tx.put("things", "k", {"v": 2})
            with pytest.raises(storage.ConnectionError, match=r"no connection .* became free .* pool of 1") as info:
                await asyncio.wait_for(outside_transaction(store.get("things", "k")), HANG)
            assert isinstance(info.value.__cause__, asyncio.TimeoutError)
        assert await store.get("things", "k") == {"v": 2}


async def test_a_backup_on_a_pool_of_one_says_it_needs_two(pg_config: StoreConfig, tmp_path: Any):
    config = dataclasses.replace(pg_config, pool_min=0, pool_max=1, backup_dir=str(tmp_path / "backups"))
    async with storage.open_store(config=config) as store:
        await store.put("things", "k", {"v": 1})
        with pytest.raises(storage.DatabaseError, match="STORAGE_POOL_MAX >= 2"):
            await asyncio.wait_for(store.create_backup(), HANG)
        assert await store.list_backups() == []
        assert await store.get("things", "k") == {"v": 1}
