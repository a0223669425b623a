"""Long reads give the event loop turns in bounded steps (issue 15: no call holds a bot's loop over 20 ms).

The JSON message scan yields a turn every ``SCAN_TURN`` records, and the analytics queries count column blocks cut
to at most ``COLUMN_BLOCK`` rows with a turn between them. Timing is measured in benchmarks/bench_stalls.py; here
the turns are counted (deterministic), and the answers are checked to be the same whatever the cut.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from array import array
from typing import Any

import pytest

import storage
from storage.backends.json import messages as json_messages
from storage.backends.postgres import messages as pg_messages
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


class _Ticks:
    """``async with _Ticks() as ticks``: a concurrent task counts its loop turns in ``ticks.count`` meanwhile."""

    def __init__(self) -> None:
        self.count = 0
        self._running = True
        self._task: asyncio.Future[None] | None = None

    async def _tick(self) -> None:
        while self._running:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> _Ticks:
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._running = False
        assert self._task is not None
        await self._task


async def _turns_while(work: Any) -> tuple[int, Any]:
    """How many times a concurrent task ran while ``work`` (an awaitable) was awaited, and its result."""
    async with _Ticks() as ticks:
        start = ticks.count
        got = await work
        return ticks.count - start, got


async def _turns_during(aiter: Any) -> tuple[int, list[Any]]:
    """How many times a concurrent task ran while ``aiter`` was consumed (without awaiting anything else)."""

    async def collect() -> list[Any]:
        return [item async for item in aiter]

    return await _turns_while(collect())


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


async def test_pg_scan_gives_the_loop_a_turn_within_each_fetched_block(store: storage.Store):
    """A PostgreSQL scan fetches SCAN_BLOCK rows at a time and gives the loop a turn every SCAN_TURN records in
    between: what its consumer does per record (a backup encodes and hashes it) runs in the scan's loop step, and
    with the turn only at each fetch a block of 500 was one step of 14-21 ms CPU (``bench_stalls.py``,
    ``create_backup``). Counted: the records yielded between two turns of another task."""
    if store.backend_name != "postgres":
        pytest.skip("the PostgreSQL scan's turns (the JSON scan's are tested above)")
    assert pg_messages.SCAN_TURN < pg_messages.SCAN_BLOCK
    records = _records(1_200)
    await store.record_messages(records)
    seen: list[int] = []
    async with _Ticks() as ticks:
        async for _record in store.scan_messages(7):
            seen.append(ticks.count)
    assert len(seen) == 1_200
    run = longest = 1
    for before, after in itertools.pairwise(seen):
        run = run + 1 if after == before else 1
        longest = max(longest, run)
    assert longest <= pg_messages.SCAN_TURN


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
    from storage.backends.json.listing import ITEMS_INLINE

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


async def test_json_transaction_counts_many_staged_changes_off_the_loop(store: storage.Store):
    """A transaction's ``count`` over more than ITEMS_INLINE staged changes runs in a worker thread over a copy of
    them (a restore counts each collection after staging it: the view rebuilt on the loop took 43 ms at 100k), and
    gives the answer the view gives: puts, overwrites, deletes and expiries of the transaction counted."""
    from storage.backends.json.listing import ITEMS_INLINE

    await store.put_many("c", {f"k{i:05d}": {"i": i} for i in range(300)})
    await store.put("c", "soon", {"gone": True}, ttl=0.05)
    await asyncio.sleep(0.1)  # expired: not counted
    want = 300 - 100 + ITEMS_INLINE + 10 + 1
    async with store.transaction() as tx:
        await tx.put_many("c", {f"n{i:05d}": {"i": i} for i in range(ITEMS_INLINE + 10)})
        for i in range(100):
            await tx.delete("c", f"k{i:05d}")
        await tx.put("c", "k00100", {"again": True})  # an overwrite: counted once
        await tx.put("c", "later", {"ttl": True}, ttl=60)
        await tx.put("other", "x", {"y": 1})
        turns, n = await _turns_while(tx.count("c"))
        assert n == want
        if store.backend_name == "json":
            assert turns >= 1  # the count awaited a worker thread
        assert await tx.count("other") == 1 and await tx.count("nothing") == 0
    assert await store.count("c") == want


async def test_json_scan_frees_each_month_with_loop_turns(store: storage.Store, monkeypatch: pytest.MonkeyPatch):
    """Once a month's records are all yielded, the scan drops them SCAN_TURN at a time with a loop turn between
    (a month at 1M messages is 83k records: freeing them in one step held a copy's loop 40-55 ms)."""
    if store.backend_name != "json":
        pytest.skip("the JSON message log's scan")
    await store.record_messages(_records(1_200))  # one month
    monkeypatch.setattr(json_messages, "SCAN_TURN", 100)
    seen, at_last = 0, 0
    async with _Ticks() as ticks:
        async for _record in store.scan_messages(7):
            seen += 1
            at_last = ticks.count
        after_last = ticks.count - at_last
    assert seen == 1_200 and after_last >= 1_200 // 100 - 1


async def test_json_transaction_forget_stages_its_deletions_in_slices(store: storage.Store,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """A transaction's forget of a large guild stages its document deletions STAGE_TURN at a time (a loop turn
    between: 20k members staged at once held the loop ~30 ms), and forgets exactly what it did before."""
    if store.backend_name != "json":
        pytest.skip("the JSON transaction's staging")
    from storage.backends.json import lifecycle as json_lifecycle
    from storage.backends.json.tables import Staged

    monkeypatch.setattr(json_lifecycle, "STAGE_TURN", 100)
    await store.batch_update_members([{"user_id": 1000 + i, "guild_id": 77, "data": {"n": i}} for i in range(450)])
    await store.put("members", "78_5", {"other": True})
    await store.record_messages(_records(50, guild="77"))
    sizes: list[int] = []
    real = Staged.apply

    def apply(self: Staged, ops: list[Any]) -> None:
        sizes.append(len(ops))
        real(self, ops)

    monkeypatch.setattr(Staged, "apply", apply)
    async with store.transaction() as tx:
        await tx.put("members", "77_5", {"staged": True})  # an owned key this transaction added: forgotten too
        sizes.clear()
        assert await tx.forget_guild(77) == {"members": 451, "messages": 50}
        assert await tx.count("members") == 1
    assert sizes and max(sizes) <= 100 and sum(sizes) == 451
    assert await store.count("members") == 1 and await store.message_counts(77) == 0


async def test_json_transaction_forget_is_whole_at_any_cancellation(store: storage.Store,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Cancelled at any loop turn, a transaction's forget has staged all of the guild (documents and messages) or
    none of it, as that transaction sees it (the slices are staged to their end, then the cancellation lands)."""
    if store.backend_name != "json":
        pytest.skip("the JSON transaction's staging")
    from storage.backends.json import lifecycle as json_lifecycle

    class Abandon(Exception):
        pass

    monkeypatch.setattr(json_lifecycle, "STAGE_TURN", 50)
    await store.batch_update_members([{"user_id": 1000 + i, "guild_id": 77, "data": {"n": i}} for i in range(300)])
    await store.put("members", "78_5", {"other": True})
    await store.record_messages(_records(40, guild="77"))
    outcomes = set()
    for turns in range(0, 300, 3):
        with pytest.raises(Abandon):
            async with store.transaction() as tx:
                task = asyncio.ensure_future(tx.forget_guild(77))
                for _ in range(min(turns, 60)):
                    await asyncio.sleep(0)
                if turns > 60:
                    await asyncio.sleep((turns - 60) * 0.0005)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                members = await tx.count("members")
                left = await tx.forget_guild(77, dry_run=True)
                assert (members, left) in ((301, {"members": 300, "messages": 40}), (1, {})), f"after {turns} turns"
                outcomes.add(members)
                raise Abandon
        if outcomes == {1, 301}:
            break
    assert outcomes == {1, 301}
    assert await store.count("members") == 301 and await store.message_counts(77) == 40


async def test_json_refresh_statistics_holds_its_writes_encoded(store: storage.Store,
                                                               monkeypatch: pytest.MonkeyPatch):
    """``refresh_member_statistics`` encodes each new member document in the worker thread as soon as it is made,
    so what waits to be staged is bytes: the decoded documents it held before (a dict and a list each, 25k at
    100k members) were walked by every full garbage collection meanwhile (40-50 ms each, holding the GIL). Same
    documents written as before."""
    if store.backend_name != "json":
        pytest.skip("the JSON backend's Python refresh (PostgreSQL runs it in SQL)")
    import gc

    from storage.backends.json.transaction import JsonTransaction

    n = 3000
    await store.batch_update_members([{"user_id": 1000 + i, "guild_id": 7, "data": {"roles": ["a", str(i)],
                                       "preferences": {"x": [i]}}} for i in range(n)])
    records = _records(600)
    await store.record_messages(records)
    alive: list[int] = []
    real = JsonTransaction._put_encoded

    async def put_encoded(self: Any, collection: str, items: list[tuple[str, bytes]], expires: Any = None) -> None:
        if not alive:
            alive.append(len(gc.get_objects()))
        await real(self, collection, items, expires)

    monkeypatch.setattr(JsonTransaction, "_put_encoded", put_encoded)
    gc.collect()
    before = len(gc.get_objects())
    written = await store.refresh_member_statistics(7)
    authors = {r["author_id"] for r in records}
    assert written == n + len(authors)  # every stored member (no statistics yet) and every author (none a member)
    assert alive and alive[0] - before < n // 2, (before, alive)
    member = await store.get_member_data(1005, 7)
    assert member["roles"] == ["a", "5"] and member["statistics"] == {"message_count": 0, "last_active": None}
    some = records[0]["author_id"]
    got = (await store.get_member_data(some, 7))["statistics"]
    assert got["message_count"] == sum(r["author_id"] == some for r in records)


async def test_large_stored_writes_are_encoded_off_the_loop(store: storage.Store, monkeypatch: pytest.MonkeyPatch):
    """Restores and copies write through ``_put_stored``: a batch of more than ENCODE_TURN documents is checked and
    encoded in a worker thread (a copy's 5,000 a batch held the loop 25-55 ms), small ones inline; the documents
    written are the same either way, on a store and in a transaction."""
    import threading

    from storage import documents

    loop_thread = threading.get_ident()
    calls: list[tuple[int, bool]] = []
    real = documents.normalize_items

    def normalize(items: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((len(items), threading.get_ident() == loop_thread))
        return real(items, *args, **kwargs)

    monkeypatch.setattr(documents, "normalize_items", normalize)
    n = documents.ENCODE_TURN + 5
    big = [(f"k{i:05d}", {"i": i, "l": [i, "x"]}) for i in range(n)]
    assert await store._put_stored("c", big) == n  # type: ignore[attr-defined]
    async with store.transaction() as tx:
        assert await tx._put_stored("t", big) == n  # type: ignore[attr-defined]
        assert await tx._put_stored("t", big[:3]) == 3  # type: ignore[attr-defined]
    assert (n, False) in calls and (3, True) in calls
    assert not [size for size, on_loop in calls if on_loop and size > documents.ENCODE_TURN]
    for name in ("c", "t"):
        assert [pair async for pair in store.items(name)] == big


async def test_postgres_frames_a_large_notification_off_the_loop(store: storage.Store,
                                                                monkeypatch: pytest.MonkeyPatch):
    """PostgreSQL's ``refresh_member_statistics`` notifies every member it wrote, a forget every key it deleted:
    over NOTIFY_INLINE keys the notifications are framed in a worker thread (25k keys held the loop ~21 ms), and
    a watcher hears of them."""
    if store.backend_name != "postgres":
        pytest.skip("PostgreSQL's change notifications")
    import threading

    from storage.backends.postgres import notify
    from storage.backends.postgres.notify import NOTIFY_INLINE

    loop_thread = threading.get_ident()
    framed: list[tuple[int, bool]] = []
    real = notify.payloads

    def payloads(collection: str, items: Any, **kwargs: Any) -> list[str]:
        items = list(items)
        framed.append((len(items), threading.get_ident() == loop_thread))
        return real(collection, items, **kwargs)

    monkeypatch.setattr(notify, "payloads", payloads)
    n = NOTIFY_INLINE + 50
    await store.batch_update_members([{"user_id": 1000 + i, "guild_id": 7, "data": {"n": i}} for i in range(n)])
    framed.clear()
    async with store.watch("members") as watch:
        assert await store.refresh_member_statistics(7) == n
        seen: set[str] = set()
        async with asyncio.timeout(30):
            async for change in watch:
                seen.add(change.key)
                if len(seen) == n:
                    break
    assert (n, False) in framed and not [size for size, on_loop in framed if on_loop and size > NOTIFY_INLINE]
    framed.clear()
    async with store.transaction() as tx:  # a forget notifies its deletions the same way, on a store or a tx
        assert (await tx.forget_guild(7))["members"] == n
    assert framed == [(n, False)] and await store.count("members") == 0


async def test_copies_and_staged_restores_hold_few_message_records_at_once(store: storage.Store, tmp_path: Any,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """A copy holds the messages as lines, MESSAGE_BATCH at a time, and the target decodes them DECODE_GROUP at a
    time; a JSON restore stages them STREAM_BATCH at a time: decoded records are three containers each, walked by
    every full garbage collection while they are held (10k at a time were half of what such a collection walked).
    Everything arrives."""
    from storage.backends.json import restore as json_restore
    from storage.backup import messages as backup_messages
    from storage.backup.copy import copy
    from storage.backup.messages import DECODE_GROUP, MESSAGE_BATCH, STREAM_BATCH, MessageOps

    assert STREAM_BATCH <= 2000
    records = _records(STREAM_BATCH + 700)
    await store.record_messages(records)
    inserted: list[int] = []
    groups: list[int] = []
    real_insert_lines, real_groups = MessageOps.insert_lines, backup_messages.decoded_groups

    async def insert_lines(self: MessageOps, lines: list[bytes], digest: Any = None) -> int:
        assert all(type(line) is bytes for line in lines)
        inserted.append(len(lines))
        return await real_insert_lines(self, lines, digest)

    def decoded_groups(lines: list[bytes], digest: Any = None) -> Any:
        for group in real_groups(lines, digest):
            groups.append(len(group))
            yield group

    monkeypatch.setattr(MessageOps, "insert_lines", insert_lines)
    monkeypatch.setattr(backup_messages, "decoded_groups", decoded_groups)
    async with storage.open_store(backend="json", path=str(tmp_path / "copy"),
                                  backup_dir=str(store.config.backup_dir)) as target:  # type: ignore[attr-defined]
        report = await copy(store, target)
        assert report.messages == len(records) and await target.message_counts(7) == len(records)
        assert max(inserted) <= MESSAGE_BATCH and sum(inserted) == len(records)
        assert len(groups) >= 2 and max(groups) <= DECODE_GROUP and sum(groups) == len(records)
        staged: list[int] = []
        real_stage = json_restore.stage_messages

        def stage(path: Any, batches: Any) -> Any:
            def counted() -> Any:
                for batch in batches:
                    staged.append(len(batch))
                    yield batch
            return real_stage(path, counted())

        monkeypatch.setattr(json_restore, "stage_messages", stage)
        info = await store.create_backup()
        extra = [{**r, "message_id": str(900_000 + i)} for i, r in enumerate(_records(3, guild="8"))]
        await target.record_messages(extra)  # differs: the restore replaces the messages
        await target.put("c", "x", {"differs": True})  # and a document
        await target.restore_backup(info.id)
        assert len(staged) >= 2 and max(staged) <= STREAM_BATCH and sum(staged) == len(records)
        assert await target.message_counts(7) == len(records) and await target.message_counts(8) == 0


async def test_postgres_scan_fetches_small_blocks(store: storage.Store, monkeypatch: pytest.MonkeyPatch):
    """PostgreSQL's message scan fetches at most 500 rows at a time: asyncpg decodes a fetch's rows inside the
    loop's socket reads, and a 2,000-row fetch brought a full garbage collection into one of those steps (19-22 ms
    of CPU against 3.5 ms, 100k messages); every record still comes, in order."""
    if store.backend_name != "postgres":
        pytest.skip("PostgreSQL's cursor")
    from storage.backends.postgres import messages as pg_messages

    blocks: list[int] = []
    real = pg_messages._cursor_blocks

    async def counted(*args: Any) -> Any:
        async for rows in real(*args):
            blocks.append(len(rows))
            yield rows

    monkeypatch.setattr(pg_messages, "_cursor_blocks", counted)
    records = _records(1_200)
    await store.record_messages(records)
    scanned = [r["message_id"] async for r in store.scan_messages(7)]
    assert sorted(scanned) == sorted(r["message_id"] for r in records)
    assert blocks and max(blocks) <= 500 and sum(blocks) == 1_200
