"""Indexes: persistent on both backends, kept exact through every kind of write, and used by the query plans
(PostgreSQL: checked in the plan with EXPLAIN; JSON: the plans that walk or bisect an index give the reference's
answers, also when they fall back to a scan in a worker thread)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from datetime import datetime, timezone
from typing import Any

import pytest

import storage
from storage.backends.json import query as json_query
from storage.backends.postgres import query as pg_query
from storage.query import parse_query
from tests._turns import turns_during
from tests.test_queries import PATHS, check_random_queries, load, rand_doc, rand_key, ref_find


async def test_indexes_persist_and_drop(store: storage.Store, reopen: Any):
    await store.put_many("m", {f"k{i}": {"s": {"n": i}, "name": f"n{i % 5}"} for i in range(30)})
    assert await store.ensure_index("m", "s.n") is True
    assert await store.ensure_index("m", "s.n") is False
    assert await store.ensure_index("m", "name") is True
    assert await store.indexes("m") == ["name", "s.n"]
    assert await store.indexes("other") == []
    await store.close()
    again = await reopen()
    try:
        assert await again.indexes("m") == ["name", "s.n"]
        found = await again.find("m", {"s.n": {"$gte": 25}}, order_by="-s.n", limit=2)
        assert [k for k, _ in found] == ["k29", "k28"]
        assert await again.count("m", {"name": "n1"}) == 6
        assert await again.drop_index("m", "name") is True
        assert await again.drop_index("m", "name") is False
        assert await again.indexes("m") == ["s.n"]
        assert await again.count("m", {"name": "n1"}) == 6
    finally:
        await again.close()


async def test_read_only_store_refuses_index_changes(store: storage.Store, store_config: storage.StoreConfig):
    await store.put("m", "a", {"x": 1})
    await store.ensure_index("m", "x")
    ro = await storage.open_store(config=dataclasses.replace(store_config, read_only=True))
    try:
        with pytest.raises(storage.DatabaseError):
            await ro.ensure_index("m", "y")
        with pytest.raises(storage.DatabaseError):
            await ro.drop_index("m", "x")
        assert await ro.indexes("m") == ["x"]
        assert [k for k, _ in await ro.find("m", {"x": 1})] == ["a"]
    finally:
        await ro.close()


async def test_json_index_follows_another_process(tmp_path):
    """Writes committed by another store on the same folder (its journal lines) reach this store's index."""
    path = str(tmp_path / "data")
    first = await storage.open_store(backend="json", path=path)
    second = await storage.open_store(backend="json", path=path)
    try:
        await first.put_many("m", {f"k{i}": {"score": i} for i in range(10)})
        await first.ensure_index("m", "score")
        await second.put("m", "k3", {"score": 100})
        await second.put("m", "new", {"score": 50})
        await second.delete("m", "k9")
        top = await first.find("m", order_by="-score", limit=3)
        assert [(k, d["score"]) for k, d in top] == [("k3", 100), ("new", 50), ("k8", 8)]
        assert [k for k, _ in await first.find("m", {"score": 3})] == []
        assert await first.count("m", {"score": {"$gte": 8}}) == 3
    finally:
        await first.close()
        await second.close()


async def test_json_declarations_of_two_processes_never_undo_each_other(tmp_path):
    """Two stores on one folder (shards, or a bot and a CLI), each opened before the other declared: a declaration
    or a drop starts from what ``storage.indexes`` holds, so both keep theirs, and the store that changes the
    declarations takes up (and builds) the other's. Before, the second write left only its own view in the file."""
    path = tmp_path / "data"
    first = await storage.open_store(backend="json", path=str(path))
    await first.put_many("m", {f"k{i}": {"x": i, "y": i % 3, "z": -i} for i in range(20)})
    second = await storage.open_store(backend="json", path=str(path))
    try:
        assert await first.ensure_index("m", "x") is True
        assert await second.ensure_index("m", "y") is True
        assert json.loads((path / "storage.indexes").read_text()) == {"m": ["x", "y"]}
        assert await second.indexes("m") == ["x", "y"]
        assert sorted(second._tables.indexes.of("m").paths) == ["x", "y"]  # built here too, not only declared
        assert await second.ensure_index("m", "x") is False  # the other's declaration counts as existing
        assert [k for k, _ in await second.find("m", {"x": {"$gte": 18}})] == ["k18", "k19"]
        assert await first.drop_index("m", "x") is True  # takes up "y" before dropping "x"
        assert json.loads((path / "storage.indexes").read_text()) == {"m": ["y"]}
        assert await second.ensure_index("m", "z") is True  # and "x", dropped by the other, stays dropped
        assert json.loads((path / "storage.indexes").read_text()) == {"m": ["y", "z"]}
        assert sorted(second._tables.indexes.of("m").paths) == ["y", "z"]
        assert await second.count("m", {"x": {"$gte": 18}}) == 2  # answers unchanged without the index
    finally:
        await first.close()
        await second.close()
    again = await storage.open_store(backend="json", path=str(path))
    try:
        assert await again.indexes("m") == ["y", "z"]
    finally:
        await again.close()


