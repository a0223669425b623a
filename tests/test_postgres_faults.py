"""Real faults against a real server: PostgreSQL stopped and started (cleanly, and like a crash) under a live store.

The server is this module's own pgserver cluster (durable settings: fsync on), stopped and started with pg_ctl on
the same data directory and port, so the server shared by the rest of the suite is never disturbed. What must hold:
calls made while the server is down raise :class:`storage.ConnectionError` (with the driver's error chained), the
same store works again once the server is back (no reopening), nothing acknowledged is lost, and
:func:`storage.safe_database_operation` rides out a short outage.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

import storage
from storage import StoreConfig
from tests._pg import Cluster

pytestmark = pytest.mark.slow

GUILD = "42"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster.create(tmp_path_factory.mktemp("pg-faults"))
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def config(cluster: Cluster) -> StoreConfig:
    if not cluster.running:  # a failed test may have left it stopped
        cluster.start()
    return StoreConfig(backend="postgres", dsn=cluster.dsn(), pool_min=2, pool_max=8, cache_ttl=0, source="tests")


@pytest.fixture
async def store(config: StoreConfig) -> AsyncIterator[Any]:
    s = await storage.open_store(config=config)
    try:
        yield s
    finally:
        await s.close()


async def stop(cluster: Cluster, mode: str = "fast") -> None:
    await asyncio.to_thread(cluster.stop, mode)


async def start(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.start)


def message(i: int) -> dict[str, Any]:
    return {"message_id": i, "channel_id": 1, "author_id": 2 + i % 5, "guild_id": GUILD,
            "timestamp": f"2024-03-01T12:{i // 60 % 60:02d}:{i % 60:02d}Z"}


def every_kind_of_call(store: Any, tag: str) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    async def in_transaction() -> None:
        async with store.transaction() as tx:
            await tx.put(f"tx-{tag}", "a", {"n": 1})

    async def iterate() -> list[Any]:
        return [pair async for pair in store.items(f"calls-{tag}")]

    return [
        ("put", lambda: store.put(f"calls-{tag}", "a", {"n": 1})),
        ("get", lambda: store.get(f"calls-{tag}", "zz")),
        ("get_many", lambda: store.get_many(f"calls-{tag}", ["a", "b"])),
        ("put_many", lambda: store.put_many(f"calls-{tag}", {"b": {}, "c": {}})),
        ("update", lambda: store.update(f"calls-{tag}", "u", lambda d: {"n": d.get("n", 0) + 1})),
        ("delete", lambda: store.delete(f"calls-{tag}", "c")),
        ("items", iterate),
        ("count", lambda: store.count(f"calls-{tag}")),
        ("collections", lambda: store.collections()),
        ("transaction", in_transaction),
        ("save_member_data", lambda: store.save_member_data(1, 2, {"roles": [tag]})),
        ("record_messages", lambda: store.record_messages([message(i) for i in range(1, 4)])),
        ("message_counts", lambda: store.message_counts(GUILD)),
    ]


async def test_every_call_fails_cleanly_while_down_and_works_after_without_reopening(store: Any,
                                                                                       cluster: Cluster):
    for _name, call in every_kind_of_call(store, "warmup"):
        await call()
    await stop(cluster)
    try:
        for name, call in every_kind_of_call(store, "down"):
            with pytest.raises(storage.ConnectionError) as info:
                await call()
            assert info.value.__cause__ is not None, name
            assert f"127.0.0.1:{cluster.port}" in str(info.value), name
    finally:
        await start(cluster)
    for _name, call in every_kind_of_call(store, "up"):
        await call()
    assert await store.get("calls-up", "u") == {"n": 1}
    assert await store.get("tx-down", "a") is None  # what failed wrote nothing
    assert await store.get_member_data(1, 2) == {"roles": ["up"]}


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["clean-restart", "crash-restart"])
async def test_restart_mid_workload_loses_nothing_acknowledged(store: Any, cluster: Cluster, mode: str):
    collection = f"work-{mode}"
    acked_puts: dict[str, int] = {}
    acked_increments = 0
    attempted_increments = 0
    acked_messages: set[str] = set()
    unexpected: list[BaseException] = []
    failures = 0
    stop_now = asyncio.Event()
    counter = itertools.count()
    acks = 0

    async def worker(kind: str) -> None:
        nonlocal acked_increments, attempted_increments, failures, acks
        while not stop_now.is_set():
            n = next(counter)
            try:
                if kind == "put":
                    await store.put(collection, f"k{n}", {"n": n})
                    acked_puts[f"k{n}"] = n
                elif kind == "update":
                    attempted_increments += 1
                    await store.update(collection, "counter", lambda d: {"n": d.get("n", 0) + 1})
                    acked_increments += 1
                else:
                    batch = [message(100_000 + n * 10 + j) for j in range(10)]
                    await store.record_messages(batch)
                    acked_messages.update(str(m["message_id"]) for m in batch)
                acks += 1
            except storage.ConnectionError:
                failures += 1
                await asyncio.sleep(0.05)  # the server is down: do not spin
            except BaseException as exc:  # anything else is a bug
                unexpected.append(exc)
                return

    async def wait_for_acks(count: int) -> None:
        target = acks + count
        while acks < target and not unexpected:
            await asyncio.sleep(0.01)

    workers = [asyncio.create_task(worker(kind)) for kind in ("put", "put", "update", "update", "messages")]
    try:
        await wait_for_acks(60)
        await stop(cluster, mode)
        failures_before = failures
        while failures < failures_before + 5 and not unexpected:  # every worker is failing now
            await asyncio.sleep(0.01)
        await start(cluster)
        await wait_for_acks(60)  # the same store works again
    finally:
        stop_now.set()
        await asyncio.gather(*workers)
        if not cluster.running:
            await start(cluster)
    assert not unexpected, unexpected
    assert failures > 0

    stored = {k: d["n"] async for k, d in store.items(collection) if k != "counter"}
    assert {k: stored.get(k) for k in acked_puts} == acked_puts
    counter_doc = await store.get(collection, "counter")
    # an increment whose call failed may or may not have committed; an acknowledged one always did
    assert acked_increments <= counter_doc["n"] <= attempted_increments
    stored_ids = {r["message_id"] async for r in store.scan_messages(GUILD)}
    assert acked_messages <= stored_ids


async def test_a_transaction_cut_by_a_restart_writes_nothing(store: Any, cluster: Cluster):
    await store.put("cut", "a", {"n": 1})
    with pytest.raises(storage.ConnectionError):
        async with store.transaction() as tx:
            await tx.put("cut", "a", {"n": 2})
            await tx.put("cut", "b", {"n": 2})
            await stop(cluster)
            await tx.put("cut", "c", {"n": 2})
    await start(cluster)
    assert [(k, d) async for k, d in store.items("cut")] == [("a", {"n": 1})]


async def test_safe_database_operation_rides_out_a_short_outage(store: Any, cluster: Cluster):
    await stop(cluster)
    restarter = threading.Timer(1.0, cluster.start)
    restarter.start()
    try:
        await storage.safe_database_operation(store.put, "outage", "k", {"saved": True}, max_retries=10,
                                              retry_delay=0.2)
        result = await storage.safe_database_operation(store.get, "outage", "k", max_retries=3, retry_delay=0.2)
    finally:
        await asyncio.to_thread(restarter.join)
    assert result == {"saved": True}


async def test_opening_while_the_server_is_down_is_a_connection_error(config: StoreConfig, cluster: Cluster):
    await stop(cluster)
    try:
        with pytest.raises(storage.ConnectionError) as info:
            await storage.open_store(config=config)
        assert f"127.0.0.1:{cluster.port}/postgres" in str(info.value)
    finally:
        await start(cluster)
    async with storage.open_store(config=config) as s:
        await s.put("reopened", "k", {})
        assert await s.count("reopened") == 1
