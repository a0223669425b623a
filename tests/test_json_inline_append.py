"""Where a JSON commit's append + fsync runs: on the event loop while recent appends of its size class were quick,
else in a worker thread (json/store.py INLINE_SYNC_BUDGET, INLINE_BATCH_BUDGET, INLINE_MAX_BYTES).

Small records (a save) and records larger than a filler chunk (a batch) keep separate moving averages: a run of
batches whose appends take 0.4-0.55 ms must not send them, nor the saves after them, through a thread hop, while a
slow disk (seen first on small records) and very large records still keep the fsync off the loop.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from storage import StoreConfig
from storage.backends.json import store as json_store
from storage.backends.json.filler import MIN_CHUNK
from storage.stores import JsonStore


def cfg(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), source="tests")


@pytest.fixture
def threaded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every record whose append ran in a worker thread (a batch's, which plans its apply meanwhile,
    through ``JsonBackend._timed_sync``; on the loop that one runs the inline commit's append)."""
    sizes: list[int] = []
    real, real_sync = json_store._timed_append, json_store.JsonBackend._timed_sync

    def spy(journal: Any, record: bytes) -> float:
        sizes.append(len(record))
        return real(journal, record)

    def spy_sync(self: Any, ops: Any, record: bytes) -> Any:
        if threading.current_thread() is not threading.main_thread():
            sizes.append(len(record))
        return real_sync(self, ops, record)

    monkeypatch.setattr(json_store, "_timed_append", spy)
    monkeypatch.setattr(json_store.JsonBackend, "_timed_sync", spy_sync)
    return sizes


def batch(n: int, tag: int) -> dict[str, dict[str, Any]]:
    """``n`` documents of about 300 bytes: over MIN_CHUNK for n >= 250."""
    return {f"k{i}": {"tag": tag, "pad": "x" * 280} for i in range(n)}


async def test_batches_slower_than_the_small_budget_stay_on_the_loop(tmp_path: Path, threaded: list[int],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the batch budget pinned far above any real fsync: on a loaded host one batch's fdatasync took over 2 ms and
    # the learned estimate sent the next batch to a thread (seen in full runs beside other work)
    monkeypatch.setattr(json_store, "INLINE_BATCH_BUDGET", 30.0)
    store = await JsonStore.open(cfg(tmp_path))
    try:
        store._batch_sync_estimate = 0.001  # batches have been taking 1 ms: over the small budget, under theirs
        for tag in range(3):
            await store.put_many("c", batch(400, tag))
        assert threaded == []
        assert store._sync_estimate == 0.0, "batches do not move the small records' estimate"
        await store.put("c", "one", {"n": 1})
        assert threaded == []
        assert (await store.get("c", "k399"))["tag"] == 2
    finally:
        await store.close()


async def test_a_slow_disk_seen_on_small_records_sends_batches_to_a_thread(tmp_path: Path,
                                                                           threaded: list[int]) -> None:
    store = await JsonStore.open(cfg(tmp_path))
    try:
        store._sync_estimate = 0.01  # saves have been taking 10 ms
        await store.put_many("c", batch(400, 0))
        assert len(threaded) == 1 and threaded[0] > MIN_CHUNK
    finally:
        await store.close()


async def test_batches_over_their_budget_and_huge_records_go_to_a_thread(tmp_path: Path, threaded: list[int],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_store, "INLINE_BATCH_BUDGET", 30.0)  # pinned, as above: only the estimate decides
    store = await JsonStore.open(cfg(tmp_path))
    try:
        store._batch_sync_estimate = 60.0
        await store.put_many("c", batch(400, 0))
        assert len(threaded) == 1
        store._batch_sync_estimate = 0.0
        monkeypatch.setattr(json_store, "INLINE_MAX_BYTES", 100_000)
        await store.put_many("c", batch(400, 1))  # about 130 KB: over the cap, whatever the estimates say
        assert len(threaded) == 2 and threaded[1] > 100_000
        await store.put_many("c", batch(250, 2))  # about 80 KB: under it, on the loop
        assert len(threaded) == 2
        assert (await store.get("c", "k0"))["tag"] == 2 and (await store.get("c", "k300"))["tag"] == 1
    finally:
        await store.close()


async def test_a_huge_document_on_the_leased_path_syncs_in_a_thread(tmp_path: Path, threaded: list[int],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves back to back hold the lease and commit synchronously (json/lease.py): a document over
    INLINE_MAX_BYTES among them still has its fsync in a worker thread, not on the loop."""
    from storage.backends.json import lease

    monkeypatch.setattr(lease, "BUDGET", 30.0)  # a loaded machine must not end the lease by the clock here
    monkeypatch.setattr(json_store, "INLINE_SYNC_BUDGET", 30.0)  # ... nor send a small record to a thread (a slow
    monkeypatch.setattr(json_store, "INLINE_MAX_BYTES", 100_000)  # fsync moves the estimate: 3 runs in 15 did)
    store = await JsonStore.open(cfg(tmp_path))
    try:
        await store.put("c", "a", {"n": 1})
        await store.put("c", "b", {"n": 2})  # back to back: the lease is on
        assert store._lease.held
        await store.put("c", "huge", {"pad": "x" * 200_000})
        assert len(threaded) == 1 and threaded[0] > 200_000
        await store.put("c", "small", {"n": 3})
        assert len(threaded) == 1
        assert len((await store.get("c", "huge"))["pad"]) == 200_000
    finally:
        await store.close()


async def test_a_disk_slower_than_the_small_budget_keeps_batches_on_the_loop_under_theirs(
        tmp_path: Path, threaded: list[int]) -> None:
    """Small records at 2 ms (a congested disk): over their own budget, so a save goes to a thread, but under the
    batches' budget, so a batch stays on the loop (a thread hop cost a batch 1-2.5 ms more than the fsync it freed
    the loop of); past the batches' budget, a batch goes to a thread too."""
    store = await JsonStore.open(cfg(tmp_path))
    try:
        store._sync_estimate = store._batch_sync_estimate = 0.002
        await store.put_many("c", batch(400, 0))
        assert threaded == []
        store._sync_estimate = 0.002
        await store.put("c", "one", {"n": 1})
        assert len(threaded) == 1 and threaded[0] < MIN_CHUNK
        store._sync_estimate, store._batch_sync_estimate = 0.002, json_store.INLINE_BATCH_BUDGET
        await store.put_many("c", batch(400, 1))
        assert len(threaded) == 2 and threaded[1] > MIN_CHUNK
        store._sync_estimate, store._batch_sync_estimate = json_store.INLINE_BATCH_BUDGET, 0.0
        await store.put_many("c", batch(400, 2))
        assert len(threaded) == 3 and threaded[2] > MIN_CHUNK
        assert (await store.get("c", "k399"))["tag"] == 2
    finally:
        await store.close()
