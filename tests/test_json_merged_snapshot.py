"""Compaction of a lazy collection streams its next snapshot (json/merged.py): the unchanged lines copied from the
old file, the changed ones rendered, memory bounded by what changed.

The eager way (read the collection whole, render every line: ``snapshot.render_with_spans``) is the reference: for
random changes (replaced, new, deleted, deleted then written again, read only) the merged file must be the same
bytes and its sidecar the same table; every document must read back the same after a reopen, lazily and eagerly;
an old file changed in place behind the store must stop the compaction with nothing replaced.
"""

from __future__ import annotations

import os
import random
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backends.json import merged, offsets
from storage.backends.json.lazy import Lazy
from storage.backends.json.snapshot import render_with_spans
from storage.errors import ExternalChangeError
from storage.stores import JsonStore

COLL = "things"
SIDECAR = f"storage.{COLL}.offsets"


def cfg(path: Path) -> storage.StoreConfig:
    return storage.StoreConfig(backend="json", path=str(path), source="tests")


def doc(rng: random.Random, i: int, pad: int = 0) -> dict[str, Any]:
    return {"i": i, "n": rng.randrange(10**6), "pad": "p" * pad,
            "text": rng.choice(["", "héllo", "a\nb", 'q"uote', "x" * rng.randrange(90)]),
            "list": [rng.random() for _ in range(rng.randrange(4))]}


async def seeded(path: Path, n: int, seed: int, pad: int = 0) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    docs = {f"k{i:06d}": doc(rng, i, pad) for i in range(n)}
    async with storage.open_store(config=cfg(path)) as store:
        for start in range(0, n, 5000):
            await store.put_many(COLL, dict(list(docs.items())[start:start + 5000]))
    assert (path / SIDECAR).is_file()
    return docs


def lazy_of(store: JsonStore) -> Lazy:
    coll = store._tables.data[COLL]
    assert isinstance(coll, Lazy) and not coll.is_whole
    return coll


def eager_rendering(coll: Lazy) -> tuple[bytes, offsets.Offsets | None]:
    """What the eager compaction writes for this collection now: its file and its table."""
    changes = coll.changes()
    assert changes is not None
    docs = coll.file.read_all()
    docs.update(changes)  # type: ignore[arg-type]
    for key in [k for k, raw in changes.items() if raw is None]:
        del docs[key]
    parts, spans = render_with_spans(docs)
    raw = b"".join(parts)
    table = None
    if spans is not None:
        table = offsets.build_offsets(spans, len(raw), zlib.crc32(raw), 0)
    return raw, table


def same_table(a: offsets.Offsets, b: offsets.Offsets) -> None:
    assert list(a.offsets) == list(b.offsets)
    assert list(a.lengths) == list(b.lengths)
    assert list(a.key_ends) == list(b.key_ends)
    assert bytes(a.keys) == bytes(b.keys)
    assert list(a.slots) == list(b.slots)
    assert (a.snapshot_size, a.snapshot_crc) == (b.snapshot_size, b.snapshot_crc)


@pytest.mark.usefixtures("sidecar_always")
@pytest.mark.parametrize("seed", range(8))
async def test_the_merged_snapshot_is_the_eager_one_byte_for_byte(tmp_path: Path, seed: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 40, 700, 3000])
    path = tmp_path / "s"
    expected = await seeded(path, n, seed)
    # small parts, so that runs are cut and chunks are crossed everywhere
    monkeypatch.setattr(merged, "PART_BYTES", rng.choice([1, 64, 1000, 1 << 18]))
    async with storage.open_store(config=cfg(path)) as store:
        keys = list(expected)
        for step in range(rng.choice([0, 1, 5, 60, 400])):
            action = rng.random()
            if action < 0.35 and keys:
                k = rng.choice(keys)
                expected[k] = doc(rng, -step)
                await store.put(COLL, k, expected[k])
            elif action < 0.55:
                k = f"new{rng.randrange(50):03d}" if rng.random() < 0.5 else f"k{rng.randrange(n + 20):06d}"
                expected[k] = doc(rng, step)
                await store.put(COLL, k, expected[k])
            elif action < 0.85 and expected:
                k = rng.choice(list(expected))
                del expected[k]
                await store.delete(COLL, k)
            elif keys:
                k = rng.choice(keys)
                assert await store.get(COLL, k) == expected.get(k)
        coll = lazy_of(store)
        raw, table = eager_rendering(coll)
        await store.compact()
        assert (path / f"{COLL}.json").read_bytes() == raw
        if expected:
            assert table is not None
            written = offsets.read_offsets(path / SIDECAR, len(raw))
            assert isinstance(written, offsets.Offsets)
            same_table(written, table)
            assert isinstance(store._tables.data[COLL], Lazy)
        assert {k: await store.get(COLL, k) for k in expected} == expected
        assert await store.count(COLL) == len(expected)
    assert orjson.loads((path / f"{COLL}.json").read_bytes()) == expected
    async with storage.open_store(config=cfg(path)) as store:  # lazily, through the new sidecar
        assert dict([pair async for pair in store.items(COLL)]) == expected
    for p in path.glob("storage.*.offsets"):
        p.unlink()
    async with storage.open_store(config=cfg(path)) as store:  # eagerly
        assert dict([pair async for pair in store.items(COLL)]) == expected


