"""A batch of puts applied to memory in C-level passes, and the snapshot's sizes dict behind it (issue 15).

* ``offsets.document_sizes`` (the snapshot's ``{key: document length}``, built once a batch writes to a lazy
  collection) against the table's own probe, key by key, for ASCII and non-ASCII keys;
* ``Tables.apply`` of batches (``_apply_puts``: at least ``BULK_APPLY`` puts without expiry into one collection)
  against the previous per-operation loop, on plain and lazy collections, with and without the sizes dict, with
  repeated keys, new collections, expiring documents and a change feed listening (the last two take the loop);
* through the store: a batch builds the sizes dict once (a smaller write does not), writes sized from it read
  nothing from the snapshot and probe nothing, every point read, the count and the size accounting equal an eager
  reference, and reading the collection whole drops the dict.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backends.json.lazy import SIZES_AFTER, Lazy, SnapshotFile
from storage.backends.json.offsets import document_sizes, offsets_name, read_offsets
from storage.backends.json.snapshot import OVERHEAD
from storage.backends.json.tables import BULK_APPLY, Tables
from tests.test_json_lazy import cfg, eager_copy, is_lazy, point_answers
from tests.test_member_fast import previous_apply

COLL = "things"
# These stores are small (~50 KB): below offsets.MIN_SNAPSHOT_BYTES they would get no sidecar.
pytestmark = pytest.mark.usefixtures("sidecar_always")
#: ASCII keys and keys whose UTF-8 is longer than their text (a character is not a byte in the table's blob)
KEYS = [f"{g}_{u}" for g in range(3) for u in range(120)] + [f"é{i}" for i in range(40)] + [f"ключ{i}" for i in
                                                                                           range(40)]


def doc(rng: random.Random, key: str) -> dict[str, Any]:
    return {"k": key, "n": rng.randrange(10**6), "pad": "x" * rng.randrange(0, 60), "t": rng.choice(["a", "ü"])}


async def seeded(path: Path, seed: int = 0) -> dict[str, dict[str, Any]]:
    """A compacted store (snapshot + sidecar) holding a document under every key of KEYS."""
    rng = random.Random(seed)
    docs = {key: doc(rng, key) for key in KEYS}
    async with storage.open_store(config=cfg(path)) as store:
        await store.put_many(COLL, docs)
    assert (path / offsets_name(COLL)).is_file()
    return docs


def open_lazy(path: Path) -> Lazy:
    file, why = SnapshotFile.open(path / f"{COLL}.json",
                                  lambda size: read_offsets(path / offsets_name(COLL), size))
    assert file is not None, why
    return Lazy(file)


async def test_document_sizes_equal_the_tables_probe_for_every_key(tmp_path: Path) -> None:
    docs = await seeded(tmp_path / "s")
    lazy = open_lazy(tmp_path / "s")
    try:
        sizes = document_sizes(lazy.file.table)
        assert sizes is not None and set(sizes) == set(docs)
        assert all(sizes[key] == lazy.file.size_of(key) for key in KEYS)
        assert all(sizes[key] == len(orjson.dumps(value)) for key, value in docs.items())
        assert document_sizes(lazy.file.table, lambda: False) is None  # asked to stop after the first step
    finally:
        lazy.file.close()


class _NoIndexes:
    live = False


class _Feed:
    def __init__(self, active: bool) -> None:
        self.active = active
        self.seen: list[tuple[str, str, str, bytes | None]] = []

    def publish(self, collection: str, key: str, kind: str, raw: bytes | None) -> None:
        self.seen.append((collection, key, kind, raw))


def _tables(data: dict[str, Any], expires: dict[str, dict[str, int]], feed: _Feed,
            sizes: dict[str, int] | None = None) -> Tables:
    tables = Tables.__new__(Tables)  # only what apply() touches
    tables.data, tables.expires, tables.dirty, tables.feed = data, expires, set(), feed  # type: ignore[assignment]
    tables.sizes = sizes if sizes is not None else {
        name: 2 + sum(len(k) + len(v) + OVERHEAD for k, v in coll.items()) for name, coll in data.items()}
    tables.indexes = _NoIndexes()  # type: ignore[assignment]
    return tables


def batch(rng: random.Random, names: list[str]) -> list[Any]:
    """At least BULK_APPLY puts into one collection, keys old and new, some repeated; now and then a record that
    is not a batch (a delete, an expiry, a second collection) to check that those still go the long way."""
    name = rng.choice(names)
    pool = KEYS + [f"new{i}" for i in range(60)]
    ops: list[Any] = []
    for _ in range(rng.randrange(BULK_APPLY, 3 * BULK_APPLY)):
        key = rng.choice(pool)
        ops.append(("p", name, key, orjson.dumps({"v": rng.random(), "pad": "y" * rng.randrange(40)})))
    spoil = rng.random()
    if spoil < 0.1:
        ops[rng.randrange(len(ops))] = ("d", name, rng.choice(pool))
    elif spoil < 0.2:
        ops[rng.randrange(len(ops))] = ("p", rng.choice(names), "x", b"{}")
    elif spoil < 0.3:
        ops[rng.randrange(len(ops))] = ("p", name, rng.choice(pool), b"{}", rng.randrange(2**40))
    return ops


@pytest.mark.parametrize("seed", range(6))
async def test_batches_apply_like_the_per_operation_loop(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    docs = await seeded(tmp_path / "s", seed)
    encoded = {key: orjson.dumps(value) for key, value in docs.items()}
    lazy = open_lazy(tmp_path / "s")
    if seed % 2:
        lazy.build_sizes()
        assert lazy.has_sizes
    feed = _Feed(active=seed % 3 == 2)
    reference = _tables({COLL: dict(encoded), "plain": {"k": b'{"old":1}'}}, {"plain": {"k": 1, "other": 2}},
                        _Feed(active=True))
    mine = _tables({COLL: lazy, "plain": {"k": b'{"old":1}'}}, {"plain": {"k": 1, "other": 2}}, feed,
                   dict(reference.sizes))  # (the lazy collection's sizes without reading it whole)
    names = [COLL, "plain", "fresh"]
    try:
        for _ in range(40):
            ops = batch(rng, names)
            mine.apply(ops)
            previous_apply(reference, ops)
            assert mine.sizes == reference.sizes and mine.expires == reference.expires
            assert mine.dirty == reference.dirty
            assert len(lazy) == len(reference.data[COLL])  # the count, with no walk
            assert {key: lazy.get(key) for key in KEYS} == {key: reference.data[COLL].get(key) for key in KEYS}
        if feed.active:
            assert feed.seen == reference.feed.seen  # type: ignore[union-attr]
        assert lazy.has_sizes == bool(seed % 2)  # apply never builds it (the store does, before a batch)
        assert not lazy.is_whole
        assert lazy.whole() == reference.data[COLL]
        assert not lazy.has_sizes  # read whole: the dict answers everything, the sizes are dropped
        for name in ("plain", "fresh"):
            assert mine.data.get(name) == reference.data.get(name)
    finally:
        lazy.file.close()


def test_only_a_batch_takes_the_bulk_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop handles everything else: fewer operations, a delete, an expiry, two collections, a listening feed,
    or a put over an expiring document; a batch does not enter it."""
    entered: list[int] = []
    real = Tables._plan_puts

    def spy(self: Tables, name: str, puts: dict[str, bytes]) -> Any:
        entered.append(len(puts))
        return real(self, name, puts)

    monkeypatch.setattr(Tables, "_plan_puts", spy)
    puts = [("p", "a", f"k{i}", b"{}") for i in range(BULK_APPLY)]
    cases = {
        "batch": (puts, {}, False, True),
        "short": (puts[1:], {}, False, False),
        "delete": ([*puts, ("d", "a", "k0")], {}, False, False),
        "expiry": ([*puts[:-1], ("p", "a", "z", b"{}", 5)], {}, False, False),
        "two collections": ([*puts[:-1], ("p", "b", "z", b"{}")], {}, False, False),
        "feed": (puts, {}, True, False),
        "over an expiry": (puts, {"a": {"k3": 9}}, False, False),
        "expiries elsewhere in the collection": (puts, {"a": {"zz": 9}}, False, True),
    }
    for what, (ops, expires, active, bulk) in cases.items():
        entered.clear()
        tables = _tables({}, {name: dict(e) for name, e in expires.items()}, _Feed(active))
        tables.apply(ops)
        assert bool(entered) == bulk, what
        assert tables.data["a"]["k1"] == b"{}"


