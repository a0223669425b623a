"""A commit of puts that takes the store lock far behind the journal writes first and catches up after letting go
(json/holding.py ``_defer_catch_up``, json/store.py ``_commit_deferred``, issue 15).

What must hold, with real files, real locks and real processes: the record goes exactly where the committed records
end; the others' records and then its own are applied before the save returns (the view equals the disk at every
acknowledgement, and watchers hear every change once, in journal order); a failed fdatasync leaves the record
unseen and unacknowledged, the others' records applied and the store usable; a cancellation at any point leaves the
save all there or not there at all; writer processes that defer, update and delete agree with the journal.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest

from storage import StorageIOError, StoreConfig
from storage.backends.json import holding
from storage.backends.json.lock import SidecarLock
from storage.backends.json.store import JOURNAL_NAME, LOCK_NAME
from storage.stores import JsonStore
from tests._cancel import cancel_after
from tests._proc import ROOT


def cfg(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=60, source="tests")


def journal_state(folder: Path) -> dict[str, dict[str, Any]]:
    """A plain-Python reference of what the disk holds: the snapshot files (plain JSON) with the journal's records
    replayed over them in order."""
    state: dict[str, dict[str, Any]] = {
        path.stem: orjson.loads(path.read_bytes()) for path in folder.glob("*.json")
        if not path.name.startswith("storage.")}
    for line in (folder / JOURNAL_NAME).read_bytes().split(b"\n")[1:]:
        if not line.strip():
            continue
        for op in orjson.loads(line):
            coll = state.setdefault(op[1], {})
            if op[0] == "p":
                coll[op[2]] = op[3]
            else:
                coll.pop(op[2], None)
    return {name: docs for name, docs in state.items() if docs}


async def view(store: JsonStore) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in await store.collections():
        docs = {key: doc async for key, doc in store.items(name)}
        if docs:
            out[name] = docs
    return out


class Deferring:
    """Two stores on one folder (``flock`` locks belong to the open file description: they exclude each other as
    two processes do): ``behind`` falls behind while ``ahead`` writes, and defers its catch-up at its next put
    (a waiter is made to seem present, and any backlog is enough)."""

    def __init__(self, ahead: JsonStore, behind: JsonStore) -> None:
        self.ahead, self.behind = ahead, behind
        self.deferred = 0
        original = behind._commit_deferred

        def counted(ops: Any, record: bytes, claims: bool = False) -> None:
            self.deferred += 1
            original(ops, record, claims)

        behind._commit_deferred = counted  # type: ignore[method-assign]
        behind._flock.waited_for = lambda: True  # type: ignore[method-assign]
        # Only an inline commit defers (a threaded one catches up first). Whether a commit goes inline is learned
        # from how long appends took: on a disk whose fsync takes milliseconds (seen on a shared host) they all
        # went to a thread and nothing deferred. Here every small record stays inline, whatever the disk.
        behind._learn_sync = lambda size, spent: None  # type: ignore[method-assign]

        # A watcher's feed follows the journal whenever the loop turns (inotify): here ``behind`` catches up only
        # through its own commits, so that it is behind when a test wants it to be. What it applies still reaches
        # its watchers (Tables.apply tells the change feed).
        async def idle() -> None:
            pass

        behind._feed._catch_up_now, behind._feed._refresh = (lambda: False), idle  # type: ignore[method-assign]

    async def backlog(self, n: int, tag: str) -> None:
        """``ahead`` commits ``n`` records ``behind`` has not read (its lease ended first)."""
        self.behind._lease.end()
        for i in range(n):
            await self.ahead.put("c", f"{tag}{i % 7}", {"tag": tag, "i": i})
            if i % 3 == 0:
                await self.ahead.delete("c", f"{tag}{(i + 2) % 7}")
        self.ahead._lease.end()


@pytest.fixture
async def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(holding, "DEFER_BYTES", 1)
    ahead = await JsonStore.open(cfg(tmp_path))
    behind = await JsonStore.open(cfg(tmp_path))
    try:
        yield Deferring(ahead, behind)
    finally:
        await behind.close()
        await ahead.close()


async def test_a_deferred_commit_applies_the_others_then_its_own_before_it_returns(pair: Deferring,
                                                                                  tmp_path: Path) -> None:
    async with pair.behind.watch("c") as watch:
        for round_ in range(3):
            await pair.backlog(20, f"r{round_}-")
            await pair.behind.put("c", f"own{round_}", {"round": round_})
            assert pair.deferred == round_ + 1, "the put deferred its catch-up"
            assert pair.behind._journal.offset == pair.behind._flock.committed().end
            assert await view(pair.behind) == journal_state(tmp_path)  # at the acknowledgement, with no read between
        # the watcher heard every change once, in journal order (deletes only of keys that were there)
        heard = []
        while watch.pending():
            change = await watch.__anext__()
            heard.append((change.key, change.op, change.doc))
    expected = []
    present: set[str] = set()
    for line in (tmp_path / JOURNAL_NAME).read_bytes().split(b"\n")[1:]:
        if line.strip():
            for op in orjson.loads(line):
                if op[0] == "p":
                    expected.append((op[2], "put", op[3]))
                    present.add(op[2])
                elif op[2] in present:
                    expected.append((op[2], "delete", None))
                    present.discard(op[2])
    assert heard == expected
    async with await JsonStore.open(cfg(tmp_path)) as fresh:
        assert await view(fresh) == journal_state(tmp_path) == await view(pair.ahead)


async def test_the_lock_is_handed_over_before_the_apply(pair: Deferring, tmp_path: Path) -> None:
    """A deferred commit lets go (SidecarLock.hand_over: the unlock, then one sched_yield) before it applies the
    others' records: another holder can take the lock while the apply runs, and the view is right after it."""
    other = SidecarLock(tmp_path / LOCK_NAME)
    taken: list[bool] = []
    tables = pair.behind._tables
    apply_after = tables.apply_after

    def apply_while_another_holds(start: int, stop: int, ops: Any) -> None:
        got = other.try_acquire()
        taken.append(got)
        try:
            apply_after(start, stop, ops)
        finally:
            if got:
                other.release()

    tables.apply_after = apply_while_another_holds  # type: ignore[method-assign]
    try:
        for round_ in range(2):
            await pair.backlog(10, f"h{round_}-")
            await pair.behind.put("c", f"mine{round_}", {"round": round_})
        assert pair.deferred == 2 and taken == [True, True]
        assert not pair.behind._flock.held
        assert await view(pair.behind) == journal_state(tmp_path) == await view(pair.ahead)
    finally:
        other.close()


