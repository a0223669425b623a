"""Waiting for the JSON store's file lock while another holder has it (issue 15: cross-process writers).

A writer that finds the lock taken waits in a thread blocked in ``flock`` (woken when the holder lets go) instead
of polling. A blocked ``flock`` cannot time out, so a timeout or a cancellation abandons the thread; these tests pin
down that an abandoned wait writes nothing, never keeps the lock (the holder's next commit and a later open
proceed), and that a wait that is not abandoned gets the lock once it is free. Two stores on one folder in one
process exclude each other as two processes do (``flock`` locks belong to the open file description).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import storage
from storage import LockTimeoutError, StoreConfig
from storage.stores import JsonStore


def cfg(folder: Path, lock_timeout: float = 30) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=lock_timeout, source="tests")


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_waiting_writer_gets_the_lock_when_the_holder_lets_go(tmp_path: Path) -> None:
    holder = await JsonStore.open(cfg(tmp_path))
    waiter = await JsonStore.open(cfg(tmp_path))
    try:
        async with holder.transaction() as tx:
            await tx.put("c", "k", {"by": "holder"})
            late = asyncio.create_task(waiter.put("c", "k", {"by": "waiter"}))
            await asyncio.sleep(0.05)
            assert not late.done()  # blocked behind the transaction
        await late
        assert await holder.get("c", "k") == {"by": "waiter"}  # committed after the holder's, on top of it
        assert await waiter.get("c", "k") == {"by": "waiter"}
    finally:
        await holder.close()
        await waiter.close()


async def test_a_lock_timeout_writes_nothing_and_keeps_no_lock(tmp_path: Path) -> None:
    holder = await JsonStore.open(cfg(tmp_path))
    waiter = await JsonStore.open(cfg(tmp_path, lock_timeout=0.2))
    try:
        async with holder.transaction() as tx:
            with pytest.raises(LockTimeoutError):
                await waiter.put("c", "lost", {"n": 1})
            await tx.put("c", "kept", {"n": 2})
        await holder.put("c", "again", {"n": 3})  # the abandoned thread let go (or never got it)
        await waiter.put("c", "later", {"n": 4})  # and the waiter itself can write again
        assert sorted([key async for key, _ in holder.items("c")]) == ["again", "kept", "later"]
    finally:
        await holder.close()
        await waiter.close()
    third = await JsonStore.open(cfg(tmp_path, lock_timeout=2))  # nothing holds the lock any more
    try:
        assert await third.get("c", "lost") is None
        assert await third.count("c") == 3
    finally:
        await third.close()


@pytest.mark.parametrize("point", range(0, 8))
async def test_a_writer_cancelled_while_waiting_for_the_lock_writes_nothing(tmp_path: Path, point: int) -> None:
    """Cancelled at any loop turn of its wait, or just as the lock is handed over: its write is not made, the
    lock is not kept, and both stores go on writing."""
    holder = await JsonStore.open(cfg(tmp_path))
    waiter = await JsonStore.open(cfg(tmp_path))
    try:
        async with holder.transaction() as tx:
            await tx.put("c", "holder", {"n": 1})
            doomed = asyncio.create_task(waiter.put("c", "doomed", {"n": 2}))
            await turns(point)
            if point % 2:
                doomed.cancel()
        if not point % 2:  # the holder let go first: the handover and the cancellation race
            await turns(point // 2)
            doomed.cancel()
        try:
            await doomed
            written = True
        except asyncio.CancelledError:
            written = False
        assert (await holder.get("c", "doomed") is not None) == written
        await holder.put("c", "after", {"n": 3})
        await waiter.put("c", "after2", {"n": 4})
        assert await waiter.count("c") == 3 + written
    finally:
        await holder.close()
        await waiter.close()
    async with storage.open_store(config=cfg(tmp_path, lock_timeout=2)) as again:  # nothing holds the lock
        assert await again.count("c") == 3 + written
