"""kill -9 during a JSON store's restore: the store always opens as the pre-restore state or as the backup.

Issue 11 item 4: 5 of 30 kills once left the documents restored and the message log empty. A real child process
restores; it is killed at many points (spread over the whole run, and densely right around the commit), and each
time the store is opened again and compared, documents and messages alike, with both acceptable states.

A restore whose backup holds the store's current documents (only the messages differ) once changed no document,
wrote no journal record, and was always rolled back while its report said the messages were restored: the commit
is now decided by the restore's own journal record (json/restore.py), checked here by a child killed before each
of its file-system steps in turn, for both kinds of restore.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import storage
from storage import StoreConfig
from storage.backends.json import restore as json_restore
from storage.backends.json.journal import encode_record, record_digest

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


async def _prepare(base: Path, *, members: int = 300, messages: int = 6000, new_messages: int = 2000,
                   documents: str = "changed", extra: int = 0, prune: bool = False,
                   ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A template store with a backup of one state (``backup``) and a different current state (``before``): since
    the backup, ``new_messages`` messages were added (and, with ``prune``, the oldest month pruned), and unless
    ``documents`` is ``"unchanged"`` a third of the members changed, ``extra`` documents were added to a new
    collection and one was deleted."""
    config = _config(base)
    async with storage.open_store(config=config) as store:
        await populate(store, members=members, messages=messages)
        info = await store.create_backup()  # type: ignore[attr-defined]
        backup_state = await snapshot(store)
        if documents == "changed":
            await store.put_many("members", {f"{GUILD}_{1000 + i}": {"changed": i} for i in range(0, members, 3)})
            if extra:
                await store.put_many("extra", {f"e{i}": {"i": i} for i in range(extra)})
            await store.delete("spam_blocker", "z-last")
        await store.record_messages([{
            "message_id": str(90_000 + i), "guild_id": GUILD, "channel_id": "7", "author_id": "1",
            "timestamp": f"2024-05-0{1 + i % 9}T00:00:00Z", "content_length": i} for i in range(new_messages)])
        if prune:
            await store.prune_messages(datetime(2024, 2, 1, tzinfo=timezone.utc))  # type: ignore[attr-defined]
        before_state = await snapshot(store)
    assert before_state != backup_state
    if documents == "unchanged":
        assert {k: v for k, v in before_state.items() if k != "#messages"} == \
            {k: v for k, v in backup_state.items() if k != "#messages"}
    return info.id, backup_state, before_state


async def _reopened(run: Path) -> dict[str, Any]:
    """What a store opened after a killed restore holds; the open resolved the restore and left nothing of it."""
    async with storage.open_store(config=_config(run)) as store:
        state = await snapshot(store)
    assert not json_restore.pending(run / "data"), "opening the store resolves an interrupted restore"
    leftovers = [n for n in os.listdir(run / "data") if json_restore.is_restore_entry(n)]
    assert leftovers == [], leftovers
    return state


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
    backup_id, backup_state, before_state = await _prepare(template, extra=50)

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
        state = await _reopened(run)
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


_ONE_RECORD = {"message_id": "1", "guild_id": GUILD, "channel_id": "2", "author_id": "3",
               "timestamp": "2024-01-01T00:00:00.000000Z", "content_length": 1, "attachments": 0, "reactions": 0,
               "analysis": {}}


def _next_record(store: Any, ops: list[Any]) -> dict[str, Any]:
    """The intent's ``"commit"`` for the record ``ops`` would be, appended next to ``store``'s journal."""
    record = encode_record(ops)
    journal = store._journal
    return {"generation": journal.generation, "offset": journal.offset, "length": len(record),
            "digest": record_digest(record)}


def _legacy_begin(data: Path, staged: Path, digest: str) -> None:
    """What an earlier version wrote before its commit (an intent deciding by the documents' digest, then the
    swap): left by a crash of that version, it is found by this one after an upgrade."""
    token = staged.name[len("messages.restore-"):]
    intent = {"token": token, "backup": "20240101_000000", "before": digest}
    (data / json_restore.INTENT_NAME).write_bytes(json.dumps(intent).encode() + b"\n")
    os.rename(data / "messages", data / f"messages.replaced-{token}")
    os.rename(staged, data / "messages")


async def test_an_intent_left_before_the_commit_rolls_the_messages_back(tmp_path: Path) -> None:
    """The window itself, made by hand: intent written and folders swapped, then no commit (a crash)."""
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await populate(store, members=20, messages=200)
        before = await snapshot(store)
        commit = _next_record(store, [])
    data = Path(config.path)
    staged, count = json_restore.stage_messages(data, [[_ONE_RECORD]])
    assert count == 1
    json_restore.begin(data, staged, "20240101_000000", commit)
    assert json_restore.pending(data)
    async with storage.open_store(config=config) as store:  # the record was never written: roll back
        assert await snapshot(store) == before
    assert [n for n in os.listdir(data) if json_restore.is_restore_entry(n)] == []