def test_hand_over_lets_go_once(tmp_path: Path) -> None:
    """hand_over is release (and a yield): the lock is free after it, and a second call, not holding, does nothing."""
    lock, other = SidecarLock(tmp_path / LOCK_NAME), SidecarLock(tmp_path / LOCK_NAME)
    try:
        assert lock.try_acquire()
        assert not other.try_acquire()
        lock.hand_over()
        assert not lock.held
        lock.hand_over()  # not held: nothing (as release)
        assert other.try_acquire()
        assert not lock.try_acquire()
        other.release()
    finally:
        lock.close()
        other.close()


async def test_an_update_catches_up_under_the_lock_first(pair: Deferring, tmp_path: Path) -> None:
    await pair.ahead.put("c", "n", {"n": 1})
    await pair.backlog(20, "u")
    assert await pair.behind.update("c", "n", lambda d: {"n": d["n"] + 1}) == {"n": 2}
    assert pair.deferred == 0, "an update reads the view: no deferral"
    assert await view(pair.behind) == journal_state(tmp_path)


async def test_another_process_compacts_between_the_publish_and_the_apply(pair: Deferring, tmp_path: Path) -> None:
    """The lock is let go before the apply: another process may take it and compact (snapshots rewritten, a new
    journal file) while this one still reads the records before its own from the old file."""
    tables = pair.behind._tables
    original = tables.apply_after
    ahead = pair.ahead

    def compact_first(start: int, stop: int, ops: Any) -> None:
        ahead._flock.acquire(5)  # as another process would, now that the lock is free
        try:
            ahead._tables.catch_up()
            ahead._tables.compact()
        finally:
            ahead._flock.release()
        original(start, stop, ops)

    tables.apply_after = compact_first  # type: ignore[method-assign]
    async with pair.behind.watch("c") as watch:
        await pair.backlog(20, "c")
        await pair.behind.put("c", "mine", {"n": 1})
        tables.apply_after = original  # type: ignore[method-assign]
        assert pair.deferred == 1
        assert ahead._journal.generation == 2, "the compaction happened"
        assert await pair.behind.get("c", "mine") == {"n": 1}
        assert await view(pair.behind) == journal_state(tmp_path)  # the new snapshots, the new journal
        await pair.ahead.put("c", "next", {"n": 2})  # in the new generation
        await pair.behind.put("c", "mine2", {"n": 3})
        assert await view(pair.behind) == await view(pair.ahead) == journal_state(tmp_path)
        keys = []
        while watch.pending():
            keys.append((await watch.__anext__()).key)
    assert keys[-3:] == ["mine", "next", "mine2"] and keys.count("mine") == 1
    async with await JsonStore.open(cfg(tmp_path)) as fresh:
        assert await view(fresh) == await view(pair.behind)


