"""A batch's inline commit plans its apply while its fsync runs in the store's worker thread (json/sync_thread.py).

The promise is the inline commit's: the batch is visible only once durable, a failed fsync raises
:class:`StorageIOError` with nothing visible (now or after a reopen), and the store keeps working; a planning that
fails costs only speed (the batch is applied the plain way).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
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
    """``os.fdatasync`` recording which thread ran it; fails with EIO while ``fail`` is set."""

    def __init__(self) -> None:
        self.real = os.fdatasync
        self.threads: list[str] = []
        self.fail = False

    def __call__(self, fd: int) -> None:
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise OSError(errno.EIO, "Input/output error (injected)")
        self.real(fd)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SyncSpy:
    spy = SyncSpy()
    monkeypatch.setattr(os, "fdatasync", spy)
    return spy


async def test_a_batch_fsyncs_in_the_worker_and_is_applied_by_plan(tmp_path: Path, spy: SyncSpy) -> None:
    n = json_store.PLAN_DURING_SYNC
    store = await JsonStore.open(cfg(tmp_path))
    try:
        await store.put_many("c", batch(n, 0))
        await store.compact()
    finally:
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))  # a lazily opened snapshot (json/lazy.py) under the batch
    try:
        spy.threads.clear()
        store._batch_sync_estimate = store._sync_estimate = 0.0  # inline, whatever this machine's disk took
        await store.put_many("c", {**batch(n, 1), "new": {"tag": 1}})
        assert any(name.startswith("storage-fsync") for name in spy.threads), spy.threads
        assert await store.count("c") == n + 1
        assert (await store.get("c", f"k{n - 1:04d}"))["tag"] == 1
        await store.put("c", "one", {"tag": 2})  # a lone save: no worker
        assert not spy.threads[-1].startswith("storage-fsync")
    finally:
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert await store.count("c") == n + 2
        assert (await store.get("c", "k0000"))["tag"] == 1
    finally:
        await store.close()


async def test_a_failed_fsync_in_the_worker_is_never_seen(tmp_path: Path, spy: SyncSpy) -> None:
    n = json_store.PLAN_DURING_SYNC
    store = await JsonStore.open(cfg(tmp_path))
    try:
        await store.put_many("c", batch(n, 0))
        store._batch_sync_estimate = store._sync_estimate = 0.0
        spy.fail = True
        with pytest.raises(StorageIOError):
            await store.put_many("c", {**batch(n, 1), "new": {"tag": 1}})
        assert any(name.startswith("storage-fsync") for name in spy.threads), spy.threads
        spy.fail = False
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
    n = json_store.PLAN_DURING_SYNC

    def broken(self: Tables, ops: Any) -> Any:
        raise RuntimeError("planning failed (injected)")

    store = await JsonStore.open(cfg(tmp_path))
    try:
        store._batch_sync_estimate = store._sync_estimate = 0.0
        monkeypatch.setattr(Tables, "plan", broken)
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
