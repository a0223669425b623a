"""Declared indexes travel with the data (storage/backup/indexes.py): ``copy`` between every pair of backends, backups
and restores, and ``status`` lists them. Real JSON folders and the real PostgreSQL, each store on its own schema."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import storage
from storage import BackupError, StoreConfig
from storage.backup import copy as copy_module
from storage.backup.copy import copy
from storage.backup.format import read_manifest, resolve_backup, verify_backup_dir, write_manifest

ROOT = Path(__file__).resolve().parent.parent
GUILD = "77"
#: What the source declares: two paths of a collection with documents, one of a collection still empty.
DECLARED = {"cooldowns": ["until"], "members": ["roles", "statistics.message_count"]}


async def declare(store: Any, indexes: dict[str, list[str]]) -> None:
    for name, paths in indexes.items():
        for path in paths:
            assert await store.ensure_index(name, path)


async def populate(store: Any) -> None:
    await store.put_many("members", {f"{GUILD}_{100 + i}": {
        "user_id": str(100 + i), "guild_id": GUILD, "roles": ["mod"] if i % 5 == 0 else ["member"],
        "statistics": {"message_count": i * 7 % 40}} for i in range(60)})
    await store.put("settings", GUILD, {"prefix": "!"})


async def indexes_of(store: Any) -> dict[str, list[str]]:
    """Through the public call, collection by collection (what a bot sees)."""
    out = {}
    for name in ("cooldowns", "members", "settings", "other"):
        paths = await store.indexes(name)
        if paths:
            out[name] = paths
    return out


async def queries(store: Any) -> list[Any]:
    return [await store.find("members", {"roles": "mod"}),
            await store.find("members", {"statistics.message_count": {"$gte": 30}},
                             order_by="-statistics.message_count", limit=5),
            await store.count("members", {"statistics.message_count": {"$lt": 10}})]


@pytest.fixture
def target_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreConfig]:
    """An empty store of the kind ``request.param`` names, on its own folder or schema."""
    if request.param == "json":
        yield StoreConfig(backend="json", path=str(tmp_path / "target"), backup_dir=str(tmp_path / "backups"),
                          lock_timeout=30, source="tests")
        return
    server = request.getfixturevalue("pg_server")
    name, dsn = server.new_schema()
    try:
        yield StoreConfig(backend="postgres", dsn=dsn, backup_dir=str(tmp_path / "backups"), source="tests")
    finally:
        server.drop_schema(name)


@pytest.fixture
async def target(target_config: StoreConfig) -> AsyncIterator[Any]:
    s = await storage.open_store(config=target_config)
    try:
        yield s
    finally:
        await s.close()


BOTH = pytest.mark.parametrize("target_config", ["json", "postgres"], indirect=True)


# -------------------------------------------------------------------------------------------------------------------
# copy
@BOTH
async def test_copy_carries_the_declared_indexes_to_every_kind_of_target(store: Any, target: Any) -> None:
    """JSON -> JSON, JSON -> PostgreSQL, PostgreSQL -> JSON, PostgreSQL -> PostgreSQL: the target declares what the
    source declared (an empty collection's index too) and answers the same queries."""
    await populate(store)
    await declare(store, DECLARED)
    report = await copy(store, target)
    assert report.indexes == DECLARED
    assert report.dropped_indexes == {}
    assert await indexes_of(target) == DECLARED
    assert await target._all_indexes() == DECLARED
    assert await queries(target) == await queries(store)


@BOTH
async def test_copy_overwrite_makes_the_target_indexes_exactly_the_sources(store: Any, target: Any) -> None:
    await populate(store)
    await declare(store, {"members": ["roles"]})
    await populate(target)
    await declare(target, {"members": ["statistics.message_count"], "settings": ["prefix"]})
    report = await copy(store, target, overwrite=True)
    assert report.dropped_indexes == {"members": ["statistics.message_count"], "settings": ["prefix"]}
    assert await target._all_indexes() == {"members": ["roles"]}
    assert await queries(target) == await queries(store)


@BOTH
async def test_copy_into_an_empty_target_keeps_the_targets_own_indexes(store: Any, target: Any) -> None:
    """Without overwrite the target holds no data, but may have declared indexes already (a bot that started on
    it): they stay, beside the source's."""
    await populate(store)
    await declare(store, {"members": ["roles"]})
    await declare(target, {"cooldowns": ["until"]})
    report = await copy(store, target)
    assert report.dropped_indexes == {}
    assert await target._all_indexes() == {"cooldowns": ["until"], "members": ["roles"]}


async def test_copy_verification_fails_when_an_index_did_not_arrive(store: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The verification reads the target's indexes back: a copy whose indexes were not declared (here the step
    that declares them is skipped) is not reported as a success."""
    await populate(store)
    await declare(store, {"members": ["roles"]})

    async def nothing(*_args: Any, **_kw: Any) -> dict[str, list[str]]:
        return {}

    monkeypatch.setattr(copy_module, "carry_indexes", nothing)
    config = StoreConfig(backend="json", path=str(tmp_path / "t"), backup_dir=str(tmp_path / "b"), source="tests")
    async with storage.open_store(config=config) as target:
        with pytest.raises(BackupError, match=r"indexes differ.*missing \{'members': \['roles'\]\}"):
            await copy(store, target)


# -------------------------------------------------------------------------------------------------------------------
# backups and restores
@BOTH
async def test_a_backup_records_the_indexes_and_a_restore_declares_them(store: Any, target: Any) -> None:
    """Into the same kind of backend and across: the manifest lists the declared indexes, a dry run says which it
    would declare and declares none, a restore declares them and keeps the store's own."""
    await populate(store)
    await declare(store, DECLARED)
    info = await store.create_backup()
    manifest = read_manifest(resolve_backup(Path(store.config.backup_dir), info.id))
    assert manifest["indexes"] == DECLARED
    await declare(target, {"members": ["roles"], "settings": ["prefix"]})

    dry = await target.restore_backup(info.id, dry_run=True)
    assert dry.indexes == {"cooldowns": ["until"], "members": ["statistics.message_count"]}
    assert await target._all_indexes() == {"members": ["roles"], "settings": ["prefix"]}

    report = await target.restore_backup(info.id)
    assert report.indexes == {"cooldowns": ["until"], "members": ["statistics.message_count"]}
    assert await target._all_indexes() == {**DECLARED, "settings": ["prefix"]}  # the store's own one stays
    assert await queries(target) == await queries(store)
    # the safety backup taken before the restore recorded the indexes the store had then
    assert report.safety_backup is not None
    safety = read_manifest(resolve_backup(Path(target.config.backup_dir), report.safety_backup))
    assert safety["indexes"] == {"members": ["roles"], "settings": ["prefix"]}


async def test_a_backup_from_before_indexes_were_recorded_restores_and_declares_none(store: Any) -> None:
    await populate(store)
    await declare(store, {"members": ["roles"]})
    info = await store.create_backup()
    root = resolve_backup(Path(store.config.backup_dir), info.id)
    manifest = read_manifest(root)
    del manifest["indexes"], manifest["checksum"]
    (root / "manifest.json").unlink()
    write_manifest(root, manifest)
    assert verify_backup_dir(Path(store.config.backup_dir), info.id).ok
    await store.drop_index("members", "roles")
    report = await store.restore_backup(info.id)
    assert report.indexes == {}
    assert await store._all_indexes() == {}


@pytest.mark.parametrize("bad", [["roles"], {"members": "roles"}, {"members": [""]}, {"../x": ["a"]},
                                 {"members": ["$where"]}])
async def test_a_manifest_with_malformed_indexes_fails_verification_and_restores_nothing(store: Any,
                                                                                         bad: Any) -> None:
    await populate(store)
    info = await store.create_backup()
    root = resolve_backup(Path(store.config.backup_dir), info.id)
    manifest = read_manifest(root)
    manifest["indexes"] = bad
    del manifest["checksum"]
    (root / "manifest.json").unlink()
    write_manifest(root, manifest)  # a correct checksum over the bad field: only the shape check can catch it
    report = verify_backup_dir(Path(store.config.backup_dir), info.id)
    assert not report.ok and "indexes" in " ".join(report.problems)
    await store.put("settings", GUILD, {"prefix": "?"})
    with pytest.raises(BackupError):
        await store.restore_backup(info.id)
    assert await store.get("settings", GUILD) == {"prefix": "?"}


# -------------------------------------------------------------------------------------------------------------------
# status
def where(config: StoreConfig) -> list[str]:
    return ["--path", config.path] if config.backend == "json" else ["--dsn", str(config.dsn)]


async def test_status_lists_each_collections_indexes(store_config: StoreConfig) -> None:
    async with storage.open_store(config=store_config) as store:
        await populate(store)
        await declare(store, DECLARED)
        await store.ensure_index("_migrations", "description")  # an internal collection stays hidden
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "storage", "status",
                                                      *where(store_config)],
                                     capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = {line.split()[0]: n for n, line in enumerate(lines) if line.startswith("  ") and not line.startswith("    ")}
    assert lines[at["members"]].split()[1:] == ["60", "documents"]
    assert lines[at["members"] + 1] == "    indexes: roles, statistics.message_count"
    assert lines[at["cooldowns"]].split()[1:] == ["0", "documents"]  # indexed, still empty: listed
    assert lines[at["cooldowns"] + 1] == "    indexes: until"
    assert "indexes" not in lines[at["settings"] + 1]
    assert "collections: 3" in lines
    assert "_migrations" not in result.stdout and "description" not in result.stdout


async def test_the_copy_command_says_which_indexes_it_carried(tmp_path: Path) -> None:
    source = StoreConfig(backend="json", path=str(tmp_path / "a"), source="tests")
    async with storage.open_store(config=source) as store:
        await populate(store)
        await declare(store, DECLARED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "storage", "copy", "--from",
                                                      str(tmp_path / "a"), "--to", str(tmp_path / "b")],
                                     capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "  indexes on members: roles, statistics.message_count (declared on the target and verified)" in (
        result.stdout.splitlines()), result.stdout
    assert "  indexes on cooldowns: until (declared on the target and verified)" in result.stdout.splitlines()
    async with storage.open_store(config=StoreConfig(backend="json", path=str(tmp_path / "b"),
                                                     source="tests")) as copied:
        assert await copied._all_indexes() == DECLARED  # type: ignore[attr-defined]
