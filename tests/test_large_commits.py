"""Large writes give the event loop turns and stay all-or-nothing (issue 15: no call holds a bot's loop > 20 ms).

``put_many`` of more than ``documents.ENCODE_TURN`` items encodes them in slices with a loop turn between (both
backends); the JSON backend encodes and plans a commit of more than ``store.LARGE_COMMIT`` operations in a worker
thread and applies it with C-level dict updates. Checked against plain-Python references: the same documents,
the same error for the same bad item, and, on JSON, the in-memory sizes compaction relies on.
"""

from __future__ import annotations

import asyncio
import gc
import random

import orjson
import pytest

import storage
from storage import ValidationError
from storage.backends.json.journal import encode_record
from storage.backends.json.put_run import RECORD_SLICE, PutRun
from storage.backends.json.snapshot import OVERHEAD
from storage.backends.json.store import LARGE_COMMIT, PLAN_DURING_SYNC
from storage.documents import ENCODE_TURN, normalize_items
from tests._turns import turns_during
from tests.test_feed import next_change

BIG = max(ENCODE_TURN, LARGE_COMMIT) + 500


def doc(i: int, version: int = 0) -> dict[str, object]:
    return {"i": i, "v": version, "tags": [f"t{i % 7}"]}


async def test_a_large_put_many_writes_everything_and_gives_the_loop_turns(store, reopen) -> None:
    await store.put_many("big", {f"k{i:05d}": doc(i) for i in range(0, BIG, 3)})  # some keys exist already
    expected = {f"k{i:05d}": doc(i) for i in range(0, BIG, 3)}
    update = {f"k{i:05d}": doc(i, 1) for i in range(BIG)}
    expected.update(update)
    written, turns = await turns_during(store.put_many("big", update))
    assert written == BIG
    assert turns >= BIG // ENCODE_TURN - 1  # at least one turn per encoded slice
    assert {k: d async for k, d in store.items("big")} == expected
    await store.close()
    again = await reopen()
    try:
        assert {k: d async for k, d in again.items("big")} == expected
    finally:
        await again.close()


async def test_a_bad_item_deep_in_a_large_put_many_is_named_and_nothing_is_written(store) -> None:
    items: list[tuple[str, object]] = [(f"k{i}", doc(i)) for i in range(BIG)]
    bad = ENCODE_TURN + 17  # in the second slice
    items[bad] = (f"k{bad}", {"x": float("nan")})
    with pytest.raises(ValidationError, match=f"item #{bad} "):
        await store.put_many("big", items)  # type: ignore[arg-type]
    assert await store.count("big") == 0


@pytest.mark.parametrize("seed", range(4))
async def test_json_large_commits_match_a_reference_and_keep_sizes_exact(tmp_path, seed: int) -> None:
    """Puts and deletes (keys repeated, collections new and old) in transactions large enough for the planned
    path and small ones for the plain path: documents equal a dict replay, sizes equal a recount."""
    rng = random.Random(seed)
    cfg = storage.StoreConfig(backend="json", path=str(tmp_path / "s"), source="tests")
    reference: dict[str, dict[str, dict[str, object]]] = {}
    async with storage.open_store(config=cfg) as store:
        for round_ in range(4):
            count = LARGE_COMMIT + rng.randrange(1, 800) if round_ % 2 == 0 else rng.randrange(1, 50)
            async with store.transaction() as tx:
                for n in range(count):
                    coll = rng.choice(["a", "b", f"new{round_}"])
                    key = f"k{rng.randrange(LARGE_COMMIT // 2)}"
                    if rng.random() < 0.25:
                        await tx.delete(coll, key)
                        reference.get(coll, {}).pop(key, None)
                    else:
                        value = doc(n, round_)
                        await tx.put(coll, key, value)
                        reference.setdefault(coll, {})[key] = value
            tables = store._tables  # type: ignore[attr-defined]
            for name, expected in reference.items():
                assert {k: d async for k, d in store.items(name)} == expected
                coll = tables.data.get(name, {})
                assert tables.sizes[name] == 2 + sum(len(k) + len(v) + OVERHEAD for k, v in coll.items())
    async with storage.open_store(config=cfg) as again:
        for name, expected in reference.items():
            assert {k: d async for k, d in again.items(name)} == expected


