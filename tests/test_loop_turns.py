"""Long reads give the event loop turns in bounded steps (issue 15: no call holds a bot's loop over 20 ms).

The JSON message scan yields a turn every ``SCAN_TURN`` records, and the analytics queries count column blocks cut
to at most ``COLUMN_BLOCK`` rows with a turn between them. Timing is measured in benchmarks/bench_stalls.py; here
the turns are counted (deterministic), and the answers are checked to be the same whatever the cut.
"""

from __future__ import annotations

import asyncio
import random
from array import array
from typing import Any

import pytest

import storage
from storage.backends.json import messages as json_messages
from storage.messages.columns import MessageColumns


def _records(n: int, guild: str = "7") -> list[dict[str, Any]]:
    rng = random.Random(11)
    return [{"message_id": str(1_000 + i), "guild_id": guild, "channel_id": str(rng.choice([5, 6, 8])),
             "author_id": str(rng.randrange(1, 40)), "timestamp": f"2024-03-{rng.randrange(1, 29):02d}T"
             f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z", "content_length": rng.randrange(50),
             "analysis": {"sentiment": rng.choice(["positive", "negative", None]),
                          "topics": rng.sample(["a", "b", "c", "d"], rng.randrange(3))}} for i in range(n)]


def test_parts_cut_a_block_into_bounded_blocks_that_add_up_to_it():
    n = 23
    block = MessageColumns(array("q", range(n)), tuple(f"a{i}" for i in range(n)), tuple(f"c{i}" for i in range(n)),
                           tuple(None if i % 3 else "positive" for i in range(n)), tuple((str(i),) for i in range(n)))
    assert block.parts(23) == [block] and block.parts(100) == [block]
    parts = block.parts(5)
    assert [len(p) for p in parts] == [5, 5, 5, 5, 3]
    for field in ("micros", "authors", "channels", "sentiments", "topics"):
        assert [x for p in parts for x in getattr(p, field)] == list(getattr(block, field))


async def _answers(store: storage.Store) -> list[Any]:
    return [await store.top_authors(7, limit=50), await store.top_channels(7), await store.top_topics(7),
            await store.message_counts(7), await store.message_counts(7, by="day"),
            await store.message_counts(7, by="author"), await store.sentiment_breakdown(7),
            await store.last_activity(7, 3), await store.message_counts(7, since="2024-03-10", until="2024-03-20")]


async def test_query_answers_do_not_depend_on_the_block_cut(store: storage.Store, monkeypatch: pytest.MonkeyPatch):
    """The same answers with blocks cut to 7 rows (many loop turns) as whole; on PostgreSQL SQL answers them, and
    the records are the same: both backends give the same answers (tests/test_analytics.py compares them too)."""
    await store.record_messages(_records(300))
    whole = await _answers(store)
    real = MessageColumns.parts
    cuts: list[int] = []

    def small(self: MessageColumns, size: int = 7) -> list[MessageColumns]:
        out = real(self, 7)
        cuts.append(len(out))
        return out

    monkeypatch.setattr(MessageColumns, "parts", small)
    assert await _answers(store) == whole
    if store.backend_name == "json":
        assert cuts and max(cuts) > 1


async def _turns_during(aiter: Any) -> tuple[int, list[Any]]:
    """How many times a concurrent task ran while ``aiter`` was consumed (without awaiting anything else)."""
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    start = ticks
    try:
        got = [item async for item in aiter]
    finally:
        running = False
        await task
    return ticks - start, got


async def test_json_scan_and_columns_give_the_loop_turns(store: storage.Store, monkeypatch: pytest.MonkeyPatch):
    if store.backend_name != "json":
        pytest.skip("the JSON message log's own turns (PostgreSQL awaits the server for every fetch)")
    records = _records(1_200)
    await store.record_messages(records)
    monkeypatch.setattr(json_messages, "SCAN_TURN", 100)
    turns, scanned = await _turns_during(store.scan_messages(7))
    assert len(scanned) == 1_200 and turns >= 1_200 // 100 - 1
    assert sorted(r["message_id"] for r in scanned) == sorted(r["message_id"] for r in records)
    real = MessageColumns.parts
    monkeypatch.setattr(MessageColumns, "parts", lambda self, size=100: real(self, 100))
    turns, blocks = await _turns_during(store._scan_message_columns("7", None, None))  # type: ignore[attr-defined]
    assert sum(len(b) for b in blocks) == 1_200 and len(blocks) == 12 and turns >= 11


async def test_json_close_frees_the_message_index_and_cache_off_the_loop(store_config: Any):
    """Closing hands the message id index and the column cache to a worker thread to free (dropping them in one
    go held the loop 25-40 ms at 1M messages); the store still closes and reopens whole, also when cancelled."""
    if store_config.backend != "json":
        pytest.skip("the JSON message log's index and cache")
    records = _records(500)
    for cancel in (False, True):
        store: Any = await storage.open_store(config=store_config)
        await store.record_messages(records)  # builds the id index
        assert await store.message_counts(7) == 500  # fills the column cache
        log = store._messages
        assert log._index and log._cache._files
        closing = asyncio.ensure_future(store.close())
        turns, _ = await _turns_during(_until_done(closing, cancel))
        assert turns >= 1 and closing.done()
        assert log._index is None and not log._cache._files and log._pool is None
        async with storage.open_store(config=store_config) as again:
            assert await again.message_counts(7) == 500


