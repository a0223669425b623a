"""store.watch() and the coherent cache (issue 16): real processes, the real server, reference models."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

import storage
from storage import Change, FeedUnavailableError, StoreConfig
from storage.backends.postgres.notify import INLINE_DOC, PIECE
from tests._feed_child import expected, plan
from tests._proc import ROOT, config_arg

CHILD = Path(__file__).with_name("_feed_child.py")


def spawn_writer(config: StoreConfig, prefix: str, seed: int, count: int, compact: int = 0) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(CHILD), config_arg(config), prefix, str(seed), str(count),
                             str(compact)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


async def next_change(watch: storage.Watch, timeout: float = 30) -> Change:
    """The next change (a generous bound: a hang fails the test instead of the suite)."""
    return await asyncio.wait_for(watch.__anext__(), timeout)


async def wait_for_change(watch: storage.Watch, collection: str, key: str) -> Change:
    """Skip to the change of ``key`` (a sync point: after it, that commit's notification has been handled)."""
    while True:
        change = await next_change(watch)
        if change.op == "resync" or (change.collection, change.key) == (collection, key):
            return change


# -- in one process ---------------------------------------------------------------------------------------------------
async def test_watch_sees_this_and_another_store(store, reopen):
    other = await reopen()
    try:
        async with store.watch("feed") as mine, other.watch(prefix="k") as theirs:
            await store.put("feed", "k1", {"n": 1})
            await other.put_many("feed", {"k2": {"n": 2}, "z": {"n": 3}})
            await other.delete("feed", "k1")
            assert not await other.delete("feed", "absent")  # nothing changed: no change
            await store.update("feed", "k2", lambda d: {"n": d["n"] + 10})
            await other.put("elsewhere", "k9", {"n": 9})
            want = [("feed", "k1", "put", {"n": 1}), ("feed", "k2", "put", {"n": 2}), ("feed", "z", "put", {"n": 3}),
                    ("feed", "k1", "delete", None), ("feed", "k2", "put", {"n": 12})]
            assert [tuple(await next_change(mine)) for _ in want] == want
            want_k = [c for c in want if c[1].startswith("k")] + [("elsewhere", "k9", "put", {"n": 9})]
            assert [tuple(await next_change(theirs)) for _ in want_k] == want_k
            assert mine.pending() == 0
    finally:
        await other.close()


async def test_transaction_changes_arrive_at_commit_only(store):
    async with store.watch("feed") as watch:
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:
                await tx.put("feed", "lost", {"n": 0})
                raise RuntimeError("roll back")
        async with store.transaction() as tx:
            await tx.put("feed", "a", {"n": 1})
            await tx.update("feed", "a", lambda d: {"n": d["n"] + 1})
            await tx.delete("feed", "a")
            await tx.put("feed", "b", {"n": 3})
        got = [tuple(await next_change(watch)) for _ in range(4)]
        assert got == [("feed", "a", "put", {"n": 1}), ("feed", "a", "put", {"n": 2}), ("feed", "a", "delete", None),
                       ("feed", "b", "put", {"n": 3})]  # the rolled-back put never shows


#: Documents the tests below repeat: identical notifications must all arrive (PostgreSQL drops a transaction's
#: repeats of one payload unless they differ, see postgres/notify.py). Two travel in pieces (> INLINE_DOC), and the
#: middle pieces of the last one are identical to each other.
POOL: list[dict[str, Any]] = [{"v": 0}, {"v": 1}, {"w": "x" * (INLINE_DOC + 500)}, {"t": "ab" * (2 * PIECE)}]


async def _changes_of(watch: storage.Watch, count: int) -> list[tuple[str, str, str, Any]]:
    return [tuple(await next_change(watch)) for _ in range(count)]  # type: ignore[misc]


@pytest.mark.parametrize("seed", range(4))
async def test_a_transactions_changes_arrive_in_the_order_it_made_them(store, reopen, seed):
    """Random puts, put_manys, updates, deletes and delete_manys of a few keys in one transaction, repeats
    included (a key deleted, re-put and deleted again; the same document, small or in pieces, put again and again):
    watchers here and in another store get exactly the changes a plain-Python reference lists, in order, and the
    other store's reads (PostgreSQL: its coherent cache, filled before) end equal to the reference's final state.
    (PostgreSQL sends a transaction's delete notifications together, before its next other statement or its
    commit, and delivers identical notifications of one transaction once: the store makes every one distinct.)"""
    rng = random.Random(seed)
    keys = [(collection, f"k{i}") for collection in ("feed", "other") for i in range(3)]
    state: dict[tuple[str, str], Any] = {key: POOL[0] for key in keys[::2]}
    want: list[tuple[str, str, str, Any]] = []
    other = await reopen()
    try:
        for collection, key in sorted(state):
            await store.put(collection, key, state[(collection, key)])
        for collection, key in keys:  # cached in the other store (absence too)
            assert await other.get(collection, key) == state.get((collection, key))
        async with store.watch() as watch, other.watch() as theirs:
            await store.put("feed", "start", {})
            for w in (watch, theirs):
                await wait_for_change(w, "feed", "start")  # the set-up's changes are behind us
            async with store.transaction() as tx:
                for _ in range(60):
                    collection, key = rng.choice(keys)
                    doc = rng.choice(POOL)
                    op = rng.random()
                    if op < 0.3:
                        deleted = await tx.delete(collection, key)
                        assert deleted == ((collection, key) in state)
                        if deleted:
                            del state[(collection, key)]
                            want.append((collection, key, "delete", None))
                    elif op < 0.4:  # one key: the prefix matches no other
                        deleted = await tx.delete_many(collection, prefix=key)
                        assert deleted == ((collection, key) in state)
                        if deleted:
                            del state[(collection, key)]
                            want.append((collection, key, "delete", None))
                    elif op < 0.75:
                        await tx.put(collection, key, doc)
                        state[(collection, key)] = doc
                        want.append((collection, key, "put", doc))
                    elif op < 0.85:  # two keys of one collection, the same document
                        pair = sorted({key, rng.choice(keys[:3] if collection == "feed" else keys[3:])[1]})
                        await tx.put_many(collection, {k: doc for k in pair})
                        for k in pair:
                            state[(collection, k)] = doc
                            want.append((collection, k, "put", doc))
                    else:
                        got = await tx.update(collection, key, lambda d, doc=doc: dict(doc), default={})
                        assert got == doc
                        state[(collection, key)] = doc
                        want.append((collection, key, "put", doc))
                await tx.put("feed", "end", {})
            want.append(("feed", "end", "put", {}))
            assert await _changes_of(watch, len(want)) == want
            assert await _changes_of(theirs, len(want)) == want
        for collection, key in keys:
            assert await other.get(collection, key) == state.get((collection, key)), (collection, key)
    finally:
        await other.close()


@pytest.mark.parametrize("case", ["delete-put-delete", "put-put-put", "large", "large-repeated-pieces"])
async def test_repeated_operations_in_one_transaction_all_arrive(store, reopen, case):
    """The cases of the bug: in one transaction, delete K, put K, delete K (watchers used to end believing K
    exists) or put doc1, doc2, doc1 (they used to end with doc2), small or large; a watcher in another store sees
    every change in order, and that store's reads and member reads (its coherent cache) end right."""
    small1, small2 = {"n": 1}, {"n": 2}
    large1, large2 = {"w": "x" * (INLINE_DOC + 500)}, {"w": "y" * (INLINE_DOC + 500)}
    repeated1, repeated2 = {"t": "ab" * (2 * PIECE)}, {"t": "ba" * (2 * PIECE)}
    doc1, doc2 = {"put-put-put": (small1, small2), "large": (large1, large2),
                  "large-repeated-pieces": (repeated1, repeated2)}.get(case, (small1, small2))
    key = "1_7"  # a member key: get_member_data(7, 1)
    other = await reopen()
    try:
        await store.put("members", key, doc1)
        assert await other.get_member_data(7, 1) == doc1  # cached there
        async with other.watch() as watch:
            await store.put("feed", "start", {})
            await wait_for_change(watch, "feed", "start")
            async with store.transaction() as tx:
                if case == "delete-put-delete":
                    for _ in range(2):
                        assert await tx.delete("members", key)
                        await tx.put("members", key, doc1)
                    assert await tx.delete("members", key)
                    want = [("members", key, "delete", None), ("members", key, "put", doc1)] * 2
                    want.append(("members", key, "delete", None))
                    final = None
                else:
                    for doc in (doc1, doc2, doc1, doc2, doc1):
                        await tx.put("members", key, doc)
                    want = [("members", key, "put", doc) for doc in (doc1, doc2, doc1, doc2, doc1)]
                    final = doc1
                await tx.put("feed", "end", {})
            want.append(("feed", "end", "put", {}))
            assert await _changes_of(watch, len(want)) == want
        assert await other.get("members", key) == final
        assert await other.get_member_data(7, 1) == (final or {})
    finally:
        await other.close()


async def test_the_same_large_document_twice_in_one_call(store, reopen):
    """Outside a transaction too: one put_many of two keys with the same large document (its pieces sent twice in
    the statement's transaction), and one put of a document whose pieces are identical to each other."""
    other = await reopen()
    try:
        async with other.watch("big") as watch:
            await store.put_many("big", {"a": POOL[2], "b": POOL[2], "c": POOL[3]})
            await store.put("big", "d", POOL[3])
            want = [("big", "a", "put", POOL[2]), ("big", "b", "put", POOL[2]), ("big", "c", "put", POOL[3]),
                    ("big", "d", "put", POOL[3])]
            assert await _changes_of(watch, len(want)) == want
        for key in "abcd":
            assert await other.get("big", key) == (POOL[2] if key in "ab" else POOL[3])
    finally:
        await other.close()


async def test_each_watcher_gets_fresh_documents(store):
    w1, w2 = store.watch("feed"), store.watch("feed")
    await w1.ready()
    await w2.ready()
    await store.put("feed", "k", {"list": [1]})
    c1, c2 = await next_change(w1), await next_change(w2)
    c1.doc["list"].append(2)  # type: ignore[index]
    assert c2.doc == {"list": [1]}
    await w1.aclose()
    await w2.aclose()


async def test_slow_consumer_gets_one_resync_instead_of_a_backlog(store):
    feed = store._change_feed()
    feed.limit = 20
    async with store.watch("feed") as watch:
        for i in range(45):
            await store.put("feed", f"k{i:02d}", {"i": i})
        await store.put("feed", "last", {})
        seen: list[Change] = []
        while not seen or seen[-1].key != "last":
            seen.append(await next_change(watch))
        assert seen[0].op == "resync"
        assert watch.overflows >= 1
        assert len(seen) <= 21  # never more than the bound queued
        puts = [c for c in seen if c.op == "put"]
        assert [c.doc for c in puts[:-1]] == [{"i": int(c.key[1:])} for c in puts[:-1]]  # the tail, in order


async def test_closing_the_store_ends_watchers_and_leaves_no_task(store_config):
    before = set(asyncio.all_tasks())
    s = await storage.open_store(config=store_config)
    watch = s.watch()
    await watch.ready()
    other = s.watch("x")
    consumer = asyncio.create_task(_drain(other))
    await s.put("x", "k", {})
    await s.close()
    assert [c.key async for c in watch] == ["k"]  # what was queued, then the end
    assert await asyncio.wait_for(consumer, 10) == ["k"]
    await asyncio.sleep(0)
    assert set(asyncio.all_tasks()) - before == {asyncio.current_task()} - before
    with pytest.raises(storage.StoreClosedError):
        s.watch()


async def _drain(watch: storage.Watch) -> list[str]:
    return [c.key async for c in watch]


async def test_break_and_aclose_unsubscribe(store):
    async with store.watch("feed") as keep:
        watch = store.watch("feed")
        await store.put("feed", "a", {})
        async for change in watch:
            assert change.key == "a"
            break
        await watch.aclose()
        del watch
        feed = store._change_feed()
        assert len(feed._subs) == 1  # only `keep` is left
        assert (await next_change(keep)).key == "a"


async def test_watch_arguments_are_checked(store):
    with pytest.raises(storage.ValidationError):
        store.watch("../bad")
    with pytest.raises(storage.ValidationError):
        store.watch(prefix=3)  # type: ignore[arg-type]


# -- several processes ------------------------------------------------------------------------------------------------
def _apply(model: dict[str, Any], change: Change) -> None:
    if change.op == "put":
        model[change.key] = change.doc
    else:
        model.pop(change.key, None)


@pytest.mark.parametrize("writers", [1, 3])
async def test_watcher_sees_every_writer_process_commit_sequence(store, store_config, writers):
    """2 and 4 processes: each writer's committed sequence, exactly, in order, across compactions (JSON)."""
    count = 120
    async with store.watch("feed") as watch:
        # compact several times, but not twice between two looks of the watcher (5 ms): the journal it missed would
        # be gone, and it could only reload and resync (in production a compaction needs a megabyte of writes)
        compact = 32768
        procs = [spawn_writer(store_config, f"w{n}_", seed=n, count=count, compact=compact) for n in range(writers)]
        got: dict[str, list[tuple[str, str, Any]]] = {f"w{n}_": [] for n in range(writers)}
        finished = 0
        while finished < writers:
            change = await next_change(watch, 120)
            assert change.op != "resync"
            prefix = change.key.split("_")[0] + "_"
            got[prefix].append((change.key, change.op, change.doc))
            finished += change.key.endswith("done")
        for proc in procs:
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        for n in range(writers):
            assert got[f"w{n}_"] == expected(plan(f"w{n}_", n, count))
    if store.backend_name == "json":
        assert store.stats()["journal_generation"] >= 2  # a writer compacted while we followed


async def test_pg_killed_listener_resyncs_then_follows_again(pg_dsn):
    config = StoreConfig(backend="postgres", dsn=pg_dsn, source="tests")
    store = await storage.open_store(config=config)
    count = 400
    try:
        async with store.watch("feed") as watch:
            proc = spawn_writer(config, "w0_", seed=7, count=count)
            want = expected(plan("w0_", 7, count))
            model: dict[str, Any] = {}
            seen: list[tuple[str, str, Any]] = []
            resyncs = 0
            after_resync: list[tuple[str, str, Any]] = []
            while "w0_done" not in model:
                change = await next_change(watch, 60)
                if change.op == "resync":
                    resyncs += 1
                    model = {k: d async for k, d in store.items("feed")}  # what a consumer does: reload
                    after_resync = []
                    continue
                _apply(model, change)
                entry = (change.key, change.op, change.doc)
                (after_resync if resyncs else seen).append(entry)
                if len(seen) == 40 and not resyncs:
                    async with _admin(pg_dsn) as admin:
                        pid = store._pgfeed.listener.pid
                        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert resyncs >= 1
            assert seen == want[:len(seen)]  # before the loss: exactly the writer's sequence
            if after_resync:  # after it: a contiguous run of it again, up to the end
                run = len(after_resync)
                assert want[-run:] == after_resync
            assert model == {k: d async for k, d in store.items("feed")}
            assert store._pgfeed.listener.connects >= 2
    finally:
        await store.close()


class _admin:
    """An asyncpg connection as an async context manager (for pg_terminate_backend)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None

    async def __aenter__(self) -> Any:
        self.conn = await asyncpg.connect(self.dsn)
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


# -- the coherent cache -----------------------------------------------------------------------------------------------
async def test_coherent_cache_against_a_reference_model(pg_config):
    """Random interleavings of another store's writes (another process as far as the cache can tell: its own pool
    and listener), this store's writes and reads, and concurrent read/write races. After each other-store write is
    seen by the feed (the sync point), every read equals the model; this store's own writes are seen at once."""
    reader = await storage.open_store(config=pg_config)
    writer = await storage.open_store(config=pg_config)
    assert reader._coherent is not None and reader._coherent.live
    rng = random.Random(16)
    model: dict[str, Any] = {}
    keys = [f"k{i}" for i in range(6)]
    try:
        async with reader.watch("c") as watch:
            for step in range(300):
                key = rng.choice(keys)
                roll = rng.random()
                doc = {"step": step}
                if roll < 0.3:  # another process writes; once its change arrives no read may be older
                    if rng.random() < 0.25 and key in model:
                        await writer.delete("c", key)
                        model.pop(key)
                    else:
                        await writer.put("c", key, doc)
                        model[key] = doc
                    await wait_for_change(watch, "c", key)
                elif roll < 0.45:  # this process writes: read-your-writes without waiting
                    await reader.put("c", key, doc)
                    model[key] = doc
                    assert await reader.get("c", key) == doc
                    await wait_for_change(watch, "c", key)
                elif roll < 0.55:  # a read racing with another process's write
                    got, _ = await asyncio.gather(reader.get("c", key), writer.put("c", key, doc))
                    assert got in (model.get(key), doc)
                    model[key] = doc
                    await wait_for_change(watch, "c", key)
                elif roll < 0.6:  # a transaction in another process
                    async with writer.transaction() as tx:
                        await tx.put("c", key, doc)
                    model[key] = doc
                    await wait_for_change(watch, "c", key)
                else:
                    got = await reader.get("c", key)
                    assert got == model.get(key), (step, key)
                    if got is not None:
                        got["mutated"] = True  # the cache hands out copies
        for key in keys:
            assert await reader.get("c", key) == model.get(key)
        assert reader._coherent.hits > 50
    finally:
        await reader.close()
        await writer.close()