async def test_a_large_commit_keeps_an_index_equal_to_the_documents(store) -> None:
    """The planned (large) commit path updates query indexes like the plain one: find() through the index
    returns what a scan of a plain-Python reference returns."""
    rng = random.Random(11)
    await store.put_many("ix", {f"k{i}": {"score": i % 50} for i in range(LARGE_COMMIT)})
    await store.ensure_index("ix", "score")
    reference = {f"k{i}": {"score": i % 50} for i in range(LARGE_COMMIT)}
    async with store.transaction() as tx:
        for _n in range(LARGE_COMMIT + 300):
            key = f"k{rng.randrange(LARGE_COMMIT + 500)}"
            if rng.random() < 0.3:
                await tx.delete("ix", key)
                reference.pop(key, None)
            else:
                value = {"score": rng.randrange(60)}
                await tx.put("ix", key, value)
                reference[key] = value
    for score in (0, 7, 49, 55):
        found = sorted(key for key, _ in await store.find("ix", {"score": score}))
        assert found == sorted(k for k, d in reference.items() if d["score"] == score)


async def test_large_commits_with_expiries_keep_each_expiry(store) -> None:
    """A large put_many with a ttl, then one without over half of its keys (which makes those permanent): the
    expiring ones and the permanent ones are exactly as a small commit would leave them."""
    await store.put_many("cd", {f"k{i}": {"i": i} for i in range(BIG)}, ttl=3600)
    await store.put_many("cd", {f"k{i}": {"i": -i} for i in range(0, BIG, 2)})
    expiring = await store._expiries("cd", None)
    assert set(expiring) == {f"k{i}" for i in range(1, BIG, 2)}
    assert await store.count("cd") == BIG
    assert await store.get("cd", "k2") == {"i": -2}


def _member(guild: int, user: int, version: int = 0) -> dict[str, object]:
    return {"user_id": str(user), "guild_id": str(guild), "join_date": "2024-01-01T00:00:00Z",
            "roles": ["member"], "statistics": {"message_count": version}}


@pytest.mark.parametrize("shape", ["mapping", "pairs"])
async def test_a_large_put_many_checks_like_a_small_one(store, shape: str) -> None:
    """A large ``put_many`` (its two lists, documents.normalize_columns) raises for the same item with the same
    message as the pairs of normalize_items (the small one's), and writes nothing: a bad document, a bad key,
    an item that is not a pair (pairs only), each deep in a later slice, and the first of two bad items."""
    rng = random.Random(5)
    base: list[tuple[object, object]] = [(f"k{i}", doc(i)) for i in range(BIG)]
    bad_items: list[object] = [("kbad", {"x": float("nan")}), ("", doc(1)), (3.5, doc(2)), (-4, doc(3))]
    if shape == "pairs":
        bad_items += ["not a pair", ("k", doc(1), "extra"), None]
    for round_ in range(8):
        items: list[object] = list(base)
        spots = sorted(rng.sample(range(ENCODE_TURN, BIG), 1 + round_ % 2))
        for spot in spots:
            items[spot] = rng.choice(bad_items)
        if shape == "mapping":
            bad = {k: d for k, d in items}  # type: ignore[misc]
            with pytest.raises(ValidationError) as small:
                normalize_items(bad, "big")  # type: ignore[arg-type]
            with pytest.raises(ValidationError) as large:
                await store.put_many("big", bad)
        else:
            with pytest.raises(ValidationError) as small:
                normalize_items(items, "big")  # type: ignore[arg-type]
            with pytest.raises(ValidationError) as large:
                await store.put_many("big", items)  # type: ignore[arg-type]
        assert str(large.value) == str(small.value)
        assert large.value.field == small.value.field
        assert f"#{spots[0]}" in str(large.value)
    assert await store.count("big") == 0


