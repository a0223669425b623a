"""A PostgreSQL server that stops answering (issue 11, item 7): every call ends in bounded time.

The server is this module's own throwaway cluster; the backends serving the store's connections are found in
``pg_stat_activity`` (by the DSN's ``application_name``) and stopped with ``SIGSTOP``, which is what a frozen VM or a
half-open connection looks like from the client: nothing is closed, nothing answers. Every stopped process is sent
``SIGCONT`` in the fixture's teardown, whatever the test did. What must hold: a call fails with
:class:`storage.ConnectionError` after the command timeout; ``asyncio.wait_for`` and ``task.cancel()`` return at once
(the connection is abandoned, never waited on); the store works again once the server answers; a migration whose
lock connection is lost stops and keeps nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

import storage
from storage import StoreConfig
from storage.migrations import Migration, Migrator
from tests._pg import Cluster, with_params

pytestmark = pytest.mark.slow

HANG = 30  # seconds: a bound that turns a hang into a failure; the calls below need ~1 s (the command timeout)
APP = "storage-frozen-test"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster.create(tmp_path_factory.mktemp("pg-frozen"), settings={"fsync": "off"})
    try:
        yield c
    finally:
        c.cleanup()


class Freezer:
    """SIGSTOPs the backends of this module's store and SIGCONTs every one of them at the end."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.stopped: set[int] = set()

    async def backends(self) -> list[int]:
        conn = await asyncpg.connect(self.cluster.dsn())
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", APP)
        finally:
            await conn.close()
        return [row["pid"] for row in rows]

    async def freeze(self) -> list[int]:
        pids = await self.backends()
        assert pids, "the store has no connection to freeze"
        for pid in pids:
            self.stopped.add(pid)
            os.kill(pid, signal.SIGSTOP)
        return pids

    def thaw(self) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stopped.clear()


@pytest.fixture
def freezer(cluster: Cluster) -> Iterator[Freezer]:
    f = Freezer(cluster)
    try:
        yield f
    finally:
        f.thaw()


@pytest.fixture
def config(cluster: Cluster) -> StoreConfig:
    # cache="off": every call here must reach the (frozen) server; the coherent cache would answer a get of a key
    # read before from memory, which is right (a frozen server commits nothing) but not what these tests test
    return StoreConfig(backend="postgres", dsn=with_params(cluster.dsn(), application_name=APP), pool_min=1,
                       pool_max=4, command_timeout=1.0, cache="off", source="tests")


@pytest.fixture
async def store(config: StoreConfig, freezer: Freezer) -> AsyncIterator[Any]:
    s = await storage.open_store(config=config)
    try:
        yield s
    finally:
        freezer.thaw()
        await s.close()


async def test_connections_have_tcp_keepalives(store: Any):
    await store.get("things", "k")
    sock = store._lane.connection._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


async def test_every_call_on_a_frozen_server_fails_after_the_command_timeout(store: Any, freezer: Freezer):
    await store.put("things", "k", {"v": 1})
    await freezer.freeze()
    calls = {
        "get": lambda: store.get("things", "k"),
        "put": lambda: store.put("things", "k", {"v": 2}),
        "update": lambda: store.update("things", "k", lambda d: {"v": 3}),
        "count": lambda: store.count("things"),
        "message_counts": lambda: store.message_counts("42"),
    }
    timed_out = 0
    for name, call in calls.items():
        # Each call may get a frozen connection (the lane) or a new, healthy one from the pool: either way it ends.
        try:
            await asyncio.wait_for(call(), HANG)
        except storage.ConnectionError as exc:
            timed_out += 1
            assert "command timeout" in str(exc) or "no connection" in str(exc), (name, exc)
            assert isinstance(exc.__cause__, asyncio.TimeoutError), name
    assert timed_out >= 1  # the first call met the frozen lane
    freezer.thaw()
    assert await store.get("things", "k") in ({"v": 1}, {"v": 2}, {"v": 3})
    await store.put("things", "after", {"ok": True})
    assert await store.get("things", "after") == {"ok": True}


