"""A batch's commit plans its apply while the disk writes its record: started writing back right after the
``pwrite`` (fsutil.start_writeback: Linux ``sync_file_range``), the plan worked out on the committing thread before
the ``fdatasync``; where the writeback cannot be started, the planning is offered to the store's worker thread
during the fsync instead (json/sync_thread.py). Both ways are tested (``spy``'s two modes).

The promise is the inline commit's: the batch is visible only once durable, a failed fsync (or a failed start of
the writeback) raises :class:`StorageIOError` with nothing visible (now or after a reopen), and the store keeps
working; a worker that does not get to the planning in time, or a planning that fails, costs only speed (the
batch is applied the plain way after the fsync).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from storage import StorageIOError, StoreConfig
from storage.backends.json import store as json_store
from storage.backends.json.tables import Tables
from storage.stores import JsonStore


def cfg(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), source="tests")


def batch(n: int, tag: int) -> dict[str, dict[str, Any]]:
    return {f"k{i:04d}": {"tag": tag, "pad": "x" * 280} for i in range(n)}


class SyncSpy:
    """``os.fdatasync`` taking ``delay`` seconds (a slow disk: the worker surely gets to the planning), failing
    with EIO while ``fail`` is set; the threads ``Tables.plan`` ran in, and every writeback start, plan and fsync
    in order (``events``: what and on which thread). ``writeback``: whether commits can start the writeback
    (False: json/store.py's ``start_writeback`` answers False, as off Linux)."""

    def __init__(self, writeback: bool) -> None:
        self.real = os.fdatasync
        self.writeback = writeback
        self.delay = 0.0
        self.fail = False
        self.planned_in: list[str] = []
        self.events: list[tuple[str, str]] = []

    def __call__(self, fd: int) -> None:
        self.events.append(("fsync", threading.current_thread().name))
        time.sleep(self.delay)
        if self.fail:
            raise OSError(errno.EIO, "Input/output error (injected)")
        self.real(fd)

    def clear(self) -> None:
        self.planned_in.clear()
        self.events.clear()

    def planned_meanwhile(self, thread: str | None = None) -> bool:
        """Whether the last batch was planned while its record was being written: on the committing thread
        between the writeback's start and the fsync (``thread``: that thread's name, if known), or by the worker
        during the fsync (no writeback)."""
        if not self.writeback:
            return in_worker(self.planned_in)
        for index in range(len(self.events) - 2):
            (first, where), (second, planner), (third, syncer) = self.events[index:index + 3]
            if (first, second, third) == ("writeback", "plan", "fsync") and where == planner == syncer:
                return thread is None or planner == thread
        return False


def writeback_works(folder: Path) -> bool:
    """Whether this machine can start a file's writeback (Linux ``sync_file_range``, not refused by a filter)."""
    fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        return json_store.start_writeback(fd)
    finally:
        os.close(fd)


@pytest.fixture(params=["writeback", "offer"])
def spy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SyncSpy:
    if request.param == "writeback" and not writeback_works(tmp_path):
        pytest.skip("no writeback can be started here: the commits make the offer (the other mode)")
    spy = SyncSpy(request.param == "writeback")
    monkeypatch.setattr(os, "fdatasync", spy)
    real_plan, real_plan_batch = Tables.plan, Tables.plan_batch
    real_writeback = json_store.start_writeback

    def plan(self: Tables, ops: Any) -> Any:
        spy.planned_in.append(threading.current_thread().name)
        spy.events.append(("plan", threading.current_thread().name))
        return real_plan(self, ops)

    def plan_batch(self: Tables, name: str, puts: Any) -> Any:  # a put_many's batch (json/put_run.py)
        spy.planned_in.append(threading.current_thread().name)
        spy.events.append(("plan", threading.current_thread().name))
        return real_plan_batch(self, name, puts)

    def start_writeback(fd: int) -> bool:
        if not spy.writeback:
            return False
        started = real_writeback(fd)
        spy.events.append(("writeback", threading.current_thread().name))
        return started

    monkeypatch.setattr(Tables, "plan", plan)
    monkeypatch.setattr(Tables, "plan_batch", plan_batch)
    monkeypatch.setattr(json_store, "start_writeback", start_writeback)
    return spy


def in_worker(names: list[str]) -> bool:
    return any(name.startswith("storage-fsync") for name in names)


async def lazy_with_batch(folder: Path, n: int) -> JsonStore:
    """A store whose collection ``c`` holds ``batch(n, 0)`` in a compacted snapshot, reopened so that the snapshot
    is read lazily (json/lazy.py): what the batches of these tests are planned against."""
    store = await JsonStore.open(cfg(folder))
    try:
        await store.put_many("c", batch(n, 0))
        await store.compact()
    finally:
        await store.close()
    return await JsonStore.open(cfg(folder))


async def test_a_batch_is_planned_while_its_record_is_written(tmp_path: Path, spy: SyncSpy) -> None:
    n = json_store.PLAN_DURING_SYNC
    store = await lazy_with_batch(tmp_path, n)
    try:
        spy.delay = 0.05
        spy.clear()
        store._batch_sync_estimate = store._sync_estimate = 0.0  # inline, whatever this machine's disk took
        await store.put_many("c", {**batch(n, 1), "new": {"tag": 1}})
        assert spy.planned_meanwhile(threading.main_thread().name), spy.events
        assert await store.count("c") == n + 1
        assert (await store.get("c", f"k{n - 1:04d}"))["tag"] == 1
        spy.clear()
        await store.put("c", "one", {"tag": 2})  # a lone save: nothing offered, no writeback started
        assert not in_worker(spy.planned_in) and ("writeback", "MainThread") not in spy.events
    finally:
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert await store.count("c") == n + 2
        assert (await store.get("c", "k0000"))["tag"] == 1
    finally:
        await store.close()


async def test_a_failed_fsync_of_a_planned_batch_is_never_seen(tmp_path: Path, spy: SyncSpy) -> None:
    n = json_store.PLAN_DURING_SYNC
    store = await JsonStore.open(cfg(tmp_path))
    try:
        await store.put_many("c", batch(n, 0))
        store._batch_sync_estimate = store._sync_estimate = 0.0
        spy.fail, spy.delay = True, 0.05
        spy.clear()
        with pytest.raises(StorageIOError):
            await store.put_many("c", {**batch(n, 1), "new": {"tag": 1}})
        assert spy.planned_meanwhile(), spy.events  # planned, then the fsync failed: never applied
        spy.fail, spy.delay = False, 0.0
        assert await store.get("c", "new") is None
        assert (await store.get("c", "k0000"))["tag"] == 0
        await store.put_many("c", batch(n, 2))  # the store rewrites its files, then goes on
        assert (await store.get("c", "k0000"))["tag"] == 2
    finally:
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert await store.get("c", "new") is None
        assert (await store.get("c", "k0000"))["tag"] == 2 and await store.count("c") == n
    finally:
        await store.close()


async def test_a_planning_that_fails_costs_only_speed(tmp_path: Path, spy: SyncSpy,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The planning while the record is written fails (a bug there; in the worker, or before the fsync): logged,
    and the commit plans and applies the batch itself after the fsync."""
    n = json_store.PLAN_DURING_SYNC
    real_plan, real_plan_batch = Tables.plan, Tables.plan_batch

    def broken(real: Any) -> Any:
        def planning(self: Tables, *args: Any) -> Any:
            if in_worker([threading.current_thread().name]) or (spy.events and spy.events[-1][0] == "writeback"):
                raise RuntimeError("planning failed (injected)")
            return real(self, *args)
        return planning

    store = await JsonStore.open(cfg(tmp_path))
    try:
        store._batch_sync_estimate = store._sync_estimate = 0.0
        spy.delay = 0.05
        monkeypatch.setattr(Tables, "plan", broken(real_plan))
        monkeypatch.setattr(Tables, "plan_batch", broken(real_plan_batch))
        with caplog.at_level(logging.ERROR, logger="storage.json"):
            await store.put_many("c", batch(n, 3))
        assert "planning a commit during its fsync failed" in caplog.text
        assert await store.count("c") == n and (await store.get("c", "k0000"))["tag"] == 3
    finally:
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert await store.count("c") == n and (await store.get("c", "k0001"))["tag"] == 3
    finally:
        await store.close()


async def test_a_worker_that_does_not_get_to_the_planning_leaves_it_to_the_commit(tmp_path: Path,
                                                                                 spy: SyncSpy) -> None:
    """A busy worker (on a loaded machine: not scheduled yet) does not hold the commit up: the offer is
    withdrawn once the fsync is done, the batch applied the plain way, and the worker skips the offer later."""
    if spy.writeback:
        pytest.skip("no offer is made where the writeback can be started")
    n = json_store.PLAN_DURING_SYNC
    store = await JsonStore.open(cfg(tmp_path))
    release = threading.Event()
    try:
        await store.put_many("c", batch(n, 0))
        store._batch_sync_estimate = store._sync_estimate = 0.0
        pool = store._sync_thread._pool
        assert pool is not None
        busy = pool.submit(release.wait, 30)  # the one worker is busy until released
        spy.planned_in.clear()
        await store.put_many("c", {**batch(n, 1), "new": {"tag": 1}})
        assert not in_worker(spy.planned_in)
        assert await store.count("c") == n + 1 and (await store.get("c", "k0000"))["tag"] == 1
        release.set()
        busy.result(timeout=30)
        pool.submit(lambda: None).result(timeout=30)  # the withdrawn offer has been skipped by now
        assert not in_worker(spy.planned_in)
    finally:
        release.set()
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert await store.count("c") == n + 1 and (await store.get("c", "new"))["tag"] == 1
    finally:
        await store.close()


async def test_a_transaction_of_puts_and_deletes_planned_by_the_worker_applies_like_the_plain_way(
        tmp_path: Path, spy: SyncSpy) -> None:
    """Puts that replace and add, deletes of present and absent keys, a lazily opened collection and a watcher:
    what the store shows, what the watcher hears (in order) and what a reopen reads are the operations applied
    one by one."""
    import asyncio

    start = {f"k{i:04d}": {"v": i} for i in range(600)}
    store = await JsonStore.open(cfg(tmp_path))
    try:
        await store.put_many("c", start)
        await store.compact()
    finally:
        await store.close()
    expected = dict(start)
    changes: list[tuple[str, str, Any]] = []
    store = await JsonStore.open(cfg(tmp_path))
    try:
        async with store.watch("c") as watch:
            await watch.ready()
            store._batch_sync_estimate = store._sync_estimate = 0.0
            spy.delay = 0.05
            spy.clear()
            async with store.transaction() as tx:
                for i in range(400, 700):  # 300 puts: 200 replace, 100 new
                    await tx.put("c", f"k{i:04d}", {"v": -i})
                    expected[f"k{i:04d}"] = {"v": -i}
                    changes.append((f"k{i:04d}", "put", {"v": -i}))
                for i in range(0, 100):
                    await tx.delete("c", f"k{i:04d}")
                    del expected[f"k{i:04d}"]
                    changes.append((f"k{i:04d}", "delete", None))
                for i in range(800, 850):
                    await tx.delete("c", f"k{i:04d}")  # absent: nothing to hear
            assert spy.planned_meanwhile(), spy.events
            got = []
            for _ in changes:
                change = await asyncio.wait_for(watch.__anext__(), 30)
                got.append((change.key, change.op, change.doc))
            assert got == changes
        assert await store.count("c") == len(expected)
        assert {key: doc async for key, doc in store.items("c")} == expected
    finally:
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert {key: doc async for key, doc in store.items("c")} == expected
    finally:
        await store.close()


def test_a_commit_that_waited_for_the_worker_pauses_the_offers(tmp_path: Path, spy: SyncSpy) -> None:
    """(SyncThread alone: the ``offer`` mode only.) A worker that holds the caller up longer than its work saves
    (a worker descheduled while it held the GIL, modelled by work that sleeps: no CPU spent, while the caller
    waits) stops the offers for PAUSE_AFTER_LOSS commits, which then do the work themselves; then the offers
    resume."""
    from storage.backends.json import sync_thread

    if spy.writeback:
        pytest.skip("SyncThread alone: once is enough")
    syncer = sync_thread.SyncThread()
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    ran_in: list[str] = []

    def work() -> str:
        ran_in.append(threading.current_thread().name)
        return "planned"

    def descheduled() -> str:
        ran_in.append(threading.current_thread().name)
        time.sleep(0.3)
        return "planned"

    try:
        spy.delay = 0.1  # a fsync long enough for the worker to start on a loaded machine
        assert syncer.sync_during(fd, work) == "planned"  # the first offer (it starts the thread): not judged
        ran_in.clear()
        assert syncer.sync_during(fd, descheduled) == "planned"  # the caller waits ~0.2 s after its fsync
        assert in_worker(ran_in)
        ran_in.clear()
        for _ in range(sync_thread.PAUSE_AFTER_LOSS):
            spy.delay = 0.0
            assert syncer.sync_during(fd, work) is None
        assert ran_in == []  # no offer made while paused
        spy.delay = 0.1
        assert syncer.sync_during(fd, work) == "planned" and in_worker(ran_in)  # offered again
    finally:
        syncer.close()
        os.close(fd)


@pytest.mark.parametrize("shape", ["mapping", "pairs"])
async def test_a_threaded_batch_append_is_planned_during_its_fsync_and_a_failed_one_is_never_seen(
        tmp_path: Path, spy: SyncSpy, shape: str) -> None:
    """A batch whose append goes to a worker thread (a slow disk: the inline estimates over budget) is planned
    while its record is written, as the inline commit is (in that thread, or by the sync thread during its
    fsync; a put_many of a mapping commits its two columns as one PutRun, a list of pairs its operation list):
    visible only once durable, and a failed fsync raises StorageIOError with nothing visible, now or after a reopen."""
    n = json_store.PLAN_DURING_SYNC

    def items(tag: int) -> Any:
        docs = {**batch(n, tag), "new": {"tag": tag}}
        return docs if shape == "mapping" else list(docs.items())

    store = await lazy_with_batch(tmp_path, n)
    try:
        spy.delay = 0.05
        store._sync_estimate = 1.0  # appends go to a thread, whatever this machine's disk took
        spy.clear()
        await store.put_many("c", items(1))
        assert spy.planned_meanwhile(), spy.events
        assert "MainThread" not in spy.planned_in  # in the append's thread (writeback) or the sync thread
        assert await store.count("c") == n + 1 and (await store.get("c", "k0000"))["tag"] == 1
        store._sync_estimate, spy.fail = 1.0, True
        spy.clear()
        with pytest.raises(StorageIOError):
            await store.put_many("c", items(2))
        assert spy.planned_meanwhile(), spy.events  # planned, then the fsync failed: never applied
        spy.fail = False
        assert (await store.get("c", "k0000"))["tag"] == 1 and (await store.get("c", "new"))["tag"] == 1
        assert await store.count("c") == n + 1
        await store.put("c", "after", {"tag": 3})  # the store rewrites its files, then goes on
    finally:
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert (await store.get("c", "k0000"))["tag"] == 1 and (await store.get("c", "new"))["tag"] == 1
        assert await store.count("c") == n + 2
    finally:
        await store.close()