@pytest.mark.parametrize("shape", ["mapping", "pairs"])
async def test_a_large_put_many_of_members_stores_what_small_ones_store(store, shape: str) -> None:
    """Members through the rule's fast paths (every member usual; then one not usual, with a datetime) in a
    large ``put_many`` and in the same items 500 at a time: the same documents."""
    from datetime import datetime, timezone

    items: list[tuple[object, dict[str, object]]] = [(f"{100 + i % 3}_{5000 + i}", _member(100 + i % 3, 5000 + i))
                                                     for i in range(BIG)]
    odd = dict(_member(101, 5001 + ENCODE_TURN), extra={"at": datetime(2024, 5, 1, tzinfo=timezone.utc)})
    items[ENCODE_TURN + 1] = (f"101_{5001 + ENCODE_TURN}", odd)
    for chosen in (items[:ENCODE_TURN * 2], items):  # every member usual; one not
        large = dict(chosen) if shape == "mapping" else chosen
        assert await store.put_many("members", large) == len(chosen)  # type: ignore[arg-type]
        stored = {k: d async for k, d in store.items("members")}
        await store.delete_many("members")
        for start in range(0, len(chosen), 500):
            await store.put_many("members", chosen[start:start + 500])  # type: ignore[arg-type]
        assert {k: d async for k, d in store.items("members")} == stored
        assert len(stored) == len(chosen)
        await store.delete_many("members")
    assert stored[f"101_{5001 + ENCODE_TURN}"]["extra"] == {"at": "2024-05-01T00:00:00Z"}


async def test_a_large_put_many_in_a_transaction_with_a_ttl(store) -> None:
    """The two lists' path inside a transaction, with an expiry: committed together with the transaction's
    other writes, each document expiring; rolled back, none."""
    update = {f"k{i}": doc(i, 2) for i in range(BIG)}
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.put_many("tx", update, ttl=3600)
            raise RuntimeError("roll back")
    assert await store.count("tx") == 0
    async with store.transaction() as tx:
        await tx.put("tx", "k0", doc(0))
        assert await tx.put_many("tx", list(update.items()), ttl=3600) == BIG
        assert await tx.get("tx", f"k{BIG - 1}") == doc(BIG - 1, 2)
    assert {k: d async for k, d in store.items("tx")} == update
    assert set(await store._expiries("tx", None)) == set(update)


async def test_a_large_put_many_leaves_the_collector_little_to_count(store, backend: str) -> None:
    """What a 25k-document ``put_many`` keeps alive that the garbage collector tracks, counted by its young
    collections (one per 700 new tracked objects alive): each young collection counts toward the next full
    collection of the caller's whole heap (a full one falls due after ~10 of the middle generation, ~70k objects),
    so the fewer, the rarer a full collection inside the call. Before, the call kept the input's 25k
    ``(key, doc)`` tuples and 25k ``(key, bytes)`` pairs: 96-98 young collections on JSON, 64-66 on PostgreSQL."""
    n = 25_000
    docs = {f"k{i:06d}": {"i": i, "roles": ["member"], "stats": {"n": i % 50}} for i in range(n)}
    await store.put_many("gc", {"warm": {"i": 0}})
    young = 0

    def counted(phase: str, info: dict[str, int]) -> None:
        nonlocal young
        if phase == "start" and info["generation"] == 0:
            young += 1

    gc.collect()
    gc.callbacks.append(counted)
    try:
        assert await store.put_many("gc", docs) == n
    finally:
        gc.callbacks.remove(counted)
    # JSON keeps one operation tuple per document until the commit applies it (~36 collections); PostgreSQL
    # sends the two lists as they are (0-1 measured)
    assert young <= 8, young
    assert await store.count("gc") == n + 1


