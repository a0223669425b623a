"""forget_guild / forget_user / export_user / prune_messages(guild_id=) (issue 14), on both backends.

Random data over several guilds, users and collections, with tricky keys (ids that are prefixes or suffixes of
other ids, keys equal to an id, unicode); a plain-Python reference computes what each call must remove and keep,
and the whole store (every collection's documents, every message) is compared with it after each call. Atomicity:
a cancellation at every await point, and faults injected on the JSON message side and in its journal commit,
leave all or nothing; a crash between the commit and the message swap is finished or undone by the next open.
PostgreSQL: the user's documents are found without a sequential scan (EXPLAIN), and bulk loads leave statistics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

import storage
from storage import ValidationError
from storage.backends.json import forget_files
from storage.backends.postgres import lifecycle as pg_lifecycle
from storage.ownership import Owner
from tests._cancel import all_or_nothing_at_every_turn

GUILDS = ["1", "12", "112", "2", "21", "9007199254740993"]
USERS = ["12", "2", "112", "3", "1", "18446744073709551615"]
State = tuple[dict[tuple[str, str], Any], dict[str, dict[str, Any]]]


def _keys(rng: random.Random) -> list[tuple[str, str, Any]]:
    docs: list[tuple[str, str, Any]] = []
    for g in GUILDS:
        docs.append(("settings", g, {"prefix": rng.choice("!?$"), "name": "Gülde ✓"}))
        docs.append(("settings", f"{g}_channel_{rng.choice(USERS)}", {"n": rng.random()}))
        for u in USERS:
            if rng.random() < 0.7:
                docs.append(("members", f"{g}_{u}", {"user_id": u, "guild_id": g, "roles": ["a", "ü"],
                                                     "statistics": {"message_count": rng.randrange(100)}}))
            if rng.random() < 0.3:
                docs.append(("xp.v2", f"{g}_{u}", {"xp": rng.randrange(10**6)}))
    for u in USERS:
        docs.append(("economy", u, {"coins": rng.randrange(1000)}))
        docs.append(("economy", f"ü_{u}", {"weird": True}))
    # keys that look like ids but must not match: prefixes, suffixes, no separator, other separators
    for key in ["3_112", "x12", "12x", "_12", "12_", "1_2_12", "121", "0_12", "1-12", "112_", "2_1_", "ñ", "21_a",
                "1", "11_2", "9007199254740993x_1", "_", "a_18446744073709551615"]:
        docs.append(("misc", key, {"k": key}))
    docs.append(("messages", "12", {"a collection named messages": True}))
    return docs


def _records(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"message_id": str(10_000 + i), "guild_id": rng.choice(GUILDS), "channel_id": str(rng.choice([5, 6])),
             "author_id": rng.choice(USERS), "timestamp": f"2024-{rng.randrange(1, 5):02d}-{rng.randrange(1, 28):02d}"
             f"T{rng.randrange(24):02d}:00:00Z", "content_length": rng.randrange(50),
             "analysis": {"sentiment": rng.choice(["positive", "negative"]), "topics": ["t"]}} for i in range(n)]


async def fill(store: storage.Store, seed: int = 7, messages: int = 300) -> None:
    rng = random.Random(seed)
    by_collection: dict[str, dict[str, Any]] = {}
    for collection, key, doc in _keys(rng):
        by_collection.setdefault(collection, {})[key] = doc
    for collection, docs in by_collection.items():
        await store.put_many(collection, docs)
    records = _records(rng, messages)
    await store.record_messages(records)
    for record in rng.sample(records, 20):  # updated records: their update lines belong to the same author
        await store.update_message(record["message_id"], {"reactions": 3})


async def everything(store: storage.Store) -> State:
    """Every document of every collection and every message record, as the store returns them."""
    docs = {(c, k): d for c in await store.collections() async for k, d in store.items(c)}
    messages = {r["message_id"]: r async for r in store.scan_messages()}
    return docs, messages


def owned(state: State, owner: Owner) -> State:
    docs, messages = state
    return ({ck: d for ck, d in docs.items() if owner.owns_key(ck[1])},
            {m: r for m, r in messages.items() if owner.owns_message(r["guild_id"], r["author_id"])})


def minus(state: State, part: State) -> State:
    return ({k: v for k, v in state[0].items() if k not in part[0]},
            {k: v for k, v in state[1].items() if k not in part[1]})


def expected_counts(part: State) -> dict[str, int]:
    counts: dict[str, int] = {}
    for collection, _key in part[0]:
        name = "messages (collection)" if collection == "messages" else collection
        counts[name] = counts.get(name, 0) + 1
    if part[1]:
        counts["messages"] = len(part[1])
    return counts


def test_the_ownership_rule():
    assert Owner(user="12").owns_key("3_12") and not Owner(user="12").owns_key("3_112")
    assert Owner(user="12").owns_key("12") and not Owner(user="12").owns_key("121")
    assert Owner(guild="1").owns_key("1_5") and not Owner(guild="1").owns_key("10_5")
    assert Owner(guild="1").owns_key("1") and not Owner(guild="1").owns_key("11")
    scoped = Owner(guild="1", user="2")
    assert scoped.owns_key("1_2") and scoped.owns_key("1_x_2") and not scoped.owns_key("2")
    assert not scoped.owns_key("11_2") and not scoped.owns_key("1_12") and not scoped.owns_key("1_")


@pytest.mark.parametrize("target", ["1", "12", "112", "9007199254740993"])
async def test_forget_guild_removes_exactly_the_guilds_data(store: storage.Store, target: str):
    await fill(store)
    before = await everything(store)
    gone = owned(before, Owner(guild=target))
    assert gone[0] and gone[1]
    assert await store.forget_guild(target, dry_run=True) == expected_counts(gone)
    assert await everything(store) == before  # a dry run changes nothing
    assert await store.forget_guild(int(target)) == expected_counts(gone)
    assert await everything(store) == minus(before, gone)
    assert await store.forget_guild(target) == {}  # nothing left: an empty result, no error


@pytest.mark.parametrize("user, guild", [("12", None), ("2", None), ("1", None), ("18446744073709551615", None),
                                         ("12", "1"), ("2", "112"), ("112", "12")])
async def test_forget_user_removes_exactly_what_export_user_showed(store: storage.Store, user: str,
                                                                   guild: str | None):
    await fill(store)
    before = await everything(store)
    owner = Owner(guild=guild, user=user)
    gone = owned(before, owner)
    assert gone[0] and gone[1]
    exported = await store.export_user(user, guild_id=guild)
    assert orjson.loads(orjson.dumps(exported)) == exported and json.loads(json.dumps(exported)) == exported
    shown_docs = {("members", f"{g}_{user}"): d for g, d in exported["members"].items()}
    shown_docs.update({(c, k): d for c, docs in exported["documents"].items() for k, d in docs.items()})
    assert shown_docs == gone[0]
    assert exported["messages"] == sorted(gone[1].values(), key=lambda r: (r["timestamp"], int(r["message_id"])))
    assert await store.forget_user(user, guild_id=guild, dry_run=True) == expected_counts(gone)
    assert await store.forget_user(user, guild_id=guild) == expected_counts(gone)
    after = await everything(store)
    assert after == minus(before, gone)
    empty = await store.export_user(user, guild_id=guild)
    assert (empty["members"], empty["documents"], empty["messages"]) == ({}, {}, [])


async def test_both_backends_give_the_same_bytes_and_counts(tmp_path: Any, pg_dsn: str):
    stores = [await storage.open_store(backend="json", path=str(tmp_path / "data")),
              await storage.open_store(backend="postgres", dsn=pg_dsn)]
    try:
        for s in stores:
            await fill(s)
        texts = {json.dumps(await s.export_user("12"), ensure_ascii=False) for s in stores}
        assert len(texts) == 1  # the same text: every object's keys sorted, the same order of everything
        assert len({str(await s.forget_guild("112")) for s in stores}) == 1
        assert len({str(await s.forget_user("2", guild_id="1")) for s in stores}) == 1
        states = [await everything(s) for s in stores]
        assert states[0] == states[1]
    finally:
        for s in stores:
            await s.close()


async def test_forget_keeps_other_processes_consistent(store: storage.Store, reopen: Callable[[], Awaitable[Any]]):
    await fill(store)
    other = await reopen()
    try:
        before = await everything(other)
        await store.forget_user("2")
        gone = owned(before, Owner(user="2"))
        assert await everything(other) == minus(before, gone)
        # the other store's writes after the forget: new records and documents are accepted, old ids stay unique
        await other.record_messages(_records(random.Random(3), 5))
        assert await other.record_message(next(iter(minus(before, gone)[1].values()))) is False
    finally:
        await other.close()


async def test_expired_documents_are_removed_but_neither_shown_nor_counted(store_config: Any):
    from tests.test_ttl import Clock

    clock = Clock()
    async with storage.open_store(config=dataclasses.replace(store_config, clock=clock)) as store:
        await store.put("cooldowns", "1_12", {"until": "soon"}, ttl=30)
        await store.put("cooldowns", "2_12", {"until": "later"}, ttl=3000)
        await store.save_member_data("12", "1", {"roles": []})
        clock.at(60)  # 1_12 expired: it reads as absent everywhere, so also for the lifecycle
        exported = await store.export_user("12")
        assert exported["documents"] == {"cooldowns": {"2_12": {"until": "later"}}}
        assert await store.forget_user("12", dry_run=True) == {"cooldowns": 1, "members": 1}
        assert await store.forget_user("12") == {"cooldowns": 1, "members": 1}
        clock.at(-60)  # back before it expired: the expired document was removed too (it was the user's data)
        assert await store.get("cooldowns", "1_12") is None and await store.count("cooldowns") == 0


async def test_prune_messages_of_one_guild(store: storage.Store):
    await fill(store)
    docs, messages = await everything(store)
    cut = "2024-03-01T00:00:00Z"
    doomed = {m for m, r in messages.items() if r["guild_id"] == "12" and r["timestamp"] < cut}
    assert doomed
    assert await store.prune_messages(cut, guild_id=12) == len(doomed)
    assert await everything(store) == (docs, {m: r for m, r in messages.items() if m not in doomed})


@pytest.mark.parametrize("call", [
    lambda s: s.forget_guild("abc"), lambda s: s.forget_guild(-1), lambda s: s.forget_guild(2**64),
    lambda s: s.forget_user("1_2"), lambda s: s.forget_user("1", guild_id="x"), lambda s: s.export_user(None),
    lambda s: s.forget_guild("1", dry_run="yes"), lambda s: s.prune_messages("2024-01-01", guild_id="g"),
])
async def test_bad_ids_are_refused_and_change_nothing(store: storage.Store, call: Any):
    await fill(store, messages=30)
    before = await everything(store)
    with pytest.raises(ValidationError):
        await call(store)
    assert await everything(store) == before


async def test_the_store_refuses_them_inside_its_own_transaction(store: storage.Store):
    """Inside a transaction they are the transaction's calls (tests/test_tx_lifecycle.py); the store's own would
    wait for what the transaction holds, so they are refused with the usual word."""
    await fill(store, messages=30)
    before = await everything(store)
    async with store.transaction() as tx:
        assert callable(tx.forget_guild) and callable(tx.export_user) and callable(tx.prune_messages)
        for call in (store.forget_guild("1"), store.forget_user("2", dry_run=True), store.export_user("2")):
            with pytest.raises(storage.TransactionError, match="call the transaction object"):
                await call
    assert await everything(store) == before


async def test_a_cancellation_at_any_point_leaves_all_or_nothing(store: storage.Store):
    await fill(store, messages=200)
    before = await everything(store)
    gone = owned(before, Owner(user="12"))
    after = minus(before, gone)
    await all_or_nothing_at_every_turn(lambda: store.forget_user("12"), lambda: everything(store), before, after,
                                       limit=400, spin=30)
    assert await store.forget_user("12") == {}


# -- JSON: faults on the message side and in the journal, crashes between the steps ---------------------------------
@pytest.fixture
def json_store(backend: str, store: storage.Store) -> storage.Store:
    if backend != "json":
        pytest.skip("the JSON backend's files")
    return store


async def test_a_failed_message_write_changes_nothing(json_store: Any, monkeypatch: pytest.MonkeyPatch):
    await fill(json_store)
    before = await everything(json_store)

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(forget_files, "_stage", full)
    with pytest.raises(storage.DatabaseError, match="No space left"):
        await json_store.forget_user("12")
    assert await everything(json_store) == before
    assert not [p for p in json_store.path.iterdir() if p.name.startswith("storage.forget")]
    monkeypatch.undo()
    await json_store.forget_user("12")
    assert await everything(json_store) == minus(before, owned(before, Owner(user="12")))


async def test_a_failed_swap_is_rolled_back(json_store: Any, monkeypatch: pytest.MonkeyPatch):
    await fill(json_store)
    before = await everything(json_store)
    real = forget_files.os.replace
    calls = {"n": 0}

    def flaky(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 6:  # the intent, the generation, then three files moved: half-way through the swap
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(forget_files.os, "replace", flaky)
    with pytest.raises(storage.DatabaseError, match="Input/output"):
        await json_store.forget_user("2")
    monkeypatch.undo()
    assert await everything(json_store) == before
    assert not forget_files.pending(json_store.path)


async def test_the_forgetting_process_settles_its_intent_from_its_plan(json_store: Any,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """The process that wrote the intent and still holds the lock resolves it from its plan, without reading it
    back (a guild's keys decoded as one list each reached the collector's oldest generation); the intent's bytes
    are still what another process reads after a crash (the killed-process test below)."""
    await fill(json_store)
    before = await everything(json_store)
    written: list[dict[str, Any]] = []
    real_begin = forget_files.begin

    def begin(plan: Any) -> None:
        real_begin(plan)
        written.append(orjson.loads((plan.data_path / forget_files.INTENT_NAME).read_bytes()))

    def unread(*args: Any) -> Any:
        raise AssertionError("the forgetting process read its own intent back")

    monkeypatch.setattr(forget_files, "begin", begin)
    monkeypatch.setattr(forget_files, "_read_intent", unread)
    await json_store.forget_guild("12")
    assert await everything(json_store) == minus(before, owned(before, Owner(guild="12")))
    assert not forget_files.pending(json_store.path)
    (intent,) = written
    assert intent["keys"] and all(type(pair) is list and len(pair) == 2 for pair in intent["keys"])


async def test_a_failed_journal_commit_rolls_the_messages_back(json_store: Any, monkeypatch: pytest.MonkeyPatch):
    await fill(json_store)
    before = await everything(json_store)

    def broken(record: bytes) -> None:
        raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(json_store._journal, "append", broken)
    with pytest.raises(storage.DatabaseError, match="fsync failed"):
        await json_store.forget_guild("12")
    monkeypatch.undo()
    assert await everything(json_store) == before
    assert not forget_files.pending(json_store.path)
    assert await json_store.forget_guild("12") == expected_counts(owned(before, Owner(guild="12")))


@pytest.mark.parametrize("sweep", [False, True])
async def test_forget_user_stages_without_the_lock_and_restages_what_changed(
        json_store: Any, reopen: Callable[[], Awaitable[Any]], monkeypatch: pytest.MonkeyPatch, sweep: bool):
    """The message files are read and staged before the store lock is taken (writers do not wait for it); what
    another process changes meanwhile (new records of the user in an existing and in a new month file, others'
    records, a prune, a document) is found under the lock. With ``sweep``, another process's open also removed
    the work folder meanwhile (it names no intent yet): everything is staged again."""
    await fill(json_store)
    other = await reopen()
    loop = asyncio.get_running_loop()
    real_stage = forget_files.stage
    plans: list[forget_files.ForgetPlan] = []
    states: list[State] = []
    template = _records(random.Random(5), 1)[0]
    late = [{**template, "message_id": str(90_000 + i), "author_id": author, "guild_id": "1", "timestamp": when}
            for i, (author, when) in enumerate([("12", "2024-02-03T00:00:00Z"), ("2", "2024-02-04T00:00:00Z"),
                                                ("12", "2024-07-01T00:00:00Z")])]  # July: a new file

    async def meanwhile() -> None:
        """Another process's writes while the forget stages (they would time out if it held the lock)."""
        await other.record_messages(late)
        assert await other.prune_messages("2024-02-01T00:00:00Z", guild_id="2") > 0
        await other.put("economy", "12", {"coins": 1})
        await other.put("misc", "5_12", {"late": True})
        if sweep:
            forget_files.sweep(json_store.path)  # what another process's open does under the lock
        states.append(await everything(other))

    def stage(*args: Any) -> forget_files.ForgetPlan:
        plan = real_stage(*args)
        plans.append(plan)
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(meanwhile(), 30), loop).result()
        return plan

    monkeypatch.setattr(forget_files, "stage", stage)
    try:
        counts = await json_store.forget_user("12")
    finally:
        monkeypatch.undo()
    reference = states[0]
    gone = owned(reference, Owner(user="12"))
    assert {"90000", "90002"} <= gone[1].keys() and ("misc", "5_12") in gone[0]
    assert counts == expected_counts(gone)
    assert await everything(json_store) == minus(reference, gone)
    assert await everything(other) == minus(reference, gone)
    # read again under the lock: the two files the new records went to (the pruned one is gone); after the sweep
    # every file that has a staged version
    staged_versions = sum(1 for scan in plans[0].scans.values() if scan.staged)
    assert plans[0].restaged >= staged_versions > 2 if sweep else plans[0].restaged == 2
    assert not [p for p in json_store.path.iterdir() if p.name.startswith("storage.forget")]
    await other.close()