async def test_cache_reader_process_never_goes_back(pg_config):
    """A writer process bumps counters; this process reads them in a loop through the cache. Once the feed has
    delivered version n of a key, no read returns less (the cache never outlives a delivered invalidation)."""
    reader = await storage.open_store(config=pg_config)
    count = 150
    try:
        async with reader.watch("feed") as watch:
            proc = spawn_writer(pg_config, "w0_", seed=3, count=count)
            delivered: dict[str, Any] = {}
            order = {(key, _canon(doc)): n for n, (key, _op, doc) in enumerate(expected(plan("w0_", 3, count)))}
            reads = 0
            while "w0_done" not in delivered:
                while watch.pending():
                    change = await next_change(watch)
                    assert change.op != "resync"
                    delivered[change.key] = change.doc
                for key in list(delivered):
                    got = await reader.get("feed", key)
                    reads += 1
                    floor = delivered[key]
                    if floor is None or got is None:
                        continue  # a delete or a re-put: covered by the model test above
                    assert order[(key, _canon(got))] >= order[(key, _canon(floor))], key
                await asyncio.sleep(0.001)
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert reads > 0
    finally:
        await reader.close()


def _canon(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


async def test_pgbouncer_without_listen_dsn_has_no_feed_and_no_cache(pg_dsn):
    config = StoreConfig(backend="postgres", dsn=pg_dsn, pgbouncer=True, source="tests")
    store = await storage.open_store(config=config)
    try:
        assert store._coherent is None
        with pytest.raises(FeedUnavailableError, match="STORAGE_LISTEN_DSN"):
            store.watch()
        await store.put("c", "k", {"n": 1})
        assert await store.get("c", "k") == {"n": 1}
    finally:
        await store.close()
    direct = dataclasses.replace(config, listen_dsn=pg_dsn)
    store = await storage.open_store(config=direct)
    try:
        assert store._coherent is not None
        async with store.watch("c") as watch:
            await store.put("c", "k", {"n": 2})
            assert (await next_change(watch)).doc == {"n": 2}
    finally:
        await store.close()


def test_cache_settings_from_the_environment():
    env = {"STORAGE_PATH": "x"}
    assert StoreConfig.from_env(env).cache_mode == "coherent"
    assert StoreConfig.from_env({**env, "STORAGE_CACHE_TTL": "5"}).cache_mode == "ttl"
    assert StoreConfig.from_env({**env, "STORAGE_CACHE": "off", "STORAGE_CACHE_SIZE": "10"}).cache_size == 10
    with pytest.raises(storage.ValidationError):
        StoreConfig.from_env({**env, "STORAGE_CACHE": "sometimes"})
    with pytest.raises(storage.ValidationError):
        StoreConfig.from_env({**env, "STORAGE_LISTEN_DSN": "nope"})
    config = StoreConfig.from_env({**env, "STORAGE_LISTEN_DSN": "postgresql://u:Secret99@h/db"})
    assert "Secret99" not in repr(config)


async def test_cache_modes_off_and_ttl(pg_dsn):
    for mode in ("off", "ttl"):
        config = StoreConfig(backend="postgres", dsn=pg_dsn, cache=mode, cache_ttl=30, source="tests")
        store = await storage.open_store(config=config)
        try:
            assert store._coherent is None
            await store.put("c", "k", {"mode": mode})
            assert await store.get("c", "k") == {"mode": mode}
            assert len(store._cache) == (1 if mode == "ttl" else 0)
            async with store.watch("c") as watch:  # the feed works whatever the cache
                await store.delete("c", "k")
                assert (await next_change(watch)).op == "delete"
        finally:
            await store.close()


async def test_json_rebase_by_another_opener_resyncs_instead_of_repeating(tmp_path):
    """Opening a store records the checksum of a snapshot it does not know by starting a journal generation with the
    old records copied (a rebase): a follower must not deliver those records twice."""
    config = StoreConfig(backend="json", path=str(tmp_path / "data"), source="tests")
    first = await storage.open_store(config=config)
    try:
        await first.put("c", "old", {"n": 1})
        async with first.watch("c") as watch:
            (tmp_path / "data" / "extra.json").write_text('{"x": {"n": 0}}')  # a snapshot no journal knows yet
            second = await storage.open_store(config=config)  # rebases: the journal's records copied
            try:
                await second.put("c", "new", {"n": 2})
                assert await first.get("c", "new") == {"n": 2}  # a read follows the journal: all is queued now
                seen = [await next_change(watch)]
                while watch.pending():
                    seen.append(await next_change(watch))
            finally:
                await second.close()
        assert seen[0].op == "resync"
        assert all(c.key != "old" for c in seen), seen
    finally:
        await first.close()


@pytest.mark.parametrize("kept", [True, False])
async def test_json_follower_that_missed_two_compactions(tmp_path, kept):
    """Two compactions between two looks of a follower: it reads the generation in between from the journal the
    compaction kept (``storage.journal.<generation>``), so its watchers miss nothing; without that file it reloads
    the snapshots and its watchers get one resync."""
    config = StoreConfig(backend="json", path=str(tmp_path / "data"), source="tests")
    follower = await storage.open_store(config=config)
    writer = await storage.open_store(config=config)
    try:
        follower._feed.interval = 3600  # looks once as the watch starts, then only when we read:
        follower._feed._folder = None  # no inotify either
        async with follower.watch("c") as watch:
            await writer.put("c", "a", {"n": 1})
            await writer.compact()
            await writer.put("c", "b", {"n": 2})
            await writer.compact()
            await writer.put("c", "a", {"n": 3})
            if not kept:
                for path in (tmp_path / "data").glob("storage.journal.*"):
                    path.unlink()
            assert await follower.get("c", "a") == {"n": 3}  # a read follows the journal
            got = [tuple(await next_change(watch)) for _ in range(3 if kept else 1)]
            assert watch.pending() == 0
        if kept:
            assert got == [("c", "a", "put", {"n": 1}), ("c", "b", "put", {"n": 2}), ("c", "a", "put", {"n": 3})]
        else:
            assert got == [("c", "", "resync", None)]
    finally:
        await writer.close()
        await follower.close()
    names = sorted(p.name for p in (tmp_path / "data").glob("storage.journal*"))
    assert len(names) <= 2  # the journal and at most one kept generation


async def test_json_watch_is_woken_by_the_folder_where_it_can(tmp_path):
    """On Linux the following task is woken by inotify (an idle watcher then costs nearly nothing); elsewhere it
    polls. Either way another store's commit arrives."""
    config = StoreConfig(backend="json", path=str(tmp_path / "data"), source="tests")
    store = await storage.open_store(config=config)
    other = await storage.open_store(config=config)
    try:
        async with store.watch("c") as watch:
            await other.put("c", "k", {"n": 1})
            assert tuple(await next_change(watch)) == ("c", "k", "put", {"n": 1})
            assert store._feed.notified == sys.platform.startswith("linux")
    finally:
        await other.close()
        await store.close()


async def test_delete_many_is_watched_and_invalidates(store, reopen):
    """delete_many (in and out of a transaction) reaches watchers, and another process's cached reads."""
    other = await reopen()
    try:
        async with other.watch("c") as watch:
            await store.put_many("c", {"a1": {"n": 1}, "a2": {"n": 2}, "b1": {"n": 3}, "b2": {"n": 4}})
            assert [(await next_change(watch)).op for _ in range(4)] == ["put"] * 4
            assert await other.get("c", "a1") == {"n": 1}  # cached there (PostgreSQL's coherent cache)
            assert await store.delete_many("c", prefix="a") == 2
            async with store.transaction() as tx:
                assert await tx.delete_many("c", {"n": 3}) == 1
            got = sorted([tuple(await next_change(watch))[:3] for _ in range(3)])
            assert got == [("c", "a1", "delete"), ("c", "a2", "delete"), ("c", "b1", "delete")]
        assert await other.get("c", "a1") is None
        assert await other.get("c", "b2") == {"n": 4}
    finally:
        await other.close()


async def test_large_commits_reach_watchers_change_by_change(store, reopen):
    """A commit of thousands of operations (the JSON store applies those through a plan made in a worker thread)
    gives every watcher, here and in another store, each change in order."""
    other = await reopen()
    try:
        keys = [f"k{i:05d}" for i in range(2500)]
        async with store.watch("big") as here, other.watch("big") as there:
            await store.put_many("big", {k: {"i": i} for i, k in enumerate(keys)})
            async with store.transaction() as tx:
                assert await tx.delete_many("big", prefix="k0") == 2500
                await tx.put("big", "k00001", {"back": True})
            want = [("big", k, "put", {"i": i}) for i, k in enumerate(keys)]
            want += [("big", k, "delete", None) for k in keys] + [("big", "k00001", "put", {"back": True})]
            for watch in (here, there):
                got = [tuple(await next_change(watch)) for _ in want]
                assert got[:2500] == want[:2500]
                assert sorted(got[2500:-1]) == sorted(want[2500:-1])  # one statement's deletes: any order
                assert got[-1] == want[-1]
                assert watch.overflows == 0
    finally:
        await other.close()


async def test_forgetting_is_watched_and_invalidates(store, reopen):
    """forget_guild / forget_user delete documents: watchers here and in another store get each delete, and the
    other store's cached reads (PostgreSQL's coherent cache) do not keep the forgotten member."""
    other = await reopen()
    try:
        await store.save_member_data(11, 1, {"statistics": {"message_count": 1}})
        await store.save_member_data(12, 1, {"statistics": {"message_count": 2}})
        await store.save_member_data(11, 2, {"statistics": {"message_count": 3}})
        assert (await other.get_member_data(11, 1))["statistics"]["message_count"] == 1  # cached there
        async with other.watch() as watch:
            # A sync point: on PostgreSQL the notifications of the puts above may still be on their way (they came
            # after the watch opened under load); the watch sees them in commit order, so after this one, only the
            # forget's deletes follow.
            await store.put("settings", "1", {"prefix": "?"})
            await wait_for_change(watch, "settings", "1")
            assert await store.forget_guild(1) == {"members": 2, "settings": 1}
            got = sorted([tuple(await next_change(watch))[:3] for _ in range(3)])
            assert got == [("members", "1_11", "delete"), ("members", "1_12", "delete"), ("settings", "1", "delete")]
            assert await store.forget_user(11) == {"members": 1}
            assert tuple(await next_change(watch))[:3] == ("members", "2_11", "delete")
        assert await other.get_member_data(11, 1) == {}
        assert await other.get_member_data(11, 2) == {}
    finally:
        await other.close()


async def test_forgetting_twice_in_one_transaction_is_watched(store, reopen):
    """A transaction forgets a guild, a member of it comes back, the guild is forgotten again: the two forgets'
    deletes are the same notification (PostgreSQL would deliver it once); watchers in another store see both, and
    that store's reads end with the member gone."""
    other = await reopen()
    try:
        member = {"statistics": {"message_count": 1}}
        await store.save_member_data(11, 1, member)
        assert await other.get_member_data(11, 1) == member  # cached there
        async with other.watch() as watch:
            await store.put("feed", "start", {})
            await wait_for_change(watch, "feed", "start")
            async with store.transaction() as tx:
                assert await tx.forget_guild(1) == {"members": 1}
                await tx.save_member_data(11, 1, member)
                assert await tx.forget_guild(1) == {"members": 1}
                await tx.put("feed", "end", {})
            want = [("members", "1_11", "delete", None), ("members", "1_11", "put", member),
                    ("members", "1_11", "delete", None), ("feed", "end", "put", {})]
            assert await _changes_of(watch, len(want)) == want
        assert await other.get_member_data(11, 1) == {}
    finally:
        await other.close()