async def test_an_intent_whose_empty_record_was_committed_rolls_forward(tmp_path: Path) -> None:
    """A restore that changes no document commits an empty record (``[]``) of its own: the intent naming it rolls
    the messages forward at the next open (the earlier digest rule rolled them back)."""
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await populate(store, members=20, messages=200)
        documents = {k: v for k, v in (await snapshot(store)).items() if k != "#messages"}
        data = Path(config.path)
        staged, _ = json_restore.stage_messages(data, [[_ONE_RECORD]])
        async with store.transaction():  # the lock held, as a restore's commit holds it
            json_restore.begin(data, staged, "20240101_000000", _next_record(store, []))
            await store._commit([], record=encode_record([]))  # type: ignore[attr-defined]  # the empty record
        # the restorer "crashed" here: the next lock (this store's close) finds the intent and the record
    async with storage.open_store(config=config) as store:
        state = await snapshot(store)
    assert [m["message_id"] for m in state.pop("#messages")] == ["1"]
    assert state == documents
    assert not json_restore.pending(data)


async def test_an_intent_after_the_commit_rolls_forward_in_a_process_that_had_the_store_open(tmp_path: Path) -> None:
    """A store already open elsewhere resolves the intent at its next lock, before it writes anything."""
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await populate(store, members=20, messages=200)
    data = Path(config.path)
    async with storage.open_store(config=config) as bystander, storage.open_store(config=config) as restorer:
        staged, _ = json_restore.stage_messages(data, [[_ONE_RECORD]])
        put = ("p", "members", "1_2", b'{"restored":true}')
        async with restorer.transaction() as tx:  # the intent naming the record, the swap, then the commit
            json_restore.begin(data, staged, "20240101_000000", _next_record(restorer, [put]))
            await tx.put("members", "1_2", {"restored": True})
        # the restorer "crashed" here (its own next lock would resolve it too); the bystander's next write resolves
        await bystander.put("other", "k", {"v": 1})
        assert not json_restore.pending(data)
        messages = [r async for r in bystander.scan_messages(None, None, None)]  # type: ignore[attr-defined]
        assert [m["message_id"] for m in messages] == ["1"]
        assert await bystander.get("members", "1_2") == {"restored": True}


@pytest.mark.parametrize("committed", [False, True])
async def test_an_intent_of_an_earlier_version_is_resolved_by_its_digest(tmp_path: Path, committed: bool) -> None:
    """An intent in the earlier format (``"before"``: the documents' digest), left by an older version's crash
    and found after an upgrade: decided as that version did, by whether the documents changed since."""
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await populate(store, members=20, messages=200)
        before = await snapshot(store)
        digest = json_restore.documents_digest(store._tables.data)  # type: ignore[attr-defined]
    data = Path(config.path)
    staged, _ = json_restore.stage_messages(data, [[_ONE_RECORD]])
    async with storage.open_store(config=config) as store:
        async with store.transaction() as tx:  # as that version did: the intent inside the transaction
            _legacy_begin(data, staged, digest)
            if committed:  # its commit (only a changed document wrote a record), then its "crash"
                await tx.put("members", "1_2", {"restored": True})
    async with storage.open_store(config=config) as store:  # (the close above resolved it, by the digest)
        state = await snapshot(store)
    assert not json_restore.pending(data)
    if committed:
        assert [m["message_id"] for m in state["#messages"]] == ["1"]
        assert state["members"]["1_2"] == {"restored": True}
    else:
        assert state == before


async def test_an_intent_names_its_record_and_refuses_older_readers(tmp_path: Path) -> None:
    """The intent an earlier version would misread (deciding by a digest) carries ``"before": null``: that version's
    reader wants a string there and refuses the file instead of rolling back a committed restore."""
    data = tmp_path / "data"
    data.mkdir()
    staged, _ = json_restore.stage_messages(data, [[_ONE_RECORD]])
    json_restore.begin(data, staged, "20240101_000000", {"generation": 1, "offset": 99, "length": 3, "digest": "ab"})
    intent = json.loads((data / json_restore.INTENT_NAME).read_bytes())
    assert intent["before"] is None and intent["commit"]["offset"] == 99
    assert not all(type(intent.get(k)) is str for k in ("token", "backup", "before"))  # the earlier reader's test


