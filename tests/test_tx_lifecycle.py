"""forget_guild / forget_user / export_user / prune_messages inside a transaction (issue 14), on both backends.

A forget or a prune in a transaction is part of it: if the block raises or is cancelled, nothing is forgotten; if
it commits, everything is (documents and message records), and the transaction's own later reads (documents,
exports, dry runs) already see the forgotten data as absent. Property-style: random sequences of forgets, prunes,
puts and deletes (a put of a key a forget removed, two forgets of overlapping data...) are checked call by call and
at the end against a plain-Python reference that scans everything, then committed or abandoned. A cancellation at
every loop turn leaves all or nothing; on JSON, faults at each step of the commit and a real child process killed
at many points (``kill -9``) leave the pre-transaction state or the committed one, never a mix.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import storage
from storage.backends.json import forget_files, tx_messages
from storage.ownership import Owner
from tests._cancel import all_or_nothing_at_every_turn
from tests._proc import read_until
from tests.test_feed import next_change
from tests.test_json_disk_faults import PAD, SmallDisk, assert_io_error, small_disk  # noqa: F401 (a fixture)
from tests.test_lifecycle import GUILDS, USERS, State, everything, expected_counts, fill, minus, owned

ROOT = Path(__file__).resolve().parent.parent


class Abandon(Exception):
    """Raised by a transaction body that must not commit."""


# -- the reference -------------------------------------------------------------------------------------------------
def _when(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def pruned(state: State, before: str, guild: str | None) -> State:
    """What ``prune_messages(before, guild_id=guild)`` removes from ``state``."""
    bound = _when(before)
    return {}, {m: r for m, r in state[1].items()
                if (guild is None or r["guild_id"] == guild) and _when(r["timestamp"]) < bound}


def export_of(state: State, user: str, guild: str | None) -> tuple[dict[Any, Any], list[Any]]:
    """What ``export_user`` must show: the owned documents and the records by (timestamp, id)."""
    docs, records = owned(state, Owner(guild=guild, user=user))
    return docs, sorted(records.values(), key=lambda r: (_when(r["timestamp"]), int(r["message_id"])))


def shown(exported: dict[str, Any]) -> tuple[dict[Any, Any], list[Any]]:
    """An export as ``export_of`` states it."""
    user = exported["user_id"]
    docs = {("members", f"{g}_{user}"): d for g, d in exported["members"].items()}
    docs.update({(c, k): d for c, found in exported["documents"].items() for k, d in found.items()})
    return docs, exported["messages"]


async def tx_state(tx: Any) -> State:
    """Everything as the transaction sees it: every document, and every record through the exports of every
    author (the records' authors are all in USERS)."""
    docs = {(c, k): d for c in await tx.collections() async for k, d in tx.items(c)}
    messages: dict[str, Any] = {}
    for user in USERS:
        for record in (await tx.export_user(user))["messages"]:
            messages[record["message_id"]] = record
    return docs, messages


async def consistent(store: Any) -> State:
    """Everything in one snapshot. (PostgreSQL: a transaction abandoned by a cancellation during its COMMIT may
    still commit on the server a moment later, and reading the documents and the records at two instants could
    straddle it.)"""
    async with store.transaction() as tx:
        await tx.pin_snapshot()
        return await tx_state(tx)


def no_leftovers(store: Any) -> None:
    """A JSON store has no forget in progress and no staged files once a transaction is over."""
    if isinstance(store, storage.JsonStore):
        assert not [p.name for p in store.path.iterdir() if p.name.startswith("storage.forget")]


# -- random operations -----------------------------------------------------------------------------------------------
def random_ops(rng: random.Random, keys: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    for _ in range(rng.randrange(2, 9)):
        kind = rng.choice(["guild", "user", "user", "prune", "put", "delete", "dry", "export"])
        guild = rng.choice([None, *GUILDS])
        if kind == "guild":
            ops.append(("guild", rng.choice(GUILDS)))
        elif kind in ("user", "dry", "export"):
            ops.append((kind, rng.choice(USERS), guild))
        elif kind == "prune":
            ops.append(("prune", f"2024-{rng.randrange(1, 6):02d}-{rng.randrange(1, 28):02d}T"
                                  f"{rng.randrange(24):02d}:30:00Z", guild))
        elif kind == "put":  # often a key a forget of this transaction removed
            collection, key = rng.choice(keys)
            ops.append(("put", collection, key, {"again": rng.randrange(1000), "ü": [1, 2]}))
        else:
            ops.append(("delete", *rng.choice(keys)))
    return ops


async def run_ops(tx: Any, ops: list[tuple[Any, ...]], state: State) -> State:
    """Run ``ops`` on ``tx``, each checked against the reference; returns the reference after them."""
    for op in ops:
        if op[0] == "guild":
            gone = owned(state, Owner(guild=op[1]))
            assert await tx.forget_guild(op[1]) == expected_counts(gone), op
            state = minus(state, gone)
        elif op[0] == "user":
            gone = owned(state, Owner(guild=op[2], user=op[1]))
            assert await tx.forget_user(op[1], guild_id=op[2]) == expected_counts(gone), op
            state = minus(state, gone)
        elif op[0] == "prune":
            gone = pruned(state, op[1], op[2])
            assert await tx.prune_messages(op[1], guild_id=op[2]) == len(gone[1]), op
            state = minus(state, gone)
        elif op[0] == "put":
            await tx.put(op[1], op[2], op[3])
            state = ({**state[0], (op[1], op[2]): op[3]}, state[1])
        elif op[0] == "delete":
            assert await tx.delete(op[1], op[2]) == ((op[1], op[2]) in state[0]), op
            state = ({k: v for k, v in state[0].items() if k != (op[1], op[2])}, state[1])
        elif op[0] == "dry":
            assert await tx.forget_user(op[1], guild_id=op[2], dry_run=True) == \
                expected_counts(owned(state, Owner(guild=op[2], user=op[1]))), op
        else:
            assert shown(await tx.export_user(op[1], guild_id=op[2])) == export_of(state, op[1], op[2]), op
    return state


@pytest.mark.parametrize("seed", range(8))
async def test_random_forgets_in_a_transaction_commit_or_vanish_with_it(
        store: storage.Store, reopen: Callable[[], Awaitable[Any]], seed: int):
    rng = random.Random(seed)
    await fill(store, seed=seed, messages=250)
    before = await everything(store)
    keys = sorted(before[0])
    for round_ in range(3):
        ops = random_ops(rng, keys)
        commit = round_ != 1 if seed % 2 else round_ == 1
        state = await everything(store)
        expected = state
        try:
            async with store.transaction() as tx:
                expected = await run_ops(tx, ops, copy.deepcopy(state))
                assert await tx_state(tx) == expected  # read-your-writes, documents and records alike
                if not commit:
                    raise Abandon
        except Abandon:
            expected = state
        assert await everything(store) == expected, (ops, commit)
        no_leftovers(store)
    other = await reopen()  # what is on disk (another process's view) is the same
    try:
        assert await everything(other) == await everything(store)
    finally:
        await other.close()


async def test_two_forgets_and_a_put_back_in_one_transaction(store: storage.Store):
    """The cases the JSON protocol must get right: a forget then a put of a key it removed (the documents alone
    can no longer tell whether the forget committed), a forget of a guild after a forget of a user in it, a prune
    after both, a transaction whose only change is to message records."""
    await fill(store)
    before = await everything(store)
    async with store.transaction() as tx:
        await tx.forget_user("12")
        await tx.put("members", "1_12", {"back": True})
        await tx.forget_guild("112")
        assert await tx.get("members", "1_12") == {"back": True}
        assert await tx.get("members", "112_2") is None
        await tx.prune_messages("2024-03-15T12:00:00Z", guild_id="2")
    state = minus(before, owned(before, Owner(user="12")))
    state = ({**state[0], ("members", "1_12"): {"back": True}}, state[1])
    state = minus(state, owned(state, Owner(guild="112")))
    state = minus(state, pruned(state, "2024-03-15T12:00:00Z", "2"))
    assert await everything(store) == state
    only_messages = pruned(state, "2024-02-01T00:00:00Z", None)
    assert only_messages[1]
    async with store.transaction() as tx:
        assert await tx.prune_messages("2024-02-01T00:00:00Z") == len(only_messages[1])
    assert await everything(store) == minus(state, only_messages)
    no_leftovers(store)


async def test_a_cancellation_at_any_loop_turn_forgets_all_or_nothing(store: storage.Store):
    await fill(store, messages=200)
    before = await everything(store)
    after = minus(before, owned(before, Owner(user="12")))
    after = ({**after[0], ("members", "1_12"): {"back": True}}, after[1])
    after = minus(after, owned(after, Owner(guild="112")))
    after = minus(after, pruned(after, "2024-02-10T00:00:00Z", "2"))

    async def work() -> None:
        async with store.transaction() as tx:
            await tx.forget_user("12")
            await tx.put("members", "1_12", {"back": True})
            await tx.forget_guild("112")
            await tx.prune_messages("2024-02-10T00:00:00Z", guild_id="2")

    await all_or_nothing_at_every_turn(work, lambda: consistent(store), before, after,
                                       check=lambda: no_leftovers(store))


async def test_watchers_and_caches_hear_of_a_forget_only_when_it_commits(
        store: storage.Store, reopen: Callable[[], Awaitable[Any]]):
    other = await reopen()
    try:
        await store.save_member_data(11, 1, {"statistics": {"message_count": 1}})
        await store.save_member_data(12, 1, {"statistics": {"message_count": 2}})
        await store.save_member_data(11, 2, {"statistics": {"message_count": 3}})
        assert (await other.get_member_data(11, 2))["statistics"]["message_count"] == 3  # cached there
        async with other.watch("members") as watch:
            # A watch hears what is published from its creation on: on PostgreSQL the saves above may still be on
            # their way to the other store's listener. A sentinel marks where this test's changes begin.
            await store.put("members", "0_0", {"start": True})
            while tuple(await next_change(watch))[:3] != ("members", "0_0", "put"):
                pass
            with pytest.raises(Abandon):
                async with store.transaction() as tx:
                    assert await tx.forget_guild(2) == {"members": 1}
                    raise Abandon
            async with store.transaction() as tx:
                assert await tx.forget_user(12) == {"members": 1}
            await store.put("members", "3_1", {"sentinel": True})
            got = [tuple(await next_change(watch))[:3] for _ in range(2)]
            assert got == [("members", "1_12", "delete"), ("members", "3_1", "put")]
        assert await other.get_member_data(12, 1) == {}
        assert (await other.get_member_data(11, 2))["statistics"]["message_count"] == 3
    finally:
        await other.close()


async def test_message_writes_meanwhile_are_kept_and_ids_stay_unique(
        store: storage.Store, reopen: Callable[[], Awaitable[Any]]):
    """A record written by another task while the transaction is open lands after the forget (JSON: it waits for
    the transaction's lock; PostgreSQL: the forget's DELETE ran before it): it is kept. Afterwards the forgotten
    ids can be recorded again, and the kept ones are still known, here and in another store."""
    await fill(store, messages=120)
    before = await everything(store)
    forgotten = sorted(owned(before, Owner(user="12"))[1])
    kept = sorted(minus(before, owned(before, Owner(user="12")))[1])
    fresh = {"message_id": "99999", "guild_id": "1", "channel_id": "5", "author_id": "12",
             "timestamp": "2024-02-02T00:00:00Z", "content_length": 3}
    go = asyncio.Event()

    async def writer() -> bool:  # started outside the transaction: its own task, not the transaction's
        await go.wait()
        return await store.record_message(fresh)

    written = asyncio.ensure_future(writer())
    async with store.transaction() as tx:
        await tx.forget_user("12")
        go.set()
        await asyncio.sleep(0.05)
    assert await written is True
    _docs, messages = await everything(store)
    assert "99999" in messages and not set(forgotten) & set(messages)
    other = await reopen()
    try:
        again = before[1][forgotten[0]]
        assert await other.record_message(again) is True  # gone, so new again
        assert await store.record_message(before[1][kept[0]]) is False  # still there
        assert await store.record_message(again) is False  # recorded by the other store just now
    finally:
        await other.close()


async def test_expired_documents_in_a_transaction_are_removed_but_neither_shown_nor_counted(store_config: Any):
    from tests.test_ttl import Clock

    clock = Clock()
    async with storage.open_store(config=dataclasses.replace(store_config, clock=clock)) as store:
        await store.put("cooldowns", "1_12", {"until": "soon"}, ttl=30)
        await store.put("cooldowns", "2_12", {"until": "later"}, ttl=3000)
        await store.save_member_data("12", "1", {"roles": []})
        clock.at(60)  # 1_12 expired: absent for the transaction's lifecycle calls too
        async with store.transaction() as tx:
            await tx.put("cooldowns", "3_12", {"until": "new"}, ttl=30)  # this transaction's own, visible
            assert (await tx.export_user("12"))["documents"] == {
                "cooldowns": {"2_12": {"until": "later"}, "3_12": {"until": "new"}}}
            assert await tx.forget_user("12", dry_run=True) == {"cooldowns": 2, "members": 1}
            assert await tx.forget_user("12") == {"cooldowns": 2, "members": 1}
            assert await tx.forget_user("12", dry_run=True) == {}
        clock.at(-60)  # back before it expired: the expired document was removed too (it was the user's data)
        assert await store.get("cooldowns", "1_12") is None and await store.count("cooldowns") == 0


async def test_bad_arguments_in_a_transaction_change_nothing(store: storage.Store):
    await fill(store, messages=30)
    before = await everything(store)
    async with store.transaction() as tx:
        for call in (lambda: tx.forget_guild("abc"), lambda: tx.forget_user("1", guild_id="x"),
                     lambda: tx.forget_guild("1", dry_run=1), lambda: tx.prune_messages(None),
                     lambda: tx.prune_messages("2024-01-01", guild_id="g"), lambda: tx.export_user(-3)):
            with pytest.raises(storage.ValidationError):
                await call()
        await tx.put("extra", "k", {"v": 1})
    assert await everything(store) == ({**before[0], ("extra", "k"): {"v": 1}}, before[1])


async def test_a_finished_transaction_refuses_them(store: storage.Store):
    async with store.transaction() as tx:
        pass
    with pytest.raises(storage.DatabaseError, match="finished"):
        await tx.forget_guild("1")
    with pytest.raises(storage.DatabaseError, match="finished"):
        await tx.prune_messages("2024-01-01")


# -- JSON: faults at each step of the commit, and real crashes -------------------------------------------------------
@pytest.fixture
def json_store(backend: str, store: storage.Store) -> Any:
    if backend != "json":
        pytest.skip("the JSON backend's files")
    return store


def _eio(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EIO, "Input/output error")


async def test_a_failed_staging_leaves_the_call_undone_and_the_rest_commits(json_store: Any,
                                                                            monkeypatch: pytest.MonkeyPatch):
    await fill(json_store)
    before = await everything(json_store)

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with json_store.transaction() as tx:
        monkeypatch.setattr(tx_messages, "write_all", full)
        with pytest.raises(storage.StorageIOError, match="No space left"):
            await tx.forget_user("12")
        monkeypatch.undo()
        assert await tx_state(tx) == before  # the failed call left nothing staged, documents nor records
        await tx.put("extra", "k", {"v": 1})
        assert await tx.forget_guild("21") == expected_counts(owned(before, Owner(guild="21")))
    state = ({**before[0], ("extra", "k"): {"v": 1}}, before[1])
    assert await everything(json_store) == minus(state, owned(state, Owner(guild="21")))
    no_leftovers(json_store)


@pytest.mark.parametrize("where", ["finish", "intent", "swap", "journal"])
async def test_a_fault_in_the_commit_leaves_nothing_committed(json_store: Any, monkeypatch: pytest.MonkeyPatch,
                                                              where: str):
    """ENOSPC/EIO at each step before the journal record is durable: the transaction raises, and the documents
    and the records are as before it (the intent, if written, is rolled back at once)."""
    await fill(json_store)
    before = await everything(json_store)
    if where == "finish":
        monkeypatch.setattr(forget_files, "sync_all", _eio)
    elif where == "intent":
        monkeypatch.setattr(forget_files, "atomic_write", _eio)
    elif where == "swap":
        real = forget_files.os.replace
        calls = {"n": 0}

        def flaky(src: Any, dst: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 4:  # the intent, the generation, one file moved: half-way through the swap
                raise OSError(errno.EIO, "Input/output error")
            real(src, dst)

        monkeypatch.setattr(forget_files.os, "replace", flaky)
    else:
        monkeypatch.setattr(json_store._journal, "append", _eio)
    with pytest.raises(storage.DatabaseError, match="Input/output"):
        async with json_store.transaction() as tx:
            await tx.forget_user("12")
            await tx.put("members", "1_12", {"back": True})
            await tx.forget_guild("112")
    monkeypatch.undo()
    assert not forget_files.pending(json_store.path)
    assert await everything(json_store) == before
    no_leftovers(json_store)
    async with json_store.transaction() as tx:  # and the store goes on
        await tx.forget_guild("112")
    assert await everything(json_store) == minus(before, owned(before, Owner(guild="112")))


@pytest.mark.parametrize("room", [0, 4096, 12288], ids=["full", "one-page-left", "three-pages-left"])
async def test_a_transaction_forget_on_a_real_full_disk(small_disk: SmallDisk, room: int):  # noqa: F811
    """A real ENOSPC (a small tmpfs filled up, the fixture of tests/test_json_disk_faults.py) wherever the space
    runs out: the transaction raises StorageIOError, nothing is forgotten, nothing is left behind, and the same
    store forgets it all once there is room."""
    assert os.path.ismount(small_disk.mountpoint)  # never fill anything but the test's own tmpfs
    cfg = storage.StoreConfig(backend="json", path=str(small_disk.mountpoint / "data"), lock_timeout=30,
                              source="tests")
    async with storage.open_store(config=cfg) as store:
        await fill(store, messages=600)
        before = await everything(store)

        async def forget() -> None:
            async with store.transaction() as tx:
                await tx.forget_user("12")
                await tx.put("members", "1_12", {"back": True, "pad": PAD})
                await tx.forget_guild("112")

        small_disk.fill(leave=room)
        try:
            with pytest.raises(storage.DatabaseError) as failed:
                await forget()
            assert_io_error(failed.value, errno.ENOSPC)
            assert await everything(store) == before
            assert not forget_files.pending(store.path)
            no_leftovers(store)
        finally:
            small_disk.free()
        await forget()
        after = minus(before, owned(before, Owner(user="12")))
        after = ({**after[0], ("members", "1_12"): {"back": True, "pad": PAD}}, after[1])
        after = minus(after, owned(after, Owner(guild="112")))
        assert await everything(store) == after
    async with storage.open_store(config=cfg) as store:
        assert await everything(store) == after


async def test_a_resolution_left_undone_is_settled_by_the_journal_record(
        json_store: Any, reopen: Callable[[], Awaitable[Any]], monkeypatch: pytest.MonkeyPatch):
    """The record committed, the intent not resolved (the process died there): another store's next lock rolls
    forward, though a key the forget removed is back (the documents alone would have said "rolled back")."""
    await fill(json_store)
    before = await everything(json_store)
    monkeypatch.setattr(forget_files, "resolve", lambda *a, **k: None)
    async with json_store.transaction() as tx:
        await tx.forget_user("12")
        await tx.put("members", "1_12", {"back": True})
    monkeypatch.undo()
    assert forget_files.pending(json_store.path)
    other = await reopen()
    try:
        await other.put("x", "y", {})  # its lock resolves the intent
        assert not forget_files.pending(json_store.path)
        expected = minus(before, owned(before, Owner(user="12")))
        expected = ({**expected[0], ("members", "1_12"): {"back": True}, ("x", "y"): {}}, expected[1])
        assert await everything(other) == expected
    finally:
        await other.close()


_CHILD = r"""
import asyncio, json, os, sys
import storage
from storage.backends.json import forget_files, tx_messages
from storage.backends.json.journal import Journal

point = sys.argv[2]

def dies_after(owner, name):
    real = getattr(owner, name)
    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        os._exit(9)
    setattr(owner, name, wrapped)

if point == "staged":
    dies_after(tx_messages.TxMessages, "finish")  # staged and fsynced, no intent
elif point == "swapped":
    dies_after(forget_files, "begin")  # the intent written and the files swapped, no journal record
elif point == "appended":
    dies_after(Journal, "append")  # the record fsynced, not published
elif point == "committed":
    forget_files.resolve = lambda *a, **k: os._exit(9)  # the record committed, the intent not resolved

async def main():
    store = await storage.open_store(config=storage.StoreConfig(**json.loads(sys.argv[1])))
    print("OPEN", flush=True)
    async with store.transaction() as tx:
        await tx.forget_user("12")
        await tx.put("members", "1_12", {"back": True})
        await tx.forget_guild("112")
        await tx.prune_messages("2024-03-10T00:00:00Z", guild_id="2")
        await tx.put("other", "k", {"v": 1})
    print("DONE", flush=True)
    await store.close()

asyncio.run(main())
"""


def _config(base: Path) -> storage.StoreConfig:
    return storage.StoreConfig(backend="json", path=str(base / "data"), lock_timeout=30, source="tests")


def _spawn(base: Path, point: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(dataclasses.asdict(_config(base))), point],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


async def _prepared(base: Path) -> tuple[State, State]:
    """A store with data (``before``) and what the child's transaction leaves when it commits (``after``)."""
    async with storage.open_store(config=_config(base)) as store:
        await fill(store, messages=1500)
        before = await everything(store)
    after = minus(before, owned(before, Owner(user="12")))
    after = ({**after[0], ("members", "1_12"): {"back": True}}, after[1])
    after = minus(after, owned(after, Owner(guild="112")))
    after = minus(after, pruned(after, "2024-03-10T00:00:00Z", "2"))
    after = ({**after[0], ("other", "k"): {"v": 1}}, after[1])
    return before, after


async def _settled(base: Path) -> State:
    async with storage.open_store(config=_config(base)) as store:
        state = await everything(store)
    data = base / "data"
    assert not forget_files.pending(data), "opening the store resolves an interrupted forget"
    assert not [n for n in os.listdir(data) if n.startswith("storage.forget")]
    return state


@pytest.mark.parametrize("point, outcome", [("staged", "before"), ("swapped", "before"), ("appended", None),
                                            ("committed", "after")])
async def test_a_child_killed_at_each_step_leaves_one_state_or_the_other(tmp_path: Path, point: str,
                                                                         outcome: str | None):
    before, after = await _prepared(tmp_path)
    child = _spawn(tmp_path, point)
    _out, err = await asyncio.to_thread(child.communicate, timeout=120)
    assert child.returncode == 9, err
    if point != "staged":  # the intent names the record that decides, and no keys (see forget_files)
        intent = json.loads((tmp_path / "data" / forget_files.INTENT_NAME).read_bytes())
        assert intent["keys"] is None and sorted(intent["commit"]) == ["digest", "generation", "length", "offset"]
    else:
        assert not forget_files.pending(tmp_path / "data")
    state = await _settled(tmp_path)
    if outcome is None:  # fsynced but never published: cut away as unacknowledged, or kept whole
        assert state in (before, after)
    else:
        assert state == (before if outcome == "before" else after)


@pytest.mark.slow
async def test_kill_9_at_spread_points_of_a_transaction_leaves_one_state_or_the_other(tmp_path: Path):
    template = tmp_path / "template"
    before, after = await _prepared(template)
    run = tmp_path / "timing"
    shutil.copytree(template, run)
    child = _spawn(run, "none")
    opened = await read_until(child, "OPEN")
    duration = await read_until(child, "DONE") - opened
    await asyncio.to_thread(child.wait)
    assert await _settled(run) == after
    outcomes = {"before": 0, "after": 0}
    killed_running = 0
    for number in range(24):
        run = tmp_path / f"run{number}"
        shutil.copytree(template, run)
        child = _spawn(run, "none")
        await read_until(child, "OPEN")
        await asyncio.sleep(duration * number / 20)
        if child.poll() is None:
            killed_running += 1
            os.kill(child.pid, signal.SIGKILL)
        await asyncio.to_thread(child.wait)
        state = await _settled(run)
        assert state in (before, after), f"kill {number} ({duration * number / 20:.3f}s after OPEN) left a mix"
        outcomes["before" if state == before else "after"] += 1
        shutil.rmtree(run)
    print(f"24 kills over {duration:.3f}s: {outcomes}, {killed_running} while the child was still running")
    assert killed_running >= 12, "the kills must land while the transaction runs"


@pytest.mark.parametrize("commit", [{"generation": "1", "offset": 0, "length": 3, "digest": "ab"},
                                    {"generation": 1, "offset": -1, "length": 3, "digest": "ab"},
                                    {"generation": 1, "offset": 0, "length": 3}])
async def test_an_unreadable_transaction_intent_refuses_to_open_rather_than_guess(tmp_path: Path,
                                                                                   commit: dict[str, Any]):
    path = tmp_path / "data"
    async with storage.open_store(backend="json", path=str(path)) as store:
        await store.put("c", "k", {"v": 1})
    intent = {"token": "1-0123456789abcdef", "keys": None, "files": [], "guilds": [], "commit": commit}
    (path / forget_files.INTENT_NAME).write_bytes(json.dumps(intent).encode())
    with pytest.raises(storage.CorruptDataError, match="interrupted forget"):
        await storage.open_store(backend="json", path=str(path))
    assert forget_files.pending(path)  # left for a person to look at


async def test_index_declarations_follow_what_is_stored_under_cancellation(store: storage.Store,
                                                                           reopen: Callable[[], Awaitable[Any]]):
    """``ensure_index`` / ``drop_index`` cancelled at every loop turn: what the store says it has (and uses) is
    what is stored (JSON: the declaration file, as another store opening now reads it; never the old declaration
    over the new file), and queries give the same answer either way. (PostgreSQL: the catalog; a DDL statement
    the server already runs may finish after the client gave up, so the two are compared once it settled.)"""
    await store.put_many("members", {f"1_{u}": {"n": u % 17, "user": str(u)} for u in range(3000)})
    reference = sorted([(f"1_{u}", {"n": u % 17, "user": str(u)}) for u in range(3000)],
                       key=lambda kd: (-kd[1]["n"], kd[0]))[:5]
    json_backend = isinstance(store, storage.JsonStore)

    async def agreed() -> list[str]:
        other = await reopen()
        try:
            for _ in range(1 if json_backend else 400):
                mine, theirs = await store.indexes("members"), await other.indexes("members")
                if mine == theirs:
                    break
                await asyncio.sleep(0.05)
            assert mine == theirs
            return mine
        finally:
            await other.close()

    for call, done in ((lambda: store.ensure_index("members", "n"), ["n"]),
                       (lambda: store.drop_index("members", "n"), [])):
        for turns in range(0, 400):
            task = asyncio.ensure_future(call())
            for _ in range(min(turns, 20)):
                await asyncio.sleep(0)
            if turns > 20:
                await asyncio.sleep((turns - 20) * 0.0002)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            mine = await agreed()
            if json_backend:
                live = store._tables.indexes.live.get("members")  # type: ignore[attr-defined]
                assert sorted(live.paths if live is not None else []) == mine, f"after {turns} loop turns"
            assert await store.find("members", order_by="-n", limit=5) == reference
            if mine == done:
                break
        else:
            pytest.fail("the index call never finished")


async def test_a_transaction_forget_on_a_lazily_opened_store_equals_the_eager_one(tmp_path: Path,
                                                                                  sidecar_always: None):
    """JSON lazy open (json/lazy.py): a transaction's forget reads the collections whole off the loop, and its
    counts, export and result are those of an eagerly opened copy of the same folder."""
    from tests.test_json_lazy import COLL, cfg, eager_copy, is_lazy, seeded

    await seeded(tmp_path / "lazy")
    eager_copy(tmp_path / "lazy", tmp_path / "eager")
    results = []
    for name in ("lazy", "eager"):
        async with storage.open_store(config=cfg(tmp_path / name)) as store:
            assert is_lazy(store) == (name == "lazy")
            async with store.transaction() as tx:
                exported = await tx.export_user("105")
                counts = (await tx.forget_user("105"), await tx.forget_guild("7"))
                after = await tx.export_user("105")
            assert type(store._tables.data[COLL]) is dict  # read whole (in a worker thread), then put in place
            results.append((exported, counts, after, await everything(store)))
    assert results[0] == results[1]
    assert results[0][1][0] == {COLL: 1} and results[0][2]["documents"] == {}
