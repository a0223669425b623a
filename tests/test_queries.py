"""find / count / delete_many on both backends, against a plain-Python reference written here.

The reference below is deliberately written from the rules in storage/query/plan.py without reusing the library's
evaluator: a "kind" per value, a recursive equality, and a comparison function for the order. Random documents
(missing fields, int/float/str/bool/null/list/dict, unicode, nested paths) and random filters must give exactly the
reference's answer (the same keys, in the same order) on the JSON files and on PostgreSQL.
"""

from __future__ import annotations

import functools
import json
import random
from typing import Any

import pytest

import storage
from storage import ValidationError

ABSENT = object()

PATHS = ["a", "b", "c.d", "c.e", "tags", "ü.ñ", "c", ",", "d"]
SCALARS: list[Any] = [0, 1, 1.0, -1, 2, 2.5, 0.1, 3, 10, -7.25, 1e20, 2**63, True, False, None,
                      "", "a", "A", "b", "ab", "é", "日本", "😀", "a b", "it's", 'say "hi"', "back\\slash", "x-1",
                      # for the JSON backend's byte prefilter: numbers spelled several ways, 64-bit edges, text
                      # that looks like JSON structure, escapes and characters beyond the BMP
                      100, 1e2, 100.0, 1e16, 1.5e-7, 2**64 - 1, -(2**63), 12345678901234567890, "a,b", "}",
                      '"d":1', "x:y", "line\nbreak", "\u2028", "日本語", "ü", "a\x01"]


# -- the reference ----------------------------------------------------------------------------------------------------
def kind(v: Any) -> str:
    if v is ABSENT:
        return "missing"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        return "list"
    return "dict"