@pytest.mark.usefixtures("sidecar_always")
async def test_a_key_needing_an_escape_takes_the_eager_path(tmp_path: Path) -> None:
    path = tmp_path / "s"
    expected = await seeded(path, 50, 1)
    async with storage.open_store(config=cfg(path)) as store:
        expected['we"ird'] = {"v": 1}
        await store.put(COLL, 'we"ird', {"v": 1})
        assert not merged.MergedSnapshot.possible(lazy_of(store).changes() or {})
        await store.compact()
        assert not (path / SIDECAR).exists()  # such a file has no table: it is read whole
        assert {k: await store.get(COLL, k) for k in expected} == expected
    assert orjson.loads((path / f"{COLL}.json").read_bytes()) == expected


async def test_a_collection_shrunk_below_the_sidecar_size_is_held_whole(tmp_path: Path) -> None:
    path = tmp_path / "s"
    expected = await seeded(path, 3000, 2)  # about 330 KB: over offsets.MIN_SNAPSHOT_BYTES
    async with storage.open_store(config=cfg(path)) as store:
        for k in list(expected)[:2900]:
            del expected[k]
        async with store.transaction() as tx:
            for i in range(2900):
                await tx.delete(COLL, f"k{i:06d}")
        await store.compact()
        assert not (path / SIDECAR).exists()
        assert {k: await store.get(COLL, k) for k in expected} == expected
        assert await store.count(COLL) == 100
    assert orjson.loads((path / f"{COLL}.json").read_bytes()) == expected


@pytest.mark.usefixtures("sidecar_always")
async def test_an_old_file_changed_in_place_stops_the_compaction(tmp_path: Path) -> None:
    """The bytes copied are checked (crc32 of the whole old file) before the new file replaces it: an edit in place
    that kept the size and the modification time (so that only the checksum can tell) raises, and leaves the edited
    file, the sidecar and no temp file behind."""
    path = tmp_path / "s"
    await seeded(path, 300, 3)
    async with storage.open_store(config=cfg(path)) as store:
        await store.put(COLL, "k000001", {"changed": True})
        snap = path / f"{COLL}.json"
        st = snap.stat()
        raw = snap.read_bytes()
        edited = raw.replace(b'"n":', b'"m":', 1)
        with open(snap, "r+b") as f:
            f.write(edited)
        os.utime(snap, ns=(st.st_atime_ns, st.st_mtime_ns))
        sidecar = (path / SIDECAR).read_bytes()
        with pytest.raises(ExternalChangeError, match="changed in place"):
            await store.compact()
        assert snap.read_bytes() == edited
        assert (path / SIDECAR).read_bytes() == sidecar
        assert sorted(p.name for p in path.iterdir() if p.name.startswith(".") or "tmp" in p.name) == []
        store._journal.close()  # the journal keeps the change; the edited file is the person's to sort out
        store._flock.close()
        store._closed = True


async def test_compaction_memory_is_what_changed_not_the_collection(tmp_path: Path) -> None:
    """A 20k-document collection of member-sized documents (about 7 MB) with 10 documents changed: the compaction
    allocates a small part of the file (the eager way held the file's bytes twice over, as a dict and as rendered
    lines). What remains is the new sidecar table (about 30 bytes a document) and a buffer of
    ``merged.PART_BYTES``."""
    path = tmp_path / "s"
    await seeded(path, 20_000, 4, pad=300)
    size = (path / f"{COLL}.json").stat().st_size
    async with storage.open_store(config=cfg(path)) as store:
        for i in range(10):
            await store.put(COLL, f"k{i * 1999:06d}", {"changed": i})
        lazy_of(store)
        tracemalloc.start()  # it sees every thread's allocations: the compaction's worker thread's too
        try:
            await store.compact()
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(store._tables.data[COLL], Lazy)
        assert await store.get(COLL, f"k{1999:06d}") == {"changed": 1}
    assert peak < size / 4, (peak, size)