async def _until_done(task: asyncio.Future[Any], cancel: bool) -> Any:
    await asyncio.sleep(0)
    if cancel:
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        assert cancel
    return
    yield  # an async generator for _turns_during


@pytest.mark.parametrize("n", [0, 1, 2, 1999, 2000, 2001, 4001])
def test_snapshot_parts_are_the_seed_layout(n: int, tmp_path: Any):
    """Compaction writes a snapshot in parts (no GIL-holding join of the whole file): the bytes are exactly the
    one-document-per-line layout, and the parts' crc is the file's."""
    import zlib

    import orjson

    from storage.backends.json.snapshot import RENDER_PART, read_snapshot, render_parts
    from storage.fsutil import atomic_write

    coll = {f"k{i}": orjson.dumps({"i": i, "ü": [i]}) for i in range(n)}
    whole = b"{\n" + b",\n".join(b"  " + orjson.dumps(k) + b": " + v for k, v in coll.items()) + b"\n}\n" \
        if coll else b"{}\n"
    parts = render_parts(coll)
    assert b"".join(parts) == whole and len(parts) == (1 if not n else -(-n // RENDER_PART) + 1)
    path = tmp_path / "c.json"
    atomic_write(path, parts)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    assert path.read_bytes() == whole and crc == zlib.crc32(whole)
    loaded = read_snapshot(path, crc)
    assert not isinstance(loaded, str) and dict(loaded[0]) == coll


async def test_a_sliced_put_many_is_all_or_nothing_under_cancellation(store: storage.Store,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """PostgreSQL sends a large ``put_many`` as several statements (the loop runs between them) in one
    transaction: cancelled after any number of loop turns, either every document is there or none. (The JSON
    backend has its own turns while encoding a large batch: the same must hold.)"""
    from storage.backends.postgres import notify

    monkeypatch.setattr(notify, "PUT_SLICE", 3)
    docs = {f"k{i:02d}": {"n": i, "ü": [i]} for i in range(10)}
    for turns in range(400):
        name = f"sliced{turns}"
        task = asyncio.ensure_future(store.put_many(name, docs))
        for _ in range(min(turns, 30)):  # every loop turn, then (the server takes time) every 0.5 ms
            await asyncio.sleep(0)
        if turns > 30:
            await asyncio.sleep((turns - 30) * 0.0005)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        got = {key: doc async for key, doc in store.items(name)}
        assert got in ({}, docs), f"a partial put_many after {turns} loop turns"
        if got == docs and task.done() and not task.cancelled():
            break
    else:
        pytest.fail("the put_many never finished")
    assert await store.put_many("sliced", docs) == 10 and await store.count("sliced") == 10


def test_top_first_is_the_full_sort_with_ties():
    """``top``'s shortcut (the limit-th largest count found first, then only the entries at or above it sorted)
    gives exactly the full sort's answer: many ties, limits from 0 to past the end."""
    from collections import Counter

    from storage.backends.json.message_queries import _first

    rng = random.Random(3)
    for _ in range(200):
        counts = Counter({f"u{rng.randrange(10**6)}": rng.randrange(1, 6) for _ in range(rng.randrange(0, 40))})
        for limit in range(0, len(counts) + 3):
            assert _first(counts, limit) == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


async def test_items_of_a_large_collection(store: storage.Store):
    """Over ``ITEMS_INLINE`` documents the JSON store copies the collection (one C call) and picks and sorts the
    pairs in a worker thread: the same answer as a small one's, prefix and expiry included, on both backends; on
    JSON, writes made after the first item do not show (the iteration is the collection when it began)."""
    from storage.backends.json.store import ITEMS_INLINE

    n = ITEMS_INLINE + 700
    docs = {f"{1 + i % 3}_{i:05d}": {"i": i} for i in range(n)}
    await store.put_many("big", docs)
    await store.put("big", "2_99999", {"soon": True}, ttl=0.05)
    await asyncio.sleep(0.1)  # expired: absent from the iteration
    for prefix in (None, "2_", "9_"):
        want = sorted((k, d) for k, d in docs.items() if prefix is None or k.startswith(prefix))
        assert [pair async for pair in store.items("big", prefix=prefix)] == want
    if store.backend_name != "json":
        return
    seen = []
    async for key, doc in store.items("big", prefix="1_"):
        if not seen:
            await store.put("big", "1_00000a", {"late": True})
            await store.delete("big", "1_00003")
        seen.append((key, doc))
    assert seen == sorted((k, d) for k, d in docs.items() if k.startswith("1_"))
