"""Numbers that jsonb would give back in another form (issue 11, item 14): one canonical form on both backends.

PostgreSQL's jsonb keeps a number's decimal value, not its spelling: a float of 1e16 or more (which orjson writes
with an exponent) came back as an int, and ``-0.0`` as ``0.0``, so a document copied from JSON files to PostgreSQL
never verified. Now such numbers are stored in that form on every backend (storage/codec.py), and digests compare
in it. Property style: random documents full of such numbers, written on both backends, read back identical
(values *and* types), and copies both ways verify.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage import StoreConfig
from storage.backup.copy import copy
from storage.backup.format import canonical
from storage.codec import canonical_numbers, encode_doc

GUILD = "42"
SEEDS = range(12)


def awkward_float(rng: random.Random) -> float:
    choice = rng.randrange(8)
    if choice == 0:
        return -0.0
    if choice == 1:
        return float(rng.randrange(10**16, 2**63)) * rng.choice((1, -1))  # integral, within 64 bits
    if choice == 2:
        return float(rng.randrange(2**63, 2**64))  # integral, unsigned 64-bit range
    if choice == 3:
        return rng.choice((1e16, -1e16, 1.8446744073709552e19, -9.223372036854776e18, 1e22, -1.5e300, 1e308))
    if choice == 4:
        return rng.uniform(-1, 1) * 10 ** rng.randrange(-30, 30)
    if choice == 5:
        return float(rng.randrange(-10**15, 10**15))  # integral but small: stays a float
    if choice == 6:
        return rng.choice((0.0, 1e-7, -0.05, 5e-324, 2.0))
    return rng.random()


def value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 4 else 6)
    if kind < 3:
        return awkward_float(rng)
    if kind == 3:
        return rng.randrange(-2**63, 2**64)
    if kind == 4:
        return rng.choice(("", "e+", "C++", "-0.0", "1e+16", "text"))
    if kind == 5:
        return rng.choice((True, False, None))
    if kind < 8:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"f{i}": value(rng, depth + 1) for i in range(rng.randrange(4))}


def document(rng: random.Random) -> dict[str, Any]:
    return {f"k{i}": value(rng) for i in range(rng.randrange(1, 8))}


def typed(v: Any) -> Any:
    """A value with every number's type made visible (``1.0 == 1`` and ``-0.0 == 0.0`` in Python)."""
    if isinstance(v, dict):
        return {k: typed(x) for k, x in v.items()}
    if isinstance(v, list):
        return [typed(x) for x in v]
    if isinstance(v, float):
        return ("float", v, math.copysign(1.0, v))
    return (type(v).__name__, v)


@pytest.fixture
async def both(pg_config: StoreConfig, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    json_store = await storage.open_store(config=StoreConfig(backend="json", path=str(tmp_path / "data"),
                                                             source="tests"))
    pg_store = await storage.open_store(config=pg_config)
    try:
        yield json_store, pg_store
    finally:
        await json_store.close()
        await pg_store.close()


def test_the_canonical_form():
    doc = {"a": -0.0, "b": [1e16, -1e17, 2.5, 1e15, 1.8446744073709552e19, -9.223372036854776e18], "c": {"d": 0.0}}
    assert typed(canonical_numbers(doc)) == typed({
        "a": 0.0, "b": [10**16, -10**17, 2.5, 1e15, 1.8446744073709552e19, -2**63], "c": {"d": 0.0}})
    plain = {"a": 1.5, "b": [1, "x"], "c": {"d": 0.0}}
    assert canonical_numbers(plain) is plain  # nothing to change: no copy
    assert orjson.loads(encode_doc(doc)) == canonical_numbers(doc)
    assert canonical({"x": -0.0, "y": 1e16}) == canonical({"y": 10**16, "x": 0.0})


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_documents_read_back_identical_on_both_backends(both: tuple[Any, Any], seed: int):
    rng = random.Random(seed)
    docs = {f"d{i}": document(rng) for i in range(30)}
    for store in both:
        await store.put_many("numbers", docs)
        await store.put("numbers", "single", docs["d0"])
        await store.update("numbers", "updated", lambda d: docs["d1"])
        await store.save_member_data(1, 2, {"stats": docs["d2"]})
        async with store.transaction() as tx:
            await tx.put("numbers", "in_tx", docs["d3"])
    json_store, pg_store = both
    for key in [*docs, "single", "updated", "in_tx"]:
        got_json, got_pg = await json_store.get("numbers", key), await pg_store.get("numbers", key)
        assert typed(got_json) == typed(got_pg), key
        expected = docs.get(key) or {"single": docs["d0"], "updated": docs["d1"], "in_tx": docs["d3"]}[key]
        assert typed(got_json) == typed(canonical_numbers(expected))
    assert typed(await json_store.get_member_data(1, 2)) == typed(await pg_store.get_member_data(1, 2))


@pytest.mark.parametrize("seed", SEEDS[:4])
async def test_messages_with_such_numbers_read_back_identical_on_both_backends(both: tuple[Any, Any], seed: int):
    rng = random.Random(seed)
    records = [{"message_id": 1000 + i, "channel_id": 1, "author_id": 2, "guild_id": GUILD,
                "timestamp": f"2024-03-01T12:00:{i:02d}Z",
                "analysis": {"sentiment": "neutral", "score": awkward_float(rng), "more": value(rng)},
                "extra": value(rng)} for i in range(20)]
    for store in both:
        await store.record_messages(records)
        await store.update_message(1000, {"analysis": {"score": -0.0, "big": 3e17}})
    json_store, pg_store = both
    got_json = [typed(r) async for r in json_store.scan_messages(GUILD)]
    got_pg = [typed(r) async for r in pg_store.scan_messages(GUILD)]
    assert got_json == got_pg


@pytest.mark.parametrize("seed", SEEDS[:4])
async def test_copies_between_backends_verify(both: tuple[Any, Any], seed: int, pg_config: StoreConfig,
                                             tmp_path: Path):
    rng = random.Random(seed)
    json_store, pg_store = both
    await json_store.put_many("numbers", {f"d{i}": document(rng) for i in range(50)})
    await json_store.record_messages([{"message_id": 7, "channel_id": 1, "author_id": 2, "guild_id": GUILD,
                                       "timestamp": "2024-03-01T12:00:00Z", "analysis": {"x": -0.0, "y": 1e19}}])
    report = await copy(json_store, pg_store)
    assert report.counts["numbers"] == 50 and report.messages == 1
    async with storage.open_store(config=StoreConfig(backend="json", path=str(tmp_path / "back"),
                                                     source="tests")) as back:
        await copy(pg_store, back)
        assert [typed(p) async for p in back.items("numbers")] == [typed(p) async for p in json_store.items("numbers")]


async def test_a_json_store_written_before_the_canonical_form_copies_and_verifies(pg_config: StoreConfig,
                                                                                 tmp_path: Path):
    # members.json in the seed's format, with numbers orjson (or the seed's json.dump) spelled the old way.
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "members.json").write_text('{"2_1": {"score": 1e+16, "zero": -0.0, "big": 1.5e+300, "n": 12345678901'
                                         '234567890.0, "f": 0.5}}')
    async with storage.open_store(config=StoreConfig(backend="json", path=str(folder), source="tests")) as old, \
            storage.open_store(config=pg_config) as pg_store:
        await copy(old, pg_store)
        got = await pg_store.get("members", "2_1")
        assert typed(got) == typed({"score": 10**16, "zero": 0.0, "big": 1.5e300, "n": 12345678901234567168,
                                    "f": 0.5})