async def test_a_put_run_reads_as_its_operations(tmp_path) -> None:
    """json/put_run.PutRun: the same operations as the list it stands for (length, items, slices, iteration),
    the same journal record byte for byte and the same plan, into a new collection, an existing one (lazy after a
    reopen: sizes from the snapshot) and one with expiring documents (no plan: the apply clears them)."""
    cfg = storage.StoreConfig(backend="json", path=str(tmp_path / "s"), source="tests")
    keys = [f"k{i:05d}" for i in range(BIG)] + ["k00003"]  # a key twice: the last put wins
    encoded = [orjson.dumps(doc(i)) for i in range(BIG)] + [b'{"again":true}']
    async with storage.open_store(config=cfg) as store:
        await store.put_many("old", {f"k{i:05d}": doc(i, 9) for i in range(0, BIG, 2)})
        await store.put_many("ttl", {"k00001": doc(1)}, ttl=3600)
    async with storage.open_store(config=cfg) as store:
        tables = store._tables  # type: ignore[attr-defined]
        for name in ("new", "old", "ttl"):
            run = PutRun(name, keys, encoded)
            ops = [("p", name, key, raw) for key, raw in zip(keys, encoded)]
            assert len(run) == len(ops) and list(run) == ops and run[7] == ops[7] and run[-1] == ops[-1]
            assert run[10:1234:3] == ops[10:1234:3]
            assert run.record() == encode_record(ops)
            assert run.plan(tables) == tables.plan(ops)
            assert (run.plan(tables) is None) == (name == "ttl")
            assert run(None) == (ops, None)  # type: ignore[arg-type]
            for n in (PLAN_DURING_SYNC, 2 * RECORD_SLICE, 2 * RECORD_SLICE + 1):  # a batch's run: one dumps or two
                part = PutRun(name, keys[-n:], encoded[-n:])
                assert part.record() == encode_record(ops[-n:])
                assert part.plan(tables) == tables.plan(ops[-n:])
    with pytest.raises(ValueError):
        PutRun("x", ["a"], [])


async def test_large_put_manys_beside_other_writers_match_a_reference(store, reopen) -> None:
    """Large put_manys (a JSON store's PutRun) committed alone and in group-commit rounds with other writers'
    updates and deletes, into a collection with a query index and a watcher: the changes the watcher hears, replayed,
    give the documents stored; the big puts' documents are the reference's; the index answers as a scan does; a
    reopened store reads the same."""
    rng = random.Random(3)
    await store.ensure_index("g", "score")
    reference: dict[str, dict[str, object]] = {}
    replay: dict[str, object] = {}

    async def small(n: int) -> None:
        for j in range(n):
            key = f"s{j % 5}"
            if j % 3 == 2:
                await store.delete("g", key)
            else:
                await store.update("g", key, lambda d, j=j: {"score": j % 9, "n": d.get("n", 0) + 1}, default={})

    async with store.watch("g") as watch:
        for round_ in range(3):
            big = {f"k{i:05d}": {"score": i % 9, "r": round_} for i in rng.sample(range(BIG + 800), BIG)}
            if round_:
                await asyncio.gather(store.put_many("g", big), small(12), small(7))
            else:
                await store.put_many("g", big)  # alone
            reference.update(big)
            await store.put("g", f"zz{round_}", {"score": 0})
            while True:  # every change up to this round's marker
                _coll, key, kind, value = await next_change(watch)
                if kind == "put":
                    replay[key] = value
                else:
                    assert kind == "delete", kind
                    replay.pop(key, None)
                if key == f"zz{round_}":
                    break
    stored = {k: d async for k, d in store.items("g")}
    assert replay == stored
    assert {k: d for k, d in stored.items() if k.startswith("k")} == reference
    for score in (0, 4, 8):
        found = {k for k, _ in await store.find("g", {"score": score})}
        assert found == {k for k, d in stored.items() if d["score"] == score}
    await store.close()
    again = await reopen()
    try:
        assert {k: d async for k, d in again.items("g")} == stored
    finally:
        await again.close()


@pytest.mark.parametrize("order", ["sorted", "shuffled", "repeats"])
async def test_a_large_put_many_keeps_the_last_put_of_each_key(store, order: str) -> None:
    """Pairs in key order (PostgreSQL sends them as they are), shuffled, or with keys repeated (the last put
    wins, as put one by one): what is stored is ``dict(pairs)``, and the count returned is the number of items."""
    rng = random.Random(len(order))
    pairs = [(f"k{i:05d}", doc(i)) for i in range(BIG)]
    if order == "shuffled":
        rng.shuffle(pairs)
    elif order == "repeats":
        pairs += [(f"k{i:05d}", doc(i, 5)) for i in rng.sample(range(BIG), 300)]
        pairs.insert(10, (f"k{BIG - 1:05d}", doc(0, 6)))  # an early put of a key put again later
    await store.put_many("last", {"k00001": {"old": True}, "other": {"kept": True}})
    assert await store.put_many("last", pairs) == len(pairs)
    assert {k: d async for k, d in store.items("last")} == {"other": {"kept": True}, **dict(pairs)}
