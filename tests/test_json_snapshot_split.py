"""Loading a snapshot splits it into lines a slice at a time (so a big open does not hold the GIL in one C call):
the slices give exactly what one ``split`` gives, and a store whose snapshot spans many slices loads the same."""

from __future__ import annotations

import random

import pytest

import storage
from storage.backends.json import snapshot


@pytest.mark.parametrize("seed", range(5))
def test_split_lines_equals_one_split(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(600):
        n = rng.randrange(0, 60)
        raw = bytes(rng.choice(b"ab\n") for _ in range(n))
        monkeypatch.setattr(snapshot, "SPLIT_CHUNK", rng.randrange(1, 8))
        start = rng.randrange(0, n + 1)
        stop = rng.randrange(start, n + 1)
        assert list(snapshot._split_lines(raw, start, stop)) == raw[start:stop].split(b"\n")


async def test_a_snapshot_of_many_slices_loads_every_document(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot, "SPLIT_CHUNK", 97)  # a few documents per slice
    cfg = storage.StoreConfig(backend="json", path=str(tmp_path / "s"), source="tests")
    docs = {f"k{i}": {"i": i, "text": "x" * (i % 50)} for i in range(500)}
    async with storage.open_store(config=cfg) as store:
        await store.put_many("c", docs)
    async with storage.open_store(config=cfg) as store:  # loads the compacted snapshot
        assert {k: d async for k, d in store.items("c")} == docs