async def test_a_batch_builds_the_sizes_once_and_writes_are_sized_from_them(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    docs = await seeded(path)
    eager_copy(path, tmp_path / "ref")
    lazy_store = await storage.open_store(config=cfg(path))
    ref = await storage.open_store(config=cfg(tmp_path / "ref"))
    rng = random.Random(5)
    try:
        lazy = lazy_store._tables.data[COLL]
        assert isinstance(lazy, Lazy) and not is_lazy(ref)
        small = {key: {"small": i} for i, key in enumerate(KEYS[: SIZES_AFTER - 1])}
        for store in (lazy_store, ref):
            await store.put_many(COLL, small)
        assert not lazy.has_sizes  # fewer than SIZES_AFTER: the probes size them
        probes: list[str] = []
        real_size_of = SnapshotFile.size_of

        def counting(self: SnapshotFile, key: str) -> int | None:
            probes.append(key)
            return real_size_of(self, key)

        monkeypatch.setattr(SnapshotFile, "size_of", counting)
        big = {key: {"big": rng.random()} for key in KEYS[SIZES_AFTER - 60:]} | {f"new{i}": {"i": i} for i in
                                                                                   range(30)}
        assert len(big) >= SIZES_AFTER
        for store in (lazy_store, ref):
            await store.put_many(COLL, big)
        assert lazy.has_sizes and is_lazy(lazy_store) and probes == []  # built first, then used: no probe
        again = {key: {"again": rng.random()} for key in rng.sample(KEYS, SIZES_AFTER)}
        for store in (lazy_store, ref):
            await store.put_many(COLL, again)
            await store.put(COLL, KEYS[-1], {"one": 1})  # a single write of a key not read yet: sized too
            await store.delete(COLL, KEYS[-2])
        assert probes == [] and is_lazy(lazy_store)
        keys = [*KEYS, "new0", "new29", "absent"]
        assert await point_answers(lazy_store, keys) == await point_answers(ref, keys)  # count and size included
        assert await lazy_store.count(COLL) == len(docs) + 30 - 1
        assert [pair async for pair in lazy_store.items(COLL)] == [pair async for pair in ref.items(COLL)]
        assert not is_lazy(lazy_store) and not lazy.has_sizes  # read whole: the dict is dropped
    finally:
        await lazy_store.close()
        await ref.close()
    async with storage.open_store(config=cfg(path)) as store:  # compacted: lazy again, no sizes until a batch
        lazy = store._tables.data[COLL]
        assert isinstance(lazy, Lazy) and not lazy.has_sizes
        assert lazy.wants_sizes


@pytest.mark.parametrize("seed", range(6))
async def test_a_lazy_collection_answers_like_a_dict_before_and_after_its_sizes_are_laid(
        tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Lazy`` against a plain dict of the same documents under random reads (``get``, ``get_many``), single puts
    and deletes, and batches (``replaced`` then ``put_planned``, as Tables.plan / apply_plan do), with the sizes
    laid (``build_sizes``: a placeholder per unread document in the known documents) at a random step, after reads,
    writes and deletes of their own: every answer (document, presence, size, count, what a batch replaces) equals
    the dict's; ``changes()`` (what a compaction merges) holds no placeholder and every key that changed; read
    whole, it is the dict. Odd seeds lay and filter the placeholders a few entries a step (PLACEHOLDER_STEP)."""
    from storage.backends.json import lazy as lazy_module
    from storage.backends.json.lazy import replaced_in

    if seed % 2:
        monkeypatch.setattr(lazy_module, "PLACEHOLDER_STEP", 3)
    rng = random.Random(900 + seed)
    docs = await seeded(tmp_path / "s", seed)
    snapshot = {key: orjson.dumps(value) for key, value in docs.items()}
    reference: dict[str, bytes] = dict(snapshot)
    lazy = open_lazy(tmp_path / "s")
    pool = [*KEYS, *(f"new{i}" for i in range(80))]
    lay_at = rng.randrange(0, 120)
    try:
        for step in range(160):
            if step == lay_at:
                lazy.build_sizes()
                assert lazy.has_sizes
            roll = rng.random()
            if roll < 0.25:
                key = rng.choice(pool)
                assert lazy.get(key) == reference.get(key)
            elif roll < 0.35:
                keys = rng.sample(pool, rng.randrange(1, 40))
                assert lazy.get_many(keys) == {key: reference[key] for key in keys if key in reference}
            elif roll < 0.55:
                key, raw = rng.choice(pool), orjson.dumps({"v": rng.random(), "pad": "z" * rng.randrange(30)})
                old = reference.get(key)
                assert lazy.swap(key, raw) == (None if old is None else len(old))
                reference[key] = raw
            elif roll < 0.7:
                key = rng.choice(pool)
                old = reference.pop(key, None)
                assert lazy.remove(key) == (None if old is None else len(old))
            else:
                puts = {key: orjson.dumps({"b": rng.random(), "pad": "y" * rng.randrange(50)})
                        for key in rng.sample(pool, rng.randrange(1, 120))}
                total, present = lazy.replaced(puts.keys())
                assert (total, present) == replaced_in(reference, puts.keys())  # type: ignore[arg-type]
                lazy.put_planned(puts, len(puts) - present)
                reference.update(puts)
            if step % 20 == 19 or step == lay_at:
                assert len(lazy) == len(reference)
                assert all((key in lazy) == (key in reference) for key in pool)
                assert all(lazy.size_of(key) == (len(reference[key]) if key in reference else None) for key in pool)
        changes = lazy.changes()
        assert changes is not None and not any(type(raw) is range for raw in changes.values())
        assert all(reference.get(key) == raw for key, raw in changes.items())  # None: deleted, as in the dict
        assert all(key in changes for key in set(reference) | set(snapshot)
                   if reference.get(key) != snapshot.get(key))
        assert {key: lazy.get(key) for key in pool} == {key: reference.get(key) for key in pool}
        assert lazy.whole() == reference and not lazy.has_sizes
    finally:
        lazy.file.close()


@pytest.mark.parametrize("step", [1, 3, 7, 8192])
def test_leaving_the_placeholders_out_in_steps_equals_a_comprehension(monkeypatch: pytest.MonkeyPatch,
                                                                      step: int) -> None:
    """lazy._without_placeholders (C-level steps of PLACEHOLDER_STEP entries) against a plain comprehension: the
    same entries in the same order, across step boundaries, with documents, deletions (None) and placeholders."""
    from storage.backends.json import lazy as lazy_module

    monkeypatch.setattr(lazy_module, "PLACEHOLDER_STEP", step)
    rnd = random.Random(step)
    for _ in range(200):
        known: dict[str, Any] = {}
        for i in range(rnd.randrange(0, 40)):
            roll = rnd.random()
            known[f"k{i}"] = (range(rnd.randrange(2, 9)) if roll < 0.5 else None if roll < 0.6
                              else b"{" + b"x" * rnd.randrange(0, 5) + b"}")
        out = lazy_module._without_placeholders(known)
        expected = {key: raw for key, raw in known.items() if type(raw) is not range}
        assert out == expected and list(out) == list(expected)


@pytest.mark.parametrize("seed", range(4))
def test_replaced_in_equals_a_loop(seed: int) -> None:
    """lazy.replaced_in (the olds selecting themselves: a document is never empty) against a plain loop over the
    keys, with absent keys, deleted ones (None) and repeated ones."""
    from storage.backends.json.lazy import replaced_in

    rnd = random.Random(700 + seed)
    for _ in range(300):
        docs: dict[str, bytes | None] = {f"k{i}": (None if rnd.random() < 0.2 else b"{" + b"x" * rnd.randrange(0, 9)
                                                   + b"}") for i in range(rnd.randrange(0, 20))}
        keys = [f"k{rnd.randrange(0, 30)}" for _ in range(rnd.randrange(0, 25))]
        total = sum(len(key) + len(docs[key]) for key in keys if docs.get(key) is not None)  # type: ignore[arg-type]
        present = sum(1 for key in keys if docs.get(key) is not None)
        assert replaced_in(docs, keys) == (total, present)