async def test_json_a_damaged_declaration_file_is_rewritten_from_the_stores_own(tmp_path):
    """A ``storage.indexes`` that is not a declaration file is not taken up (it would drop every index): the store
    keeps its own declarations and its next change writes them back, with the new one."""
    path = tmp_path / "data"
    async with storage.open_store(backend="json", path=str(path)) as store:
        await store.put_many("m", {f"k{i}": {"x": i, "y": i} for i in range(5)})
        await store.ensure_index("m", "x")
        (path / "storage.indexes").write_text("{not json")
        assert await store.ensure_index("m", "y") is True
        assert json.loads((path / "storage.indexes").read_text()) == {"m": ["x", "y"]}
        assert sorted(store._tables.indexes.of("m").paths) == ["x", "y"]


async def test_json_index_survives_compaction_backup_and_restore(tmp_path):
    rng = random.Random(1410)
    store = await storage.open_store(backend="json", path=str(tmp_path / "data"),
                                     backup_dir=str(tmp_path / "backups"))
    try:
        stored = await load(store, rng, 120)
        for path in ("a", "c.d", "tags"):
            await store.ensure_index("q", path)
        assert store.owns_entry("storage.indexes", False)
        assert store.foreign_files() == {}
        info = await store.create_backup()
        changed = {rand_key(rng, 500 + i): rand_doc(rng) for i in range(40)}
        await store.put_many("q", changed)
        await store.compact()
        now = {k: d async for k, d in store.items("q")}
        await check_random_queries(store, now, rng, 60)
        await store.restore_backup(info.id)
        assert await store.indexes("q") == ["a", "c.d", "tags"]  # the store's indexes, over the restored data
        await check_random_queries(store, stored, rng, 60)
        declared = json.loads((tmp_path / "data" / "storage.indexes").read_text())
        assert declared == {"q": ["a", "c.d", "tags"]}
    finally:
        await store.close()