async def test_the_work_folder_is_deleted_after_the_lock(json_store: Any, monkeypatch: pytest.MonkeyPatch):
    """The forget's work folder (the old message files) is deleted once the intent is resolved and the store lock
    released: writers do not wait for the unlinking."""
    await fill(json_store)
    real = forget_files.discard
    calls: list[tuple[bool, bool, bool]] = []

    def discard(data_path: Path, token: str) -> None:
        work = data_path / f"storage.forget-{token}"
        calls.append((json_store._holding, forget_files.pending(data_path), work.is_dir()))
        real(data_path, token)

    monkeypatch.setattr(forget_files, "discard", discard)
    assert (await json_store.forget_user("12"))["messages"] > 0
    assert calls == [(False, False, True)]
    assert not [p for p in json_store.path.iterdir() if p.name.startswith("storage.forget")]


class Crash(Exception):
    """Where the process would have died."""


@pytest.mark.parametrize("committed", [True, False])
async def test_a_crash_before_the_resolution_is_settled_by_the_next_open(
        json_store: Any, reopen: Callable[[], Awaitable[Any]], monkeypatch: pytest.MonkeyPatch, committed: bool):
    """The process dies after the swap: with the journal record written (forward) or not (back)."""
    await fill(json_store)
    before = await everything(json_store)

    async def crash(*args: Any, **kwargs: Any) -> None:
        return None  # the process died before it could resolve its intent

    async def no_commit(ops: Any) -> None:
        raise Crash  # stands for the crash before the journal append

    monkeypatch.setattr(type(json_store), "_settle", crash)
    if not committed:
        monkeypatch.setattr(json_store, "_commit", no_commit)
    try:
        await json_store.forget_user("12")
    except Crash:
        pass
    monkeypatch.undo()
    assert forget_files.pending(json_store.path)
    other = await reopen()  # another process opening the store: it resolves the intent under the lock
    try:
        assert not forget_files.pending(json_store.path)
        expected = minus(before, owned(before, Owner(user="12"))) if committed else before
        assert await everything(other) == expected
    finally:
        await other.close()
    assert not [p for p in json_store.path.iterdir() if p.name.startswith("storage.forget")]
    assert await everything(json_store) == expected


