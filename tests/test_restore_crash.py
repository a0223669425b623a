"""kill -9 during a JSON store's restore: the store always opens as the pre-restore state or as the backup.

Issue 11 item 4: 5 of 30 kills once left the documents restored and the message log empty. A real child process
restores; it is killed at many points (spread over the whole run, and densely right around the commit), and each
time the store is opened again and compared, documents and messages alike, with both acceptable states.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import storage
from storage import StoreConfig
from storage.backends.json import restore as json_restore

from ._proc import read_until
from .test_backup import GUILD, populate, snapshot

ROOT = Path(__file__).resolve().parent.parent

RESTORING_CHILD = r"""
import asyncio, json, sys, time
import storage
from storage.progress import Progress

class Phases(Progress):
    def phase(self, name, total):
        print(f"PHASE {name}", flush=True)

async def main():
    store = await storage.open_store(config=storage.StoreConfig(**json.loads(sys.argv[1])))
    print("OPEN", flush=True)
    await store.restore_backup(sys.argv[2], progress=Phases())
    print("DONE", flush=True)
    await store.close()
asyncio.run(main())
"""


async def _prepare(base: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A template store with a backup of one state (``backup``) and a different current state (``before``)."""
    config = _config(base)
    async with storage.open_store(config=config) as store:
        await populate(store, members=300, messages=6000)
        info = await store.create_backup()  # type: ignore[attr-defined]
        backup_state = await snapshot(store)
        # move on: documents changed, added and deleted; messages added and pruned
        await store.put_many("members", {f"{GUILD}_{1000 + i}": {"changed": i} for i in range(0, 300, 3)})
        await store.put_many("extra", {f"e{i}": {"i": i} for i in range(50)})
        await store.delete("spam_blocker", "z-last")
        await store.record_messages([{
            "message_id": str(90_000 + i), "guild_id": GUILD, "channel_id": "7", "author_id": "1",
            "timestamp": f"2024-05-0{1 + i % 9}T00:00:00Z", "content_length": i} for i in range(2000)])
        before_state = await snapshot(store)
    assert before_state != backup_state
    return info.id, backup_state, before_state


def _config(base: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(base / "data"), backup_dir=str(base / "backups"), lock_timeout=30,
                       source="tests")


def _spawn(config: StoreConfig, backup_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", RESTORING_CHILD, json.dumps(dataclasses.asdict(config)),
                             backup_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
async def test_kill_9_during_a_json_restore_leaves_one_state_or_the_other(tmp_path: Path) -> None:
    template = tmp_path / "template"
    backup_id, backup_state, before_state = await _prepare(template)

    # One undisturbed run: how long the restore takes from the moment the store is open.
    run = tmp_path / "run"
    shutil.copytree(template, run)
    child = _spawn(_config(run), backup_id)
    opened = await read_until(child, "OPEN")
    finished = await read_until(child, "DONE")
    child.wait()
    duration = finished - opened
    async with storage.open_store(config=_config(run)) as store:
        assert await snapshot(store) == backup_state

    # Kill points: spread over the whole restore (timed from OPEN), then densely from the start of the document
    # phase (the safety backup and the swap), where the commit happens.
    points: list[tuple[str, float]] = [("OPEN", duration * i / 20) for i in range(20)]
    points += [("PHASE restore: documents", 0.002 * i) for i in range(20)]
    outcomes = {"before": 0, "backup": 0}
    killed_running = 0
    for number, (marker, delay) in enumerate(points):
        run = tmp_path / f"run{number}"
        shutil.copytree(template, run)
        child = _spawn(_config(run), backup_id)
        await read_until(child, marker)
        if delay:
            await asyncio.sleep(delay)
        if child.poll() is None:
            killed_running += 1
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        async with storage.open_store(config=_config(run)) as store:
            state = await snapshot(store)
        assert not json_restore.pending(run / "data"), "opening the store resolves an interrupted restore"
        leftovers = [n for n in os.listdir(run / "data") if json_restore.is_restore_entry(n)]
        assert leftovers == [], leftovers
        if state == before_state:
            outcomes["before"] += 1
        elif state == backup_state:
            outcomes["backup"] += 1
        else:
            differs = sorted(k for k in set(state) | set(backup_state) if state.get(k) != backup_state.get(k))
            raise AssertionError(f"kill {number} ({marker} + {delay:.3f}s) left a mixed state: differs from the "
                                 f"backup in {differs}, from the pre-restore state too")
        shutil.rmtree(run)
    print(f"{len(points)} kills: {outcomes}, {killed_running} while the child was still running")
    assert killed_running >= len(points) // 2, "the kills must land while the restore runs"


async def test_an_intent_left_before_the_commit_rolls_the_messages_back(tmp_path: Path) -> None:
    """The window itself, made by hand: intent written and folders swapped, then no commit (a crash)."""
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await populate(store, members=20, messages=200)
        before = await snapshot(store)
    data = Path(config.path)
    staged, count = json_restore.stage_messages(data, [[{
        "message_id": "1", "guild_id": GUILD, "channel_id": "2", "author_id": "3",
        "timestamp": "2024-01-01T00:00:00.000000Z", "content_length": 1, "attachments": 0, "reactions": 0,
        "analysis": {}}]])
    assert count == 1
    async with storage.open_store(config=config) as store:
        digest = json_restore.documents_digest(store._tables.data)  # type: ignore[attr-defined]
    json_restore.begin(data, staged, digest, "20240101_000000")
    assert json_restore.pending(data)
    async with storage.open_store(config=config) as store:  # the documents never changed: roll back
        assert await snapshot(store) == before
    assert [n for n in os.listdir(data) if json_restore.is_restore_entry(n)] == []


async def test_an_intent_after_the_commit_rolls_forward_in_a_process_that_had_the_store_open(tmp_path: Path) -> None:
    """A store already open elsewhere resolves the intent at its next lock, before it writes anything."""
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await populate(store, members=20, messages=200)
    data = Path(config.path)
    record = {"message_id": "1", "guild_id": GUILD, "channel_id": "2", "author_id": "3",
              "timestamp": "2024-01-01T00:00:00.000000Z", "content_length": 1, "attachments": 0, "reactions": 0,
              "analysis": {}}
    async with storage.open_store(config=config) as bystander, storage.open_store(config=config) as restorer:
        staged, _ = json_restore.stage_messages(data, [[record]])
        digest = json_restore.documents_digest(restorer._tables.data)  # type: ignore[attr-defined]
        async with restorer.transaction() as tx:  # as restore_backup does: the intent and swap, then the commit
            json_restore.begin(data, staged, digest, "20240101_000000")
            await tx.put("members", "1_2", {"restored": True})
        # the restorer "crashed" here (its own next lock would resolve it too); the bystander's next write resolves
        await bystander.put("other", "k", {"v": 1})
        assert not json_restore.pending(data)
        messages = [r async for r in bystander.scan_messages(None, None, None)]  # type: ignore[attr-defined]
        assert [m["message_id"] for m in messages] == ["1"]
        assert await bystander.get("members", "1_2") == {"restored": True}


async def test_an_unreadable_intent_refuses_to_open_rather_than_guess(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await store.put("c", "k", {"v": 1})
    (Path(config.path) / json_restore.INTENT_NAME).write_bytes(b'{"token": "../../x"')
    with pytest.raises(storage.CorruptDataError, match="interrupted restore"):
        await storage.open_store(config=config)
    assert (Path(config.path) / json_restore.INTENT_NAME).exists()  # left for a person to look at