async def test_json_plans_that_fall_back_give_the_same_answers(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Tiny budgets force every plan's other branch: walks that give up, candidates filtered in a worker thread."""
    monkeypatch.setattr(json_query, "INLINE", 3)
    monkeypatch.setattr(json_query, "SCAN_CHUNK", 7)
    monkeypatch.setattr(json_query, "PREFILTER_BYTES", 300)  # prefiltered chunks of a few documents
    monkeypatch.setattr(json_query, "WALK_BUDGET", 5)
    monkeypatch.setattr(json_query, "WALK_STEPS", 40)
    rng = random.Random(1411)
    store = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:
        stored = await load(store, rng, 150)
        await check_random_queries(store, stored, rng, 150)
        for path in PATHS:
            await store.ensure_index("q", path)
        await check_random_queries(store, stored, rng, 250)
    finally:
        await store.close()


async def test_json_large_find_is_a_snapshot_and_lets_the_loop_run(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An unindexed find over many documents runs in a worker thread: other tasks get turns meanwhile, and what they
    write does not change the answer, which is the collection as it was when the call started."""
    store = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:
        await store.put_many("m", {f"k{i:05d}": {"n": i % 10, "pad": "x" * 50} for i in range(20_000)})

        async def writer() -> None:
            await store.put("m", "k99999", {"n": 3})
            await store.delete("m", "k00003")

        write = asyncio.create_task(writer())
        found, turns = await turns_during(store.find("m", {"n": 3}))  # its snapshot is taken at the call's start
        await write
        assert turns > 3
        keys = [k for k, _ in found]
        assert len(keys) == 2000 and keys[0] == "k00003" and "k99999" not in keys
        assert await store.count("m", {"n": 3}) == 2000  # now: one deleted, one added
    finally:
        await store.close()


# -- PostgreSQL: the planner uses the indexes --------------------------------------------------------------------
def _plan_nodes(plan: Any) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _plan_nodes(child)
    return out


async def _explain(conn: Any, collection: str, query: Any, indexed: frozenset[str]) -> list[dict[str, Any]]:
    sql, params = pg_query.build_find(collection, query, indexed, datetime.now(timezone.utc))
    doc = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *params)
    if isinstance(doc, str):
        doc = json.loads(doc)
    return _plan_nodes(doc[0]["Plan"])


async def test_postgres_plans_use_the_indexes(pg_store: Any):
    """EXPLAIN, not timing: equality, a range and a top-N order read the path's indexes, in custom and in generic
    (prepared statement) plans."""
    docs = {f"{g}_{u:05d}": {"statistics": {"message_count": (u * 37) % 5000, "rank": f"r{u % 300:03d}"},
                             "roles": [f"role{u % 50}", "member"], "guild": g}
            for g in range(4) for u in range(5000)}
    docs.update({f"x_{i}": {"statistics": {"message_count": "many"}} for i in range(20)})  # mixed types
    await pg_store._put_stored("members", docs)  # mixed types on purpose: the member rule would refuse them
    await pg_store.put_many("other", {f"o{i}": {"statistics": {"message_count": i}} for i in range(3000)})
    for path in ("statistics.message_count", "roles", "statistics.rank"):
        await pg_store.ensure_index("members", path)
    indexed = frozenset(await pg_store.indexes("members"))
    async with pg_store.pool.acquire() as conn:
        cases = {
            "equality": (parse_query({"statistics.message_count": 1234}), "_eq"),
            "list contains": (parse_query({"roles": "role7"}), "_eq"),
            "in": (parse_query({"roles": {"$in": ["role7", "role8"]}}), "_eq"),
            "range": (parse_query({"statistics.message_count": {"$gte": 4990}}), "_num"),
            "string range": (parse_query({"statistics.rank": {"$lt": "r002"}}), "_str"),
            "top-10": (parse_query(order_by="-statistics.message_count", limit=10), "_num"),
            "top-10 ascending": (parse_query(order_by="statistics.message_count", limit=10), "_num"),
            "top-10 by string": (parse_query(order_by="-statistics.rank", limit=10), "_str"),
        }
        for mode in ("auto", "force_generic_plan"):  # custom plans, then generic ones (prepared statements)
            await conn.execute(f"SET plan_cache_mode = {mode}")
            for what, (query, suffix) in cases.items():
                nodes = await _explain(conn, "members", query, indexed)
                used = {n.get("Index Name", "") for n in nodes}
                assert any(name.startswith("storage_q_") and name.endswith(suffix) for name in used), \
                    (mode, what, nodes[0])
                assert not any(n["Node Type"] == "Seq Scan" for n in nodes), (mode, what)
                if what.startswith("top-10"):  # the last group (missing, other types) comes from its own index
                    assert any(name.endswith("_other") for name in used), (mode, what, nodes[0])
        await conn.execute("RESET plan_cache_mode")
        # and they give the same answer as the Python reference
        stored = {k: d async for k, d in pg_store.items("members")}
        for query_args in ({"where": {"statistics.message_count": {"$gte": 4990}},
                            "order_by": "-statistics.message_count", "limit": 7},
                           {"where": {"roles": "role7"}, "order_by": "statistics.rank", "limit": 5, "offset": 2}):
            found = await pg_store.find("members", query_args["where"], order_by=query_args["order_by"],
                                        limit=query_args["limit"], offset=query_args.get("offset", 0))
            assert [k for k, _ in found] == ref_find(stored, query_args["where"], None, query_args["order_by"],
                                                      query_args["limit"], query_args.get("offset", 0))