@pytest.mark.parametrize("how", ["wait_for", "cancel"])
@pytest.mark.parametrize("call", ["get", "update", "transaction", "record_messages"])
async def test_cancelling_a_call_on_a_frozen_server_returns_at_once(store: Any, freezer: Freezer, how: str,
                                                                  call: str):
    await store.put("things", "k", {"v": 1})
    started, frozen = asyncio.Event(), asyncio.Event()

    async def target() -> Any:
        if call == "transaction":
            async with store.transaction() as tx:
                await tx.put("things", "k", {"v": 5})
                started.set()
                await frozen.wait()
                await tx.get("things", "k")  # waits on the frozen backend
            return None
        await store.get("things", "k")  # the lane is connected: freezing catches it
        started.set()
        await frozen.wait()
        if call == "get":
            return await store.get("things", "k")
        if call == "update":
            return await store.update("things", "k", lambda d: {"v": 7})
        return await store.record_messages([{"message_id": 9, "channel_id": 1, "author_id": 2, "guild_id": "42",
                                             "timestamp": "2024-03-01T12:00:00Z"}])

    task = asyncio.ensure_future(target())
    await asyncio.wait_for(started.wait(), HANG)
    await freezer.freeze()
    frozen.set()
    await asyncio.sleep(0.2)  # the statement is sent and waits on the frozen backend
    assert not task.done()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if how == "wait_for":
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(task, 0.05)
    else:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, HANG)
    # Well under the command timeout (1 s) of the frozen statement: the cancellation did not wait on the server.
    # (A bound that tells "abandoned" from "waited for the server", not a speed expectation.)
    assert loop.time() - t0 < 0.9
    freezer.thaw()
    assert await store.get("things", "k") in ({"v": 1}, {"v": 7})  # the transaction's write was not committed
    await store.put("things", "after", {"ok": True})
    assert await store.get("things", "after") == {"ok": True}


class _LosesItsLock(Migration):
    """Writes a document, then has the migration lock's session terminated, as a server restart or a network cut
    would: the step must not commit."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__("1.1.0", "loses its lock midway")
        self.cluster = cluster

    async def up(self, ctx: Any) -> None:
        await ctx.put("things", "migrated", {"v": 1})
        conn = await asyncpg.connect(self.cluster.dsn())
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid IN (SELECT pid FROM pg_stat_activity WHERE application_name = $1)", APP)
        finally:
            await conn.close()
        assert killed == 1
        await asyncio.sleep(0.2)  # the client notices the end of the session

    async def down(self, ctx: Any) -> None:
        await ctx.delete("things", "migrated")


async def test_losing_the_migration_locks_connection_stops_the_migration(store: Any, cluster: Cluster):
    migrator = Migrator(store, [_LosesItsLock(cluster)])
    with pytest.raises(storage.MigrationError, match="lock was lost"):
        await asyncio.wait_for(migrator.upgrade(backup=False), HANG)
    assert await store.get("things", "migrated") is None
    assert [m.version for m in await migrator.plan()] == ["1.1.0"]  # not recorded as applied
    assert await migrator.validate() == []


class _FreezesItsLock(Migration):
    """Stops the lock session's backend (a frozen server process that still holds the lock): the step is safe to
    commit, and giving the lock back afterwards must not wait for the frozen session."""

    def __init__(self, freezer: Freezer) -> None:
        super().__init__("1.1.0", "freezes its lock's session")
        self.freezer = freezer

    async def up(self, ctx: Any) -> None:
        await ctx.put("things", "migrated", {"v": 1})
        conn = await asyncpg.connect(self.freezer.cluster.dsn())
        try:
            pids = [row["pid"] for row in await conn.fetch(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid IN (SELECT pid FROM pg_stat_activity WHERE application_name = $1)", APP)]
        finally:
            await conn.close()
        assert len(pids) == 1
        self.freezer.stopped.add(pids[0])
        os.kill(pids[0], signal.SIGSTOP)

    async def down(self, ctx: Any) -> None:
        await ctx.delete("things", "migrated")


async def test_a_frozen_migration_lock_session_still_holds_the_lock_and_is_abandoned_after(store: Any,
                                                                                          freezer: Freezer):
    migrator = Migrator(store, [_FreezesItsLock(freezer)])
    run = await asyncio.wait_for(migrator.upgrade(backup=False), HANG)
    assert [step.version for step in run.steps] == ["1.1.0"]
    assert await store.get("things", "migrated") == {"v": 1}
    freezer.thaw()  # the abandoned session ends when its backend runs again, and the lock with it
    assert await migrator.plan() == []
    lock = store.migration_lock()
    assert await lock.acquire(HANG)
    await lock.release()


async def test_a_transaction_on_a_frozen_server_fails_after_the_command_timeout_and_writes_nothing(
        store: Any, freezer: Freezer):
    await store.put("things", "k", {"v": 1})
    with pytest.raises(storage.ConnectionError, match="command timeout") as info:
        async with store.transaction() as tx:
            await tx.put("things", "k", {"v": 2})
            await freezer.freeze()
            await asyncio.wait_for(tx.get("things", "k"), HANG)
    assert not isinstance(info.value.__cause__, storage.DatabaseError)
    freezer.thaw()
    assert await store.get("things", "k") == {"v": 1}
    with pytest.raises(storage.TransactionError, match=r"rolled back.*timed out"):  # caught inside: cannot commit
        async with store.transaction() as tx:
            await tx.put("things", "k", {"v": 3})
            await freezer.freeze()
            with pytest.raises(storage.ConnectionError):
                await asyncio.wait_for(tx.get("things", "k"), HANG)
    freezer.thaw()
    assert await store.get("things", "k") == {"v": 1}
