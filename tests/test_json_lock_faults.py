"""``storage.lock`` deleted or truncated by hand while processes write (issue 11, item 3).

Deleting the sidecar ("remove the stale lock") used to give two writers at once (two processes x 1500 increments
ended at 2230); truncating it killed every process that had the store open with SIGBUS (the change counter was
mmap'd). Two real processes increment one counter while the file is deleted or truncated over and over: both exit
cleanly, a third process reading meanwhile never sees the counter go backwards, and the final value is the number
of increments acknowledged.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import storage
from storage import StoreConfig
from storage.backends.json.store import LOCK_NAME
from tests import _fault_child as child

PER_PROCESS = 1500


def _delete(lock: Path) -> None:
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass


def _truncate(lock: Path) -> None:
    """What ``: > storage.lock`` does: open with O_TRUNC (creating it if it was missing)."""
    os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_delete, _truncate], ids=["deleted", "truncated"])
async def test_lock_file_damaged_under_two_incrementing_processes(tmp_path, damage):
    folder = tmp_path / "data"
    cfg = StoreConfig(backend="json", path=str(folder), lock_timeout=60, source="tests")
    async with storage.open_store(config=cfg) as store:
        await store.put("f", "counter", {"i": 0})
    stop = tmp_path / "stop"
    reader = child.spawn("reader", cfg, stop, "counter")  # reads without the lock meanwhile
    assert reader.stdout is not None and reader.stdout.readline().strip() == "READY"
    procs = [child.spawn("counter", cfg, PER_PROCESS) for _ in range(2)]
    lock = folder / LOCK_NAME
    damaged = 0
    while any(proc.poll() is None for proc in procs):
        damage(lock)
        damaged += 1
        await asyncio.sleep(0.003)
    stop.touch()
    reader_out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, f"exit {reader.returncode}: {err}"
    seen = [int(value) for key, value in child.lines(reader_out, "SEEN")]
    assert seen == sorted(seen) and seen[-1] <= 2 * PER_PROCESS  # never backwards, never past what was written
    acknowledged = 0
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"exit {proc.returncode}: {err}"  # -7 would be SIGBUS
        assert out.rstrip().endswith("DONE")
        acknowledged += len(child.lines(out, "ACK"))
    assert acknowledged == 2 * PER_PROCESS
    assert damaged > 50  # the file really was damaged many times while they ran
    async with storage.open_store(config=cfg) as store:
        assert await store.get("f", "counter") == {"i": acknowledged}