def ref_equal(a: Any, b: Any) -> bool:
    if kind(a) != kind(b):
        return False
    if kind(a) == "list":
        return len(a) == len(b) and all(ref_equal(x, y) for x, y in zip(a, b))
    if kind(a) == "dict":
        return set(a) == set(b) and all(ref_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def ref_get(doc: Any, path: str) -> Any:
    value = doc
    for seg in path.split("."):
        if kind(value) != "dict" or seg not in value:
            return ABSENT
        value = value[seg]
    return value


def ref_eq(x: Any, v: Any) -> bool:
    return ref_equal(x, v) or (kind(x) == "list" and any(ref_equal(e, v) for e in x))


def ref_op(op: str, x: Any, v: Any) -> bool:
    if op == "$eq":
        return ref_eq(x, v)
    if op == "$ne":
        return not ref_eq(x, v)
    if op == "$in":
        return any(ref_eq(x, w) for w in v)
    if op == "$nin":
        return not any(ref_eq(x, w) for w in v)
    if op == "$exists":
        return (x is not ABSENT) == v
    if op == "$contains":
        if kind(x) == "str" and kind(v) == "str":
            return v in x
        return kind(x) == "list" and any(ref_equal(e, v) for e in x)
    if kind(x) != kind(v) or kind(x) not in ("num", "str"):
        return False
    return {"$gt": x > v, "$gte": x >= v, "$lt": x < v, "$lte": x <= v}[op]


def ref_match(doc: dict[str, Any], where: dict[str, Any]) -> bool:
    for path, cond in where.items():
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            ops = cond
        else:
            ops = {"$eq": cond}
        for op, v in ops.items():
            if not ref_op(op, ref_get(doc, path), v):
                return False
    return True


def ref_find(docs: dict[str, Any], where: dict[str, Any] | None, prefix: str | None = None,
             order_by: str | None = None, limit: int | None = None, offset: int = 0) -> list[str]:
    keys = [k for k, d in docs.items() if (prefix is None or k.startswith(prefix)) and ref_match(d, where or {})]
    if order_by is None:
        keys.sort()
    else:
        desc = order_by.startswith("-")
        path = order_by.lstrip("-")

        sort_value = {k: ref_get(docs[k], path) for k in keys}
        group = {k: {"num": 0, "str": 1}.get(kind(v), 2) for k, v in sort_value.items()}

        def cmp(k1: str, k2: str) -> int:
            g1, g2 = group[k1], group[k2]
            if g1 != g2:
                return g1 - g2
            if g1 < 2:
                v1, v2 = sort_value[k1], sort_value[k2]
                if v1 != v2:
                    c = -1 if v1 < v2 else 1
                    return -c if desc else c
            return -1 if k1 < k2 else (1 if k1 > k2 else 0)

        keys.sort(key=functools.cmp_to_key(cmp))
    return keys[offset:None if limit is None else offset + limit]


# -- random data --------------------------------------------------------------------------------------------------
def rand_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.6 or depth > 1:
        return rng.choice(SCALARS)
    if r < 0.85:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    # nested objects reuse the top-level names ("a", "tags", "d"...): the same key at another depth
    return {rng.choice(["d", "e", "x", "a", "tags", "ñ", ","]): rand_value(rng, depth + 1)
            for _ in range(rng.randint(0, 2))}


def rand_doc(rng: random.Random) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for path in PATHS:
        if rng.random() < 0.25:
            continue  # missing
        segs = path.split(".")
        target = doc
        for seg in segs[:-1]:
            nxt = target.get(seg)
            if not isinstance(nxt, dict):
                if nxt is not None and rng.random() < 0.5:
                    break  # keep the non-dict: the path below it is then missing
                nxt = target[seg] = {}
            target = nxt
        else:
            if segs[-1] not in target:
                target[segs[-1]] = rand_value(rng)
    return doc


def rand_key(rng: random.Random, i: int) -> str:
    return f"{rng.choice(['g1', 'g2', 'é', 'g1x'])}_{i:03d}{rng.choice(['', 'ß', '😀', 'Z'])}"


def value_pool(docs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The values each path has in ``docs`` (random operands are often taken from them, to match something)."""
    return {path: [v for v in (ref_get(d, path) for d in docs) if v is not ABSENT] for path in PATHS}


def rand_operand(rng: random.Random, pool: dict[str, list[Any]], path: str) -> Any:
    seen = pool[path]
    if seen and rng.random() < 0.6:
        v = rng.choice(seen)
        if isinstance(v, list) and v and rng.random() < 0.6:
            v = rng.choice(v)
        return v
    return rand_value(rng)


def rand_where(rng: random.Random, pool: dict[str, list[Any]]) -> dict[str, Any]:
    where: dict[str, Any] = {}
    for _ in range(rng.randint(0, 3)):
        path = rng.choice(PATHS)
        op = rng.choice(["lit", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains", "$exists"])
        value = rand_operand(rng, pool, path)
        if op == "lit":
            if isinstance(value, dict) and not value:
                value = {"d": 1}
            where[path] = value
            continue
        if op in ("$gt", "$gte", "$lt", "$lte"):
            value = value if kind(value) in ("num", "str") else rng.choice([1, 2.5, "a", "é", 0])
        elif op in ("$in", "$nin"):
            value = [rand_operand(rng, pool, path) for _ in range(rng.randint(0, 3))]
        elif op == "$exists":
            value = rng.random() < 0.5
        elif op == "$contains" and rng.random() < 0.5:
            value = rng.choice(["a", "", "b", "日", "é", "😀"])
        cond = where.get(path)
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            cond[op] = value
        else:
            where[path] = {op: value}
    return where


async def load(store: storage.Store, rng: random.Random, n: int, collection: str = "q") -> dict[str, Any]:
    docs = {rand_key(rng, i): rand_doc(rng) for i in range(n)}
    await store.put_many(collection, docs)
    return {k: d async for k, d in store.items(collection)}  # as stored (canonical numbers)


async def check_random_queries(store: Any, stored: dict[str, Any], rng: random.Random, rounds: int,
                               collection: str = "q") -> None:
    pool = value_pool(list(stored.values()))
    for _ in range(rounds):
        where = rand_where(rng, pool)
        prefix = rng.choice([None, None, "g1", "g1_", "é", "zz"])
        order_by = rng.choice([None, *PATHS, *("-" + p for p in PATHS)])
        limit = rng.choice([None, 0, 1, 3, 10])
        offset = rng.choice([0, 0, 1, 4])
        expected = ref_find(stored, where, prefix, order_by, limit, offset)
        found = await store.find(collection, where, prefix=prefix, order_by=order_by, limit=limit, offset=offset)
        assert [k for k, _ in found] == expected, (where, prefix, order_by, limit, offset)
        assert all(doc == stored[k] for k, doc in found)
        assert await store.count(collection, where, prefix=prefix) == len(ref_find(stored, where, prefix))


# -- tests ----------------------------------------------------------------------------------------------------------
async def test_random_filters_match_the_reference(store: storage.Store):
    rng = random.Random(1401)
    stored = await load(store, rng, 150)
    await check_random_queries(store, stored, rng, 400)


async def test_random_filters_with_indexes_match_the_reference(store: storage.Store):
    rng = random.Random(1402)
    stored = await load(store, rng, 150)
    indexed = ["a", "c.d", "tags", "ü.ñ"]  # (test_index_and_no_index_agree indexes every path)
    for path in indexed:
        assert await store.ensure_index("q", path) is True
    assert await store.indexes("q") == sorted(indexed)
    await check_random_queries(store, stored, rng, 300)
    # writes after the index was built keep it exact (single writes and a batch)
    more = {rand_key(rng, 1000 + i): rand_doc(rng) for i in range(100)}
    await store.put_many("q", more)
    for key in list(stored)[:30]:
        await store.put("q", key, rand_doc(rng))
    for key in list(stored)[30:50]:
        await store.delete("q", key)
    stored = {k: d async for k, d in store.items("q")}
    await check_random_queries(store, stored, rng, 300)


async def test_index_and_no_index_agree(store: storage.Store):
    rng = random.Random(1403)
    stored = await load(store, rng, 200)
    pool = value_pool(list(stored.values()))
    queries = [(rand_where(rng, pool), rng.choice([None, *PATHS, *("-" + p for p in PATHS)]),
                rng.choice([None, 2, 7]), rng.choice([0, 3])) for _ in range(150)]

    async def answers() -> list[list[str]]:
        return [[k for k, _ in await store.find("q", w, order_by=o, limit=lim, offset=off)]
                for w, o, lim, off in queries]

    without = await answers()
    for path in PATHS:
        await store.ensure_index("q", path)
    assert await answers() == without


async def test_documented_rules(store: storage.Store):
    """The rules of plan.py spelled out on small cases, the same on both backends."""
    await store.put_many("t", {
        "k1": {"n": 1, "roles": ["mod", "x"], "s": "Hello", "z": None, "o": {"a": 1, "b": [1, 2]}},
        "k2": {"n": 1.0, "roles": "mod", "s": "hello"},
        "k3": {"n": True, "roles": [["mod"], 1], "s": 5},
        "k4": {"n": "1", "roles": [], "z": [None]},
        "k5": {"n": 2.5, "o": {"b": [1, 2], "a": 1.0}},
        "k6": {},
    })

    async def keys(where: Any, **kw: Any) -> list[str]:
        return [k for k, _ in await store.find("t", where, **kw)]

    assert await keys({"n": 1}) == ["k1", "k2"]  # 1 == 1.0, True is not 1, "1" is not 1
    assert await keys({"n": True}) == ["k3"]
    assert await keys({"roles": "mod"}) == ["k1", "k2"]  # list contains it, or equals it
    assert await keys({"roles": ["mod"]}) == ["k3"]  # a list operand: the whole field, or an element
    assert await keys({"roles": 1}) == ["k3"]
    assert await keys({"z": None}) == ["k1", "k4"]  # present null, or a list holding null; not missing
    assert await keys({"z": {"$exists": False}}) == ["k2", "k3", "k5", "k6"]
    assert await keys({"z": {"$ne": None}}) == ["k2", "k3", "k5", "k6"]  # $ne matches missing
    assert await keys({"n": {"$nin": [1, "1"]}}) == ["k3", "k5", "k6"]
    assert await keys({"n": {"$gte": 1}}) == ["k1", "k2", "k5"]  # numbers only: not True, not "1"
    assert await keys({"s": {"$gt": "Z"}}) == ["k2"]  # code point order: "H" < "Z" < "h"
    assert await keys({"s": {"$contains": "ell"}}) == ["k1", "k2"]
    assert await keys({"roles": {"$contains": "mo"}}) == ["k2"]  # a substring of the string; list elements whole
    assert await keys({"o": {"b": [1, 2], "a": 1}}) == ["k1", "k5"]  # key order does not matter, 1 == 1.0
    assert await keys({"o.b": 2}) == ["k1", "k5"]
    assert await keys({"o.b.0": 1}) == []  # paths never index lists
    assert await keys({"n": {"$in": []}}) == []
    assert await keys({"n": {"$gt": 0, "$lt": 2}}) == ["k1", "k2"]
    # order: numbers, strings, then the rest, in both directions; ties by key
    assert await keys(None, order_by="n") == ["k1", "k2", "k5", "k4", "k3", "k6"]
    assert await keys(None, order_by="-n") == ["k5", "k1", "k2", "k4", "k3", "k6"]
    assert await keys(None, order_by="-n", limit=2, offset=1) == ["k1", "k2"]
    assert await store.count("t", {"n": {"$exists": True}}) == 5
    assert await store.count("t") == 6


@pytest.mark.parametrize("where, kw, field", [
    ("x", {}, "where"),
    ({"a": {"$regex": "x"}}, {}, "a"),
    ({"a": {"$gt": [1]}}, {}, "a"),
    ({"a": {"$gt": {"x": 1}}}, {}, "a"),
    ({"a": {"$lt": True}}, {}, "a"),
    ({"a": {"$gte": None}}, {}, "a"),
    ({"a": {"$in": 3}}, {}, "a"),
    ({"a": {"$nin": "ab"}}, {}, "a"),
    ({"a": {"$exists": 1}}, {}, "a"),
    ({"a": {"$eq": 1, "b": 2}}, {}, "a"),
    ({"a..b": 1}, {}, "a..b"),
    ({"": 1}, {}, ""),
    ({"a.": 1}, {}, "a."),
    ({"$or": [1]}, {}, "$or"),
    ({1: 1}, {}, "where"),
    ({"a": float("nan")}, {}, "a"),
    ({"a": 2**70}, {}, "a"),
    ({"a": {1, 2}}, {}, "a"),
    (None, {"order_by": 3}, "order_by"),
    (None, {"order_by": "-"}, "order_by"),
    (None, {"order_by": "a..b"}, "order_by"),
    (None, {"limit": -1}, "limit"),
    (None, {"limit": 1.5}, "limit"),
    (None, {"limit": True}, "limit"),
    (None, {"offset": -2}, "offset"),
    (None, {"offset": None}, "offset"),
    (None, {"prefix": 5}, "prefix"),
    (None, {"prefix": "a\x00"}, "prefix"),
    ({"a": "\ud800"}, {}, "a"),
    ({"a": {"$in": [{"k\x00": 1}]}}, {}, "a"),
    (None, {"limit": 2**63}, "limit"),
])
async def test_bad_queries_raise_and_change_nothing(store: storage.Store, where: Any, kw: dict[str, Any],
                                                    field: str):
    await store.put_many("v", {"k1": {"a": 1}, "k2": {"a": 2}})
    with pytest.raises(ValidationError) as info:
        await store.find("v", where, **kw)
    assert info.value.field == field
    count_kw = {k: v for k, v in kw.items() if k == "prefix"}
    if "order_by" not in kw and "limit" not in kw and "offset" not in kw:
        with pytest.raises(ValidationError):
            await store.count("v", where, **count_kw)
        with pytest.raises(ValidationError):
            await store.delete_many("v", where, **count_kw)
    assert {k: d async for k, d in store.items("v")} == {"k1": {"a": 1}, "k2": {"a": 2}}


async def test_bad_collection_and_index_paths(store: storage.Store):
    with pytest.raises(ValidationError):
        await store.find("../x", None)
    with pytest.raises(ValidationError):
        await store.ensure_index("v", "a..b")
    with pytest.raises(ValidationError):
        await store.ensure_index("v", 5)  # type: ignore[arg-type]
    assert await store.indexes("v") == []


async def test_delete_many_leaves_exactly_the_rest(store: storage.Store):
    rng = random.Random(1404)
    stored = await load(store, rng, 200)
    await store.ensure_index("q", "a")
    for _ in range(6):
        where = rand_where(rng, value_pool(list(stored.values())))
        prefix = rng.choice([None, "g1", "é"])
        doomed = set(ref_find(stored, where, prefix))
        assert await store.delete_many("q", where, prefix=prefix) == len(doomed)
        left = {k: d async for k, d in store.items("q")}
        assert left == {k: d for k, d in stored.items() if k not in doomed}
        stored = left
    assert await store.delete_many("q") == len(stored)
    assert await store.count("q") == 0


async def test_a_transaction_sees_its_own_writes(store: storage.Store):
    await store.ensure_index("m", "score")
    await store.put_many("m", {f"u{i:02d}": {"score": i, "team": "red" if i % 2 else "blue"} for i in range(20)})
    async with store.transaction() as tx:
        await tx.put("m", "new", {"score": 100, "team": "red"})
        await tx.delete("m", "u19")
        await tx.put("m", "u00", {"score": 50, "team": "green"})
        top = await tx.find("m", {"team": {"$ne": "blue"}}, order_by="-score", limit=3)
        assert [k for k, _ in top] == ["new", "u00", "u17"]
        assert await tx.count("m", {"team": "red"}) == 10
        assert await tx.delete_many("m", {"score": {"$lt": 5}}) == 4  # u01..u04 (u00 now scores 50)
        assert await tx.count("m") == 16
        assert [k for k, _ in await tx.find("m", {"score": {"$lt": 7}})] == ["u05", "u06"]
    assert await store.count("m") == 16
    assert [k for k, _ in await store.find("m", order_by="-score", limit=2)] == ["new", "u00"]


async def test_a_failed_transaction_deletes_nothing(store: storage.Store):
    await store.put_many("m", {f"u{i}": {"score": i} for i in range(10)})
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            assert await tx.delete_many("m", {"score": {"$gte": 5}}) == 5
            raise RuntimeError("boom")
    assert await store.count("m") == 10


async def test_find_returns_fresh_documents(store: storage.Store):
    await store.put("m", "a", {"x": {"y": 1}})
    (_key, doc), = await store.find("m", {"x.y": 1})
    doc["x"]["y"] = 2
    assert await store.get("m", "a") == {"x": {"y": 1}}


async def test_closed_store_refuses_queries(store_config: storage.StoreConfig):
    s = await storage.open_store(config=store_config)
    await s.close()
    with pytest.raises(storage.DatabaseError):
        await s.find("m", {"a": 1})
    with pytest.raises(storage.DatabaseError):
        await s.count("m", {"a": 1})


async def test_migrations_can_query(store: storage.Store):
    """A migration's context has find / count / delete_many too (the same code on both backends)."""
    from storage.migrations import Migration, Migrator

    class DropInactive(Migration):
        def __init__(self) -> None:
            super().__init__("1.0.1", "drop inactive members")
            self.found: list[str] = []

        async def up(self, ctx: Any) -> None:
            self.found = [k for k, _ in await ctx.find("m", {"active": False}, order_by="-n")]
            assert await ctx.count("m", {"active": False}) == len(self.found)
            assert await ctx.delete_many("m", {"active": False}) == len(self.found)

        async def down(self, ctx: Any) -> None:
            return None

    await store.put_many("m", {f"k{i}": {"active": i % 3 != 0, "n": i} for i in range(9)})
    step = DropInactive()
    await Migrator(store, [step]).upgrade()
    assert step.found == ["k6", "k3", "k0"]
    assert sorted([k async for k, _ in store.items("m")]) == ["k1", "k2", "k4", "k5", "k7", "k8"]


async def test_delete_many_invalidates_the_read_cache(store_config: storage.StoreConfig):
    import dataclasses

    s = await storage.open_store(config=dataclasses.replace(store_config, cache_ttl=60))
    try:
        await s.put_many("m", {"a": {"x": 1}, "b": {"x": 2}, "c": {"x": 1}})
        assert await s.get("m", "a") == {"x": 1}  # cached on PostgreSQL
        assert await s.delete_many("m", {"x": 1}) == 2
        assert await s.get("m", "a") is None
        await s.get("m", "b")
        async with s.transaction() as tx:
            assert await tx.delete_many("m", prefix="b") == 1
        assert await s.get("m", "b") is None
    finally:
        await s.close()


async def test_json_queries_read_documents_as_any_writer_spelled_them(tmp_path):
    """The JSON backend keeps a snapshot's document bytes as the file has them (one per line, the seed's shape):
    a hand edit or another tool may write spaces, ``\\uXXXX`` escapes, ``1e2`` for 100 or duplicate keys. Its scan
    reads documents' bytes before decoding them (storage/backends/json/prefilter.py), and must still find exactly
    the reference's answer."""
    from storage.backends.json.snapshot import read_snapshot
    from tests.test_query_prefilter import Writer

    rng = random.Random(1405)
    folder = tmp_path / "data"
    folder.mkdir()
    lines = []
    for i in range(300):
        doc = rand_doc(rng)
        text = Writer(rng, loose=rng.random() < 0.7, spaces=("", "", " ", "  ", "\t")).write(doc)
        lines.append(f"  {json.dumps(rand_key(rng, i), ensure_ascii=False)}: {text}")
    (folder / "q.json").write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    kept, _size, _crc = read_snapshot(folder / "q.json")
    assert any(b": " in raw for raw in kept.values()) and any(b"\\u" in raw for raw in kept.values())
    store = await storage.open_store(backend="json", path=str(folder))
    try:
        stored = {k: d async for k, d in store.items("q")}
        assert len(stored) == len(kept)
        await check_random_queries(store, stored, rng, 400)
    finally:
        await store.close()