async def test_an_unreadable_intent_refuses_to_open_rather_than_guess(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with storage.open_store(config=config) as store:
        await store.put("c", "k", {"v": 1})
    (Path(config.path) / json_restore.INTENT_NAME).write_bytes(b'{"token": "../../x"')
    with pytest.raises(storage.CorruptDataError, match="interrupted restore"):
        await storage.open_store(config=config)
    assert (Path(config.path) / json_restore.INTENT_NAME).exists()  # left for a person to look at


async def test_a_restore_of_unchanged_documents_restores_the_messages(store: Any) -> None:
    """The backup's documents equal the store's: only the messages differ, and they are restored (the JSON store
    once kept its own messages and reported them restored), also after reopening; on both backends."""
    from .test_backup import has_messages
    if not has_messages(store):
        pytest.skip("no message log")
    records = [{"message_id": str(1000 + i), "guild_id": "7", "channel_id": "5", "author_id": "9",
                "timestamp": f"2024-03-0{1 + i % 9}T00:00:00Z", "content_length": 1,
                "analysis": {"sentiment": None, "topics": []}} for i in range(50)]
    await store.record_messages(records)
    await store.put("c", "k", {"x": 1})
    info = await store.create_backup()
    await store.record_messages([{**r, "message_id": str(900_000 + i), "guild_id": "8"}
                                 for i, r in enumerate(records[:3])])
    report = await store.restore_backup(info.id)
    assert report.messages == (53, 50)
    assert all((c.added, c.changed, c.removed) == (0, 0, 0) for c in report.collections.values())  # none changed
    assert await store.message_counts(8) == 0 and await store.message_counts(7) == 50
    assert await store.get("c", "k") == {"x": 1}
    config = store.config
    await store.close()
    async with storage.open_store(config=config) as again:
        assert await again.message_counts(8) == 0 and await again.message_counts(7) == 50


STEP_CHILD = r"""
import asyncio, json, os, signal, sys
import storage
from storage.progress import Progress

kill_at = int(sys.argv[3])  # kill itself before this file-system step of the restore's commit (-1: never)
state = {"armed": False, "steps": 0}

def wrap(name):
    real = getattr(os, name)
    def step(*args, **kwargs):
        if state["armed"]:
            if state["steps"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            state["steps"] += 1
        return real(*args, **kwargs)
    setattr(os, name, step)

for name in ("open", "write", "pwrite", "fsync", "fdatasync", "ftruncate", "rename", "replace", "unlink", "rmdir",
             "mkdir"):
    if hasattr(os, name):
        wrap(name)

class Phases(Progress):
    def phase(self, name, total):
        if name == "restore: documents":  # the safety backup is written; the transaction's changes and commit follow
            state["armed"] = True

async def main():
    store = await storage.open_store(config=storage.StoreConfig(**json.loads(sys.argv[1])))
    await store.restore_backup(sys.argv[2], progress=Phases())
    state["armed"] = False
    print("STEPS", state["steps"], flush=True)
    await store.close()
asyncio.run(main())
"""


def _step_child(config: StoreConfig, backup_id: str, kill_at: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", STEP_CHILD, json.dumps(dataclasses.asdict(config)), backup_id,
                             str(kill_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
@pytest.mark.parametrize("documents", ["unchanged", "changed"])
async def test_kill_9_before_every_step_of_a_restore_commit(tmp_path: Path, documents: str) -> None:
    """A real child restores and SIGKILLs itself just before its n-th file-system call (open, write, fsync,
    rename, unlink...) from the document phase on (the transaction, the intent, the swap, the journal commit,
    the resolution, the cleanup), for every n. Each time the reopened store holds the pre-restore state or the
    backup's, documents and messages alike, never a mix: the pre-restore state up to the commit, the backup's from
    it on (one switch), and the backup's after an undisturbed run."""
    template = tmp_path / "template"
    backup_id, backup_state, before_state = await _prepare(template, members=30, messages=400, new_messages=300,
                                                            documents=documents, prune=documents == "unchanged")

    run = tmp_path / "run"
    shutil.copytree(template, run)
    child = _step_child(_config(run), backup_id, -1)
    out, err = child.communicate()
    assert child.returncode == 0, err
    total = int(out.split()[-1])
    async with storage.open_store(config=_config(run)) as store:
        assert await snapshot(store) == backup_state, "an undisturbed restore gives the backup's state"
    shutil.rmtree(run)

    outcomes: list[str] = []
    for kill_at in range(total):
        run = tmp_path / f"run{kill_at}"
        shutil.copytree(template, run)
        child = _step_child(_config(run), backup_id, kill_at)
        _out, err = child.communicate()
        assert child.returncode == -signal.SIGKILL, f"step {kill_at} of {total}: {err}"
        state = await _reopened(run)
        if state == before_state:
            outcomes.append("before")
        elif state == backup_state:
            outcomes.append("backup")
        else:
            raise AssertionError(f"a kill before step {kill_at} of {total} left a mixed state")
        shutil.rmtree(run)
    print(f"{documents} documents, {total} steps: {''.join(o[1] for o in outcomes)} (e: before, a: backup)")
    switch = outcomes.index("backup") if "backup" in outcomes else len(outcomes)
    assert outcomes == ["before"] * switch + ["backup"] * (len(outcomes) - switch), outcomes
    assert 0 < switch < len(outcomes), "kills land both before and after the commit"
