"""The JSON backend writes a key -> offset sidecar only beside a snapshot of ``offsets.MIN_SNAPSHOT_BYTES`` or more
(json/offsets.py: below it a whole read opens as fast, and the file only clutters the folder a person reads).
Both ways, at the exact boundary, at open and at compaction, on real folders (and the CLI's demo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import storage
from storage.backends.json import offsets
from storage.backends.json.lazy import Lazy

ROOT = Path(__file__).resolve().parent.parent


def cfg(path: Path, **kw: Any) -> storage.StoreConfig:
    return storage.StoreConfig(backend="json", path=str(path), source="tests", **kw)


def docs(n: int, pad: int = 300) -> dict[str, dict[str, Any]]:
    return {f"k{i:05d}": {"i": i, "pad": "p" * pad} for i in range(n)}


def sidecars(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("storage.*.offsets"))


def lazy(store: Any, name: str) -> bool:
    return type(store._tables.data[name]) is Lazy


def test_the_default_threshold_is_the_measured_one() -> None:
    assert offsets.MIN_SNAPSHOT_BYTES == 256 * 1024
    assert not offsets.wants_sidecar(256 * 1024 - 1) and offsets.wants_sidecar(256 * 1024)


async def test_only_a_large_snapshot_gets_a_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "s"
    large, small = docs(1200), docs(5)
    async with storage.open_store(config=cfg(path)) as store:
        await store.put_many("large", large)
        await store.put_many("small", small)
        await store.put("settings", "1", {"prefix": "!"})
    assert (path / "large.json").stat().st_size >= offsets.MIN_SNAPSHOT_BYTES > (path / "small.json").stat().st_size
    assert sidecars(path) == ["storage.large.offsets"]
    async with storage.open_store(config=cfg(path)) as store:
        assert lazy(store, "large") and not lazy(store, "small") and not lazy(store, "settings")
        assert await store.get("large", "k00007") == large["k00007"]
        assert await store.get_many("small", list(small)) == small
    assert sidecars(path) == ["storage.large.offsets"]  # an open and close that changed nothing wrote nothing


async def test_the_boundary_both_ways_at_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot of exactly the threshold gets its sidecar; one byte more threshold and the next writable open
    removes it (a sidecar left by an older version, or from when the threshold was lower) and reads it whole; a
    read-only open removes nothing."""
    path = tmp_path / "s"
    monkeypatch.setattr(offsets, "MIN_SNAPSHOT_BYTES", 0)
    data = docs(40, pad=20)
    async with storage.open_store(config=cfg(path)) as store:
        await store.put_many("things", data)
    size = (path / "things.json").stat().st_size
    assert sidecars(path) == ["storage.things.offsets"]

    monkeypatch.setattr(offsets, "MIN_SNAPSHOT_BYTES", size + 1)
    async with storage.open_store(config=cfg(path, read_only=True)) as store:
        assert not lazy(store, "things") and await store.get("things", "k00003") == data["k00003"]
    assert sidecars(path) == ["storage.things.offsets"]  # read-only: nothing removed
    async with storage.open_store(config=cfg(path)) as store:
        assert not lazy(store, "things")
        assert sidecars(path) == []  # removed at open
        assert {k: d async for k, d in store.items("things")} == data

    monkeypatch.setattr(offsets, "MIN_SNAPSHOT_BYTES", size)
    async with storage.open_store(config=cfg(path)) as store:
        assert not lazy(store, "things")  # no sidecar yet: read whole, and the sidecar written
        assert sidecars(path) == ["storage.things.offsets"]
    async with storage.open_store(config=cfg(path)) as store:
        assert lazy(store, "things")
        assert {k: await store.get("things", k) for k in data} == data


async def test_compaction_removes_the_sidecar_of_a_snapshot_that_shrank_and_writes_one_when_it_grows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    monkeypatch.setattr(offsets, "MIN_SNAPSHOT_BYTES", 20_000)
    data = docs(200, pad=100)  # ~24 KB
    async with storage.open_store(config=cfg(path)) as store:
        await store.put_many("things", data)
    assert (path / "things.json").stat().st_size >= 20_000
    assert sidecars(path) == ["storage.things.offsets"]

    async with storage.open_store(config=cfg(path)) as store:
        assert lazy(store, "things")  # opened through its sidecar
        assert await store.delete_many("things", {"i": {"$gte": 20}}) == 180
        await store.compact()
        assert (path / "things.json").stat().st_size < 20_000
        assert sidecars(path) == []  # shrank below the threshold: its sidecar is gone ...
        assert not lazy(store, "things")  # ... and the collection stays a plain dict
        assert {k: d async for k, d in store.items("things")} == {k: data[k] for k in list(data)[:20]}

        await store.put_many("things", data)
        await store.compact()
        assert sidecars(path) == ["storage.things.offsets"]  # above again: written at compaction
    async with storage.open_store(config=cfg(path)) as store:
        assert lazy(store, "things")
        assert {k: await store.get("things", k) for k in data} == data


def test_the_demo_leaves_no_sidecar_beside_its_small_files(tmp_path: Path) -> None:
    """The README's first command: a person looking into config/ sees the collections and the journal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    data = tmp_path / "config"
    done = subprocess.run([sys.executable, "-m", "storage", "demo", "--members", "200", "--messages", "300",
                           "--path", str(data)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (data / "members.json").stat().st_size < offsets.MIN_SNAPSHOT_BYTES
    assert sidecars(data) == []
