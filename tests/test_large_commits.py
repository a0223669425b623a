"""Large writes give the event loop turns and stay all-or-nothing (issue 15: no call holds a bot's loop > 20 ms).

``put_many`` of more than ``documents.ENCODE_TURN`` items encodes them in slices with a loop turn between (both
backends); the JSON backend encodes and plans a commit of more than ``store.LARGE_COMMIT`` operations in a worker
thread and applies it with C-level dict updates. Checked against plain-Python references: the same documents,
the same error for the same bad item, and, on JSON, the in-memory sizes compaction relies on.
"""

from __future__ import annotations

import asyncio
import random

import pytest

import storage
from storage import ValidationError
from storage.backends.json.snapshot import OVERHEAD
from storage.backends.json.store import LARGE_COMMIT
from storage.documents import ENCODE_TURN

BIG = max(ENCODE_TURN, LARGE_COMMIT) + 500


def doc(i: int, version: int = 0) -> dict[str, object]:
    return {"i": i, "v": version, "tags": [f"t{i % 7}"]}


async def test_a_large_put_many_writes_everything_and_gives_the_loop_turns(store, reopen) -> None:
    await store.put_many("big", {f"k{i:05d}": doc(i) for i in range(0, BIG, 3)})  # some keys exist already
    expected = {f"k{i:05d}": doc(i) for i in range(0, BIG, 3)}
    update = {f"k{i:05d}": doc(i, 1) for i in range(BIG)}
    expected.update(update)
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    assert await store.put_many("big", update) == BIG
    tick.cancel()
    assert turns - before >= BIG // ENCODE_TURN - 1  # at least one turn per encoded slice
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