class FailingSync:
    """``os.fdatasync`` failing with EIO on its next call when armed (every thread counts)."""

    def __init__(self) -> None:
        self.real = os.fdatasync
        self.armed = False
        self.failed = 0

    def __call__(self, fd: int) -> None:
        if self.armed:
            self.armed = False
            self.failed += 1
            raise OSError(errno.EIO, "injected fdatasync failure")
        self.real(fd)


async def test_a_failed_fdatasync_in_a_deferred_commit_is_never_seen(pair: Deferring, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sync = FailingSync()
    monkeypatch.setattr(os, "fdatasync", sync)
    await pair.backlog(20, "f")
    before = journal_state(tmp_path)
    original = pair.behind._commit_deferred

    def failing(ops: Any, record: bytes, claims: bool = False) -> None:
        sync.armed = True  # the deferred record's own fdatasync
        original(ops, record, claims)

    pair.behind._commit_deferred = failing  # type: ignore[method-assign]
    with pytest.raises(StorageIOError):
        await pair.behind.put("c", "lost", {"n": 0})
    assert sync.failed == 1 and pair.deferred == 1
    pair.behind._commit_deferred = original  # type: ignore[method-assign]
    # never acknowledged, never seen; the others' records are there
    assert await pair.behind.get("c", "lost") is None
    assert await pair.ahead.get("c", "lost") is None
    assert journal_state(tmp_path) == before == await view(pair.behind)
    # usable: the next commits go through (the journal is rewritten first) and everyone sees them
    await pair.behind.put("c", "after", {"n": 1})
    await pair.ahead.put("c", "after2", {"n": 2})
    assert await pair.behind.get("c", "after2") == {"n": 2}
    assert await pair.ahead.get("c", "after") == {"n": 1}
    async with await JsonStore.open(cfg(tmp_path)) as fresh:
        assert await view(fresh) == await view(pair.behind) == await view(pair.ahead)
        assert await fresh.get("c", "lost") is None


async def test_a_save_cancelled_at_any_point_is_all_there_or_not_at_all(pair: Deferring, tmp_path: Path) -> None:
    turns = 0
    while True:
        await pair.backlog(10, f"t{turns}-")
        key = f"cancel{turns}"
        cancelled = await cancel_after(partial(pair.behind.put, "c", key, {"turns": turns}), turns)
        on_disk = journal_state(tmp_path)
        assert await view(pair.behind) == on_disk, f"view equals disk after a cancellation at turn {turns}"
        if not cancelled:
            assert on_disk["c"][key] == {"turns": turns}
            break
        turns += 1
        assert turns < 400, "the save never completed"
    assert pair.deferred >= 1


WRITER = r'''
import asyncio, json, random, sys
import storage
from storage.backends.json import holding
from storage.backends.json import store as json_store

holding.DEFER_BYTES = 1  # any backlog
deferred = 0
original = json_store.JsonBackend._commit_deferred
def counted(self, ops, record, claims=False):
    global deferred
    deferred += 1
    original(self, ops, record, claims)
json_store.JsonBackend._commit_deferred = counted
claimed = 0
original_claim = json_store.JsonBackend._claim
def claim_counted(self, start, record, ops):
    global claimed
    found = original_claim(self, start, record, ops)
    claimed += len(found[1])
    return found
json_store.JsonBackend._claim = claim_counted

async def main(path, me, count, slots):
    store = await storage.open_store(backend="json", path=path)
    if not slots:
        store._slots.close()  # no offers to the holder: each commits its own (the deferral's path)
    else:
        holding.OFFER_MIN_SYNC = 0.0  # whatever this disk's fsyncs take (tests/conftest.py offers_always)
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    rng = random.Random(me)
    increments = 0
    for i in range(count):
        roll = rng.random()
        key = f"k{rng.randrange(12)}"
        if roll < 0.1:
            await store.update("c", "counter", lambda d: {"n": d.get("n", 0) + 1}, default={})
            increments += 1
        elif roll < 0.2:
            await store.delete("c", key)
        elif roll < 0.25:
            await store.put_many("c", {key: {"w": me, "i": i}, f"m{me}": {"w": me, "i": i}})
        else:
            await store.put("c", key, {"w": me, "i": i})
    print("WROTE", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # every writer is done
    docs = {k: d async for k, d in store.items("c")}
    print(json.dumps({"view": docs, "increments": increments, "deferred": deferred, "claimed": claimed}),
          flush=True)
    await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
'''


@pytest.mark.parametrize("slots", [False, True], ids=["own-commits", "slots"])
async def test_writer_processes_that_defer_agree_with_the_journal(tmp_path: Path, slots: bool) -> None:
    """Three processes writing puts, batches, updates (a counter) and deletes to overlapping keys, as fast as they
    can: each one's view, a fresh open and the journal replayed in order agree, and no increment is lost. With
    ``slots`` the waiting writers' puts are committed by the holder (json/slots.py), else each commits its own."""
    holder = await JsonStore.open(cfg(tmp_path))  # open throughout: no writer's close is the last (it would fold)
    try:
        await holder.put("c", "seed", {"n": 0})
        results = await run_writers(tmp_path, 3, 400, slots)
        reference = journal_state(tmp_path)["c"]
        assert reference["counter"]["n"] == sum(r["increments"] for r in results), "an update lost an increment"
        for result in results:
            assert result["view"] == reference
        assert {k: d async for k, d in holder.items("c")} == reference
        async with await JsonStore.open(cfg(tmp_path)) as fresh:
            assert {k: d async for k, d in fresh.items("c")} == reference
    finally:
        await holder.close()
    # not a timed assert: with three writers saving back to back some commit finds others waiting and a backlog
    if slots:
        assert sum(r["claimed"] for r in results) > 0, "no holder committed another's put: the path was not tested"
    else:
        assert sum(r["deferred"] for r in results) > 0, "no commit deferred its catch-up: the path was not tested"


async def run_writers(folder: Path, count: int, steps: int, slots: bool = False) -> list[dict[str, Any]]:
    """Start ``count`` WRITER processes together; once all have written, each reports its view."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    children = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(me), str(steps), str(int(slots))],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env) for me in range(count)]

    async def line(child: subprocess.Popen[str]) -> str:
        assert child.stdout is not None
        got = await asyncio.to_thread(child.stdout.readline)
        if not got:
            raise AssertionError(f"a writer ended early: {child.stderr.read() if child.stderr else ''}")
        return got.strip()

    def tell(word: str) -> None:
        for child in children:
            assert child.stdin is not None
            child.stdin.write(word + "\n")
            child.stdin.flush()

    try:
        for child in children:
            assert await line(child) == "READY"
        tell("go")
        for child in children:
            assert await line(child) == "WROTE"
        tell("dump")  # every writer is done: each one's view is the final state
        results = [json.loads(await line(child)) for child in children]
        for child in children:
            assert await asyncio.to_thread(child.wait, 60) == 0
        return results
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