_DYING_CHILD = """
import asyncio, os, sys
import storage
from storage.backends.json import forget_files
from storage.backends.json.lifecycle import JsonLifecycle

point = sys.argv[2]
real_begin = forget_files.begin

def begin(plan):
    real_begin(plan)
    if point == "swapped":
        os._exit(9)  # the intent written and the files swapped, the journal not written

async def settle(self, *, roll_back, known=None):
    os._exit(9)  # the journal record written, the intent not resolved

forget_files.begin = begin
if point == "committed":
    JsonLifecycle._settle = settle

async def main():
    store = await storage.open_store(backend="json", path=sys.argv[1])
    await store.forget_user("12")

asyncio.run(main())
"""


@pytest.mark.parametrize("point", ["swapped", "committed"])
async def test_a_killed_process_is_finished_or_undone_at_the_next_open(tmp_path: Path, point: str):
    """A real process dies (``os._exit``, no cleanup) mid-forget: the next open rolls it back (before the journal
    commit) or forward (after it)."""
    path = tmp_path / "data"
    async with storage.open_store(backend="json", path=str(path)) as store:
        await fill(store)
        before = await everything(store)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.run([sys.executable, "-c", _DYING_CHILD, str(path), point], env=env, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 9, child.stderr
    assert forget_files.pending(path)
    async with storage.open_store(backend="json", path=str(path)) as store:
        expected = minus(before, owned(before, Owner(user="12"))) if point == "committed" else before
        assert await everything(store) == expected
        assert not forget_files.pending(path)
    assert not [p for p in path.iterdir() if p.name.startswith("storage.forget")]


# -- PostgreSQL: index use and planner statistics -------------------------------------------------------------------
@pytest.fixture
def pg_only(backend: str, store: storage.Store) -> Any:
    if backend != "postgres":
        pytest.skip("PostgreSQL's plans and statistics")
    return store


async def test_forget_user_finds_the_documents_without_a_sequential_scan(pg_only: Any):
    rng = random.Random(1)
    await pg_only.put_many("members", {f"{g}_{u}": {"n": 1} for g in range(1000, 1050) for u in range(100, 160)})
    await pg_only.put_many("economy", {str(u): {"c": rng.randrange(9)} for u in range(100, 3100)})
    async with pg_only.pool.acquire() as conn:
        for owner in (Owner(user="112"), Owner(user="112", guild="1010"), Owner(guild="1010")):
            select, delete, args = pg_lifecycle.documents_where(owner, datetime.now(timezone.utc))
            for sql in (select, delete):
                plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
                assert "Seq Scan on storage_documents" not in plan, plan
                if owner.user is not None:
                    assert "storage_documents_key_reversed" in plan, plan
    assert (await pg_only.forget_user("112"))["members"] == 50


async def test_bulk_loads_leave_planner_statistics(pg_only: Any):
    async def reltuples(table: str) -> float:
        async with pg_only.pool.acquire() as conn:
            return float(await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = $1::regclass", table))

    assert await reltuples("storage_documents") <= 0  # never analyzed (-1 on PostgreSQL 14+, 0 before)
    await pg_only.put_many("members", {f"1_{u}": {"n": u} for u in range(1500)})
    assert await reltuples("storage_documents") == 1500
    await pg_only.record_messages(_records(random.Random(2), 1200))
    assert await reltuples("storage_messages") == 1200
    async with pg_only.transaction() as tx:  # a transaction's bulk rows are analyzed after it commits
        await tx.put_many("big", {str(k): {"k": k} for k in range(3000)})
    assert await reltuples("storage_documents") == 4500
    await pg_only.put_many("small", {"a": {}, "b": {}})  # a small write never pays for an ANALYZE
    assert await reltuples("storage_documents") == 4500


async def test_a_failing_analyze_never_fails_the_write(pg_config: Any):
    from storage.backends.postgres.analyze import LoadStatistics

    conn = await asyncpg.connect(pg_config.dsn)
    try:
        await conn.execute("SET default_transaction_read_only = on")  # ANALYZE is refused in a read-only session
        await LoadStatistics().after_load(conn, "storage_documents", 5000)  # logged, not raised
    finally:
        await conn.close()
