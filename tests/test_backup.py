"""Backups, restores, retention and verified copies, on every backend and across backends.

Every test damages or races real files and real processes: bytes are flipped on disk, writers run while backups
are taken, a child process writing a backup is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

import storage
from storage import BackupError, StoreConfig, ValidationError
from storage.backup.copy import TargetNotEmptyError, copy
from storage.backup.format import (
    MANIFEST_NAME,
    BackupInfo,
    backup_sort_key,
    read_manifest,
    trimmed,
    verify_backup_dir,
    write_manifest,
)
from storage.backup.operations import prune_backup_dir, restore_from, select_expired
from storage.backup.source import describe_source, store_source
from tests._cancel import all_or_nothing_at_every_turn

ROOT = Path(__file__).resolve().parent.parent
GUILD = "987654321"


# -------------------------------------------------------------------------------------------------------------------
# helpers
def has_messages(store: Any) -> bool:
    return callable(getattr(store, "scan_messages", None))


async def populate(store: Any, members: int = 40, messages: int = 60) -> None:
    """A little of everything: seed-shaped members, another collection, a migration ledger, messages."""
    await store.batch_update_members([
        {"user_id": 1000 + i, "guild_id": GUILD, "data": {
            "user_id": str(1000 + i), "guild_id": GUILD, "join_date": "2024-01-01T00:00:00Z",
            "roles": ["member"] + (["mod"] if i % 7 == 0 else []),
            "preferences": {"notifications": i % 2 == 0, "language": "ja"},
            "statistics": {"message_count": i * 3, "last_active": "2024-01-15T12:00:00Z"},
            "note": "ünïcødé ✓ \"quoted\" \\ back\nslash", "ratio": i / 7}}
        for i in range(members)])
    await store.put_many("spam_blocker", {"settings": {"threshold": 5, "words": ["a", "b"], "nested": {"x": None}},
                                          "z-last": {"ok": True}, "weird key / with spaces": {"n": -1}})
    await store.put_many("_migrations", {"1.0.0": {"description": "init"}, "1.2.0": {"description": "two"},
                                         "1.10.0": {"description": "ten"}})
    if has_messages(store) and messages:
        await store.record_messages([{
            "message_id": str(5000 + i), "guild_id": GUILD, "channel_id": str(10 + i % 3),
            "author_id": str(1000 + i % 9), "timestamp": f"2024-0{1 + i % 3}-0{1 + i % 9}T12:00:{i % 60:02d}Z",
            "content_length": i, "attachments": i % 2, "reactions": i % 5,
            "analysis": {"sentiment": ("positive", "neutral")[i % 2], "topics": ["gaming"]}}
            for i in range(messages)])


async def all_messages(store: Any) -> list[dict[str, Any]]:
    if not has_messages(store):
        return []
    out = [record async for record in store.scan_messages(None, None, None)]
    return sorted(out, key=lambda r: r["message_id"])


async def snapshot(store: Any) -> dict[str, Any]:
    """Everything the store holds, as plain data (dict equality ignores key order, as jsonb does)."""
    data: dict[str, Any] = {}
    for name in await store.collections():
        data[name] = {key: doc async for key, doc in store.items(name)}
    data["#messages"] = await all_messages(store)
    return data


def json_config(path: Path, backup_dir: str | os.PathLike[str]) -> StoreConfig:
    return StoreConfig(backend="json", path=str(path), backup_dir=str(backup_dir), lock_timeout=30, source="tests")


@pytest.fixture
async def json_twin(store_config: StoreConfig, tmp_path: Path) -> AsyncIterator[Any]:
    """A second, empty JSON store sharing the backup folder (a copy target on every backend)."""
    s = await storage.open_store(config=json_config(tmp_path / "twin", store_config.backup_dir))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def other_config(store_config: StoreConfig, tmp_path: Path, request: pytest.FixtureRequest) -> StoreConfig:
    """Where a store of the *other* backend lives, sharing the backup folder (sync: resolves ``pg_dsn``)."""
    if store_config.backend == "json":
        try:
            dsn = request.getfixturevalue("pg_dsn")
        except pytest.FixtureLookupError:
            pytest.skip("cross-backend test needs the pg_dsn fixture (the PostgreSQL backend is not in conftest)")
        return StoreConfig(backend="postgres", dsn=dsn, backup_dir=store_config.backup_dir, source="tests")
    return json_config(tmp_path / "other", store_config.backup_dir)


@pytest.fixture
async def other_backend(other_config: StoreConfig) -> AsyncIterator[Any]:
    """An empty store of the other backend."""
    s = await storage.open_store(config=other_config)
    try:
        yield s
    finally:
        await s.close()


def content(path: Path) -> bytes:
    """A backup file's content, gunzipped when it is a ``.gz`` (as ``zcat`` would)."""
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def set_content(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _rewrite_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest.pop("checksum", None)
    (root / MANIFEST_NAME).unlink()
    write_manifest(root, manifest)


def reseal(root: Path, relative: str) -> None:
    """Re-hash one file into the manifest, as a careless hand edit of a backup would: verification then passes."""
    manifest = read_manifest(root)
    data = content(root / relative)
    for entry in [*manifest["collections"].values(), manifest.get("messages") or {}, *manifest.get("files", [])]:
        if entry.get("file") == relative:
            entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
            if "count" in entry:
                entry["count"] = data.count(b"\n")
            if "stored_bytes" in entry:
                entry["stored_bytes"] = (root / relative).stat().st_size
    _rewrite_manifest(root, manifest)


def to_format_1(root: Path) -> None:
    """Turn a backup into what the library wrote before compression and loose files (format 1), as an old
    backup on disk is: plain ``.jsonl`` files, no ``files``, no ``stored_bytes``."""
    manifest = read_manifest(root)
    for entry in [*manifest["collections"].values(), *([manifest["messages"]] if manifest.get("messages") else [])]:
        old = root / entry["file"]
        plain = entry["file"].removesuffix(".gz")
        (root / plain).write_bytes(content(old))
        os.chmod(root / plain, 0o600)
        old.unlink()
        entry["file"] = plain
        entry.pop("stored_bytes", None)
        entry.pop("compression", None)
    if (root / "files").exists():
        shutil.rmtree(root / "files")
    manifest.pop("files", None)
    manifest["format_version"] = 1
    _rewrite_manifest(root, manifest)


def flip_byte(path: Path, position: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if position is None else position
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def backup_docs(info: BackupInfo, collection: str) -> dict[str, Any]:
    lines = content(info.path / "collections" / f"{collection}.jsonl.gz").splitlines()
    return {rec["key"]: rec["doc"] for rec in map(orjson.loads, lines)}


# -------------------------------------------------------------------------------------------------------------------
# create, verify, restore
async def test_round_trip_restores_exactly_and_saves_the_replaced_state(store):
    await populate(store)
    original = await snapshot(store)
    started = datetime.now(timezone.utc).replace(microsecond=0)
    info = await store.create_backup(label="before the experiment")
    finished = datetime.now(timezone.utc)

    assert info.counts == {name: len(docs) for name, docs in original.items() if name != "#messages"}
    assert info.messages == (len(original["#messages"]) if has_messages(store) else None)
    assert info.migration_version == "1.10.0"  # compared as a version, not as text
    assert info.backend == store.backend_name and info.library_version == storage.__version__
    assert info.label == "before the experiment"
    assert started <= info.created_at <= finished  # stamped by this call, in UTC
    assert (await store.verify_backup(info.id)).ok

    # the bot keeps going: changes, deletions, a new collection, new messages, a migration
    await store.save_member_data(1003, GUILD, {"roles": ["changed"]})
    await store.delete("members", f"{GUILD}_1004")
    await store.put("new_collection", "k", {"v": 1})
    await store.delete("_migrations", "1.10.0")
    if has_messages(store):
        await store.prune_messages("2024-02-01T00:00:00Z")
        await store.record_message({"message_id": "999999", "guild_id": GUILD, "channel_id": "1",
                                    "author_id": "2", "timestamp": "2024-06-01T00:00:00Z"})
    changed = await snapshot(store)
    assert changed != original

    dry = await store.restore_backup(info.id, dry_run=True)
    assert dry.dry_run and dry.safety_backup is None
    assert await snapshot(store) == changed  # a dry run changes nothing
    assert dry.collections["members"].changed == 1 and dry.collections["members"].added == 1
    assert dry.collections["new_collection"].removed == 1
    assert dry.collections["_migrations"].added == 1

    report = await store.restore_backup(info.id)
    assert await snapshot(store) == original
    assert report.changed == dry.changed == 4
    assert report.safety_backup is not None and report.safety_backup != info.id
    safety = next(b for b in await store.list_backups() if b.id == report.safety_backup)
    assert "before restoring" in (safety.label or "")
    assert safety.counts["new_collection"] == 1 and safety.migration_version == "1.2.0"

    # the safety backup undoes the restore
    await store.restore_backup(safety.id)
    assert await snapshot(store) == changed


async def test_a_restore_cancelled_at_any_point_leaves_all_or_nothing(store, reopen):
    """A restore is all or nothing under cancellation too: cancelled after any number of loop turns (then, as its
    worker threads take time, after growing sleeps), the store holds either what it held or the backup, never a
    mix, and another store opened on the same data sees the same. Covers the await points the restore's passes
    added (decoding in groups, freeing each collection's bytes in a worker thread inside the transaction)."""
    await populate(store)
    original = await snapshot(store)
    info = await store.create_backup()
    await store.save_member_data(1003, GUILD, {"roles": ["changed"]})
    await store.delete("members", f"{GUILD}_1004")
    await store.put("new_collection", "k", {"v": 1})
    if has_messages(store):
        await store.record_message({"message_id": "999999", "guild_id": GUILD, "channel_id": "1",
                                    "author_id": "2", "timestamp": "2024-06-01T00:00:00Z"})
    changed = await snapshot(store)
    assert changed != original
    await all_or_nothing_at_every_turn(lambda: store.restore_backup(info.id), lambda: snapshot(store),
                                       changed, original)
    other = await reopen()
    try:
        assert await snapshot(other) == original
    finally:
        await other.close()


async def test_restore_keeps_key_order_on_json(store):
    if store.backend_name != "json":
        pytest.skip("only JSON files keep a document's key order (jsonb sorts keys)")
    await store.put("ordered", "k", {"z": 1, "a": 2, "m": {"y": 1, "b": 2}})
    info = await store.create_backup()
    await store.put("ordered", "k", {"other": True})
    await store.restore_backup(info.id)
    doc = await store.get("ordered", "k")
    assert list(doc) == ["z", "a", "m"] and list(doc["m"]) == ["y", "b"]


async def test_backup_files_are_private_and_gzipped_json_lines(store):
    await populate(store)
    info = await store.create_backup()
    for dirpath, _dirnames, filenames in os.walk(info.path):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for name in filenames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o600, name
    manifest = json.loads((info.path / MANIFEST_NAME).read_text())
    assert manifest["format"] == "storage-backup" and manifest["format_version"] == 2
    assert manifest["source"]["backend"] == store.backend_name
    for entry in manifest["collections"].values():
        assert len(entry["sha256"]) == 64 and len(entry["digest"]) == 64
    members = backup_docs(info, "members")
    assert members == {key: doc async for key, doc in store.items("members")}
    if has_messages(store):
        with gzip.open(info.path / "messages.jsonl.gz", "rt") as f:  # what zcat reads
            lines = f.read().splitlines()
        assert sorted(json.loads(line)["message_id"] for line in lines) == [m["message_id"]
                                                                          for m in await all_messages(store)]
        assert manifest["messages"]["same_snapshot"] is True


async def test_ids_taken_in_the_same_second_get_suffixes(store):
    await store.put("c", "k", {"v": 1})
    ids = [(await store.create_backup()).id for _ in range(4)]
    assert len(set(ids)) == 4
    assert ids == sorted(ids, key=backup_sort_key)
    assert [b.id for b in await store.list_backups()] == ids


async def test_empty_store_backs_up_and_restores(store):
    info = await store.create_backup()
    assert info.counts == {} and (await store.verify_backup(info.id)).ok
    await populate(store)
    await store.restore_backup(info.id)
    assert await store.collections() == []
    assert await all_messages(store) == []


def _loose_tree(data: Path, bot: Path) -> dict[str, bytes]:
    """Files a bot keeps beside its store, as the seed's create_backup found them."""
    files = {
        "data:version.json": b'{"version": "1.0"}',
        "data:spam_blocker.json": b'{"threshold": 5, "words": ["a"]}',  # flat: not a collection of objects
        "data:notes/readme.txt": b"hand-written notes\n",
        "data:blob.bin": bytes(range(256)) * 40,
    }
    for name, content_ in files.items():
        path = data / name.split(":", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content_)
    (data / "link.json").symlink_to(data / "version.json")
    bot.mkdir(parents=True, exist_ok=True)
    for name, content_ in (("message_log.json", b'{"1": "hi"}'), ("roles_cache.json", b'["admin"]'),
                           ("other.json", b"{}")):
        (bot / name).write_bytes(content_)
    files[f"extra:{bot / 'message_log.json'}"] = b'{"1": "hi"}'
    files[f"extra:{bot / 'roles_cache.json'}"] = b'["admin"]'
    return files


async def test_backup_holds_every_file_the_store_does_not_own_and_restore_puts_them_back(store_config, tmp_path):
    if store_config.backend != "json":
        pytest.skip("a data folder is a JSON store's")
    bot = tmp_path / "bot"
    config = dataclasses.replace(store_config, backup_extra=(str(bot / "message*.json"), str(bot / "roles*.json"),
                                                             str(bot / "nothing*.json")))
    Path(config.path).mkdir(parents=True)
    expected = _loose_tree(Path(config.path), bot)
    async with storage.open_store(config=config) as store:
        await store.put_many("members", {f"{GUILD}_{i}": {"n": i} for i in range(20)})  # the seed's shape:
        await store.record_message({"message_id": "5", "guild_id": GUILD, "channel_id": "1", "author_id": "2",
                                    "timestamp": "2024-06-01T00:00:00Z"})  # members is a collection, the rest not
        info = await store.create_backup()  # type: ignore[attr-defined]
        assert set(info.files) == set(expected)
        manifest = read_manifest(info.path)
        for entry in manifest["files"]:
            original = expected[f"{entry['origin']}:{entry['path']}"]
            assert entry["sha256"] == hashlib.sha256(original).hexdigest() and entry["bytes"] == len(original)
            assert gzip.decompress((info.path / entry["file"]).read_bytes()) == original  # readable with gzip
        assert manifest["skipped_files"] == {"data:link.json": "a symlink (not followed: back up its target by name)",
                                             f"extra:{bot / 'nothing*.json'}": "matched nothing"}
        assert not any(k.startswith(("data:storage.", "data:members", "data:messages")) for k in info.files)
        assert (await store.verify_backup(info.id)).ok  # type: ignore[attr-defined]

        # the files change, one disappears, a new one appears
        data = Path(config.path)
        (data / "version.json").write_bytes(b'{"version": "2.0"}')
        (data / "notes" / "readme.txt").unlink()
        (bot / "message_log.json").write_bytes(b"{}")
        (data / "new.txt").write_bytes(b"made after the backup")
        dry = await store.restore_backup(info.id, dry_run=True)  # type: ignore[attr-defined]
        assert dry.files["data:version.json"] == "would be restored"
        assert dry.files["data:blob.bin"] == "unchanged"
        assert (data / "version.json").read_bytes() == b'{"version": "2.0"}'
        report = await store.restore_backup(info.id)  # type: ignore[attr-defined]
        assert report.files == {**{name: "unchanged" for name in expected},
                                "data:version.json": "restored", "data:notes/readme.txt": "restored",
                                f"extra:{bot / 'message_log.json'}": "restored"}
    for name, original in expected.items():
        origin, where = name.split(":", 1)
        assert ((Path(config.path) / where) if origin == "data" else Path(where)).read_bytes() == original
    assert (data / "new.txt").read_bytes() == b"made after the backup"  # removes nothing it did not back up

    # verify checks the files too
    stored = next(e["file"] for e in manifest["files"] if e["path"] == "version.json")
    flip_byte(info.path / stored)
    report_ = verify_backup_dir(Path(config.backup_dir), info.id)
    assert not report_.ok and any(stored in problem for problem in report_.problems)


async def test_extra_files_are_backed_up_and_restored_on_every_backend(store_config, tmp_path, monkeypatch):
    bot = tmp_path / "bot"
    bot.mkdir()
    (bot / "roles_1.json").write_bytes(b'["mod"]')
    monkeypatch.setenv("STORAGE_BACKUP_EXTRA", f"{bot / 'roles*.json'},{bot / 'message*.json'}")
    async with storage.open_store(config=store_config) as store:
        await store.put("c", "k", {"v": 1})
    where = store_args(store_config)
    created = await asyncio.to_thread(run_cli, "backup", "create", *where, "--extra", str(bot / "extra.txt"))
    assert created.returncode == 0, created.stderr
    assert f"not included: extra:{bot / 'extra.txt'}: matched nothing" in created.stdout, created.stdout
    (bot / "extra.txt").write_bytes(b"x")
    (bot / "message_9.json").write_bytes(b"{}")
    created = await asyncio.to_thread(run_cli, "backup", "create", *where, "--extra", str(bot / "extra.txt"))
    assert created.returncode == 0, created.stderr
    for name in ("roles_1.json", "message_9.json", "extra.txt"):
        assert f"extra:{bot / name}" in created.stdout, created.stdout
    backup_id = created.stdout.split()[1]
    (bot / "roles_1.json").write_bytes(b"[]")
    restored = await asyncio.to_thread(run_cli, "restore", backup_id, *where)
    assert restored.returncode == 0, restored.stderr
    assert f"file extra:{bot / 'roles_1.json'}: restored" in restored.stdout
    assert (bot / "roles_1.json").read_bytes() == b'["mod"]'


async def test_a_format_1_backup_still_verifies_and_restores(store):
    await populate(store)
    original = await snapshot(store)
    info = await store.create_backup()
    to_format_1(info.path)
    assert read_manifest(info.path)["format_version"] == 1
    assert (await store.verify_backup(info.id)).ok
    await store.put("members", f"{GUILD}_1001", {"changed": True})
    if has_messages(store):
        await store.prune_messages("2024-02-01T00:00:00Z")
    await store.restore_backup(info.id)
    assert await snapshot(store) == original


# -------------------------------------------------------------------------------------------------------------------
# damage
CORRUPTIONS = ["flip-collection", "flip-messages", "truncate", "delete-file", "flip-manifest", "extra-file",
               "symlinked-file", "no-manifest"]


@pytest.mark.parametrize("form", ["gzip", "format-1"])
@pytest.mark.parametrize("damage", CORRUPTIONS)
async def test_damaged_backup_fails_verification_and_restore_changes_nothing(store, damage, form, tmp_path):
    await populate(store)
    info = await store.create_backup()
    gz = ".gz"
    if form == "format-1":
        to_format_1(info.path)
        gz = ""
    assert (await store.verify_backup(info.id)).ok
    await store.put("members", f"{GUILD}_1001", {"changed": True})
    await store.put("later", "k", {"v": 1})
    state = await snapshot(store)
    backups = [b.id for b in await store.list_backups()]
    members = info.path / "collections" / f"members.jsonl{gz}"

    if damage == "flip-collection":
        flip_byte(members)
    elif damage == "flip-messages":
        if not has_messages(store):
            pytest.skip("this backend has no message storage")
        flip_byte(info.path / f"messages.jsonl{gz}")
    elif damage == "truncate":
        members.write_bytes(members.read_bytes()[:-10])
    elif damage == "delete-file":
        members.unlink()
    elif damage == "flip-manifest":
        manifest = info.path / MANIFEST_NAME
        text = manifest.read_bytes()
        flip_byte(manifest, text.index(b'"count": ') + 9)  # a digit of a count: still valid JSON
    elif damage == "extra-file":
        (info.path / "collections" / "intruder.jsonl").write_text("{}\n")
    elif damage == "symlinked-file":
        outside = tmp_path / "outside.jsonl"
        shutil.copy(members, outside)
        members.unlink()
        members.symlink_to(outside)
    elif damage == "no-manifest":
        (info.path / MANIFEST_NAME).unlink()

    report = await store.verify_backup(info.id)
    assert not report.ok and report.problems
    with pytest.raises(BackupError, match="verification"):
        await store.restore_backup(info.id)
    assert await snapshot(store) == state
    unreadable = damage in ("no-manifest", "flip-manifest")  # listed by `backup list` as UNREADABLE, not here
    assert [b.id for b in await store.list_backups()] == [b for b in backups if not unreadable or b != info.id]


async def test_file_changed_after_verification_is_caught_before_commit(store):
    """The restore re-hashes what it reads, so a file swapped between verification and reading is refused."""
    await populate(store)
    info = await store.create_backup()
    await store.put("members", f"{GUILD}_1001", {"changed": True})
    state = await snapshot(store)
    manifest = read_manifest(info.path)  # read while the backup was intact (as restore_backup does)
    path = info.path / "collections" / "members.jsonl.gz"
    data = bytearray(content(path))
    data[data.index(b'"message_count":') + 16] ^= 0x01  # a digit: the JSON stays valid
    set_content(path, bytes(data))
    with pytest.raises(BackupError, match="changed since it was verified"):
        await restore_from(store, info.path, manifest, backup_id=info.id)
    assert await snapshot(store) == state
    assert [b.id for b in await store.list_backups()] == [info.id]  # the safety backup was withdrawn


async def test_backup_with_data_the_store_refuses_restores_nothing(store):
    """A hand-edited backup whose hashes were redone: verification passes, the bad record still changes nothing."""
    await populate(store)
    info = await store.create_backup()
    await store.put("members", f"{GUILD}_1001", {"changed": True})
    state = await snapshot(store)
    path = info.path / "collections" / "spam_blocker.jsonl.gz"
    set_content(path, content(path) + b'{"key":"","doc":{"empty":"key"}}\n')
    reseal(info.path, "collections/spam_blocker.jsonl.gz")
    assert (await store.verify_backup(info.id)).ok
    with pytest.raises(BackupError, match="refuses"):
        await store.restore_backup(info.id)
    assert await snapshot(store) == state
    assert [b.id for b in await store.list_backups()] == [info.id]

    if has_messages(store):
        info2 = await store.create_backup()
        path = info2.path / "messages.jsonl.gz"
        set_content(path, content(path) + b'{"message_id":"not a snowflake","guild_id":"1"}\n')
        reseal(info2.path, "messages.jsonl.gz")
        with pytest.raises(BackupError, match="message_id"):
            await store.restore_backup(info2.id)
        assert await snapshot(store) == state


async def test_on_postgres_a_message_refused_late_rolls_back_the_documents_too(store):
    """The messages are swapped in the documents' transaction: a record only the server refuses (a counter that
    passes the format's checks but not a bigint), met after every document was staged, restores nothing."""
    if store.backend_name != "postgres":
        pytest.skip("JSON files swap the message log after the documents' commit (see storage/backup/operations.py)")
    await populate(store)
    info = await store.create_backup()
    await store.put("members", f"{GUILD}_1001", {"changed": True})
    await store.record_messages([{"message_id": "999999", "channel_id": "5", "author_id": "6", "guild_id": GUILD,
                                  "timestamp": "2024-05-01T00:00:00Z"}])
    state = await snapshot(store)
    messages_before = await all_messages(store)
    path = info.path / "messages.jsonl.gz"
    last = json.loads(content(path).splitlines()[-1])
    huge = {**last, "message_id": "888888888", "reactions": 2**63}
    set_content(path, content(path) + json.dumps(huge, separators=(",", ":")).encode() + b"\n")
    reseal(info.path, "messages.jsonl.gz")
    assert (await store.verify_backup(info.id)).ok
    with pytest.raises(BackupError, match="nothing was restored"):
        await store.restore_backup(info.id)
    assert await snapshot(store) == state
    assert await all_messages(store) == messages_before
    assert [b.id for b in await store.list_backups()] == [info.id]  # the unused safety backup was withdrawn


@pytest.mark.parametrize("bad", ["../x", "../../etc", "/etc", "/", "..", ".", "", "20240101_000000/../../x",
                                 "20240101_000000/", "20240101_000000_0", "2024-01-01", "20240101_000000\x00",
                                 "20240101_000000_99999", None, 20240101])
async def test_ids_that_are_not_backup_names_are_rejected(store, bad):
    with pytest.raises(BackupError, match="not a backup id"):
        await store.verify_backup(bad)
    with pytest.raises(BackupError, match="not a backup id"):
        await store.restore_backup(bad)


async def test_paths_and_symlinks_out_of_the_backup_folder_are_rejected(store, tmp_path):
    await populate(store)
    info = await store.create_backup()
    with pytest.raises(BackupError, match="not a backup id"):
        await store.restore_backup(str(info.path))  # an absolute path to a real backup
    outside = tmp_path / "elsewhere" / "20990101_000000"
    shutil.copytree(info.path, outside)
    assert verify_backup_dir(outside.parent, outside.name).ok  # a valid backup, just not in our folder
    link = Path(store.config.backup_dir) / "20990101_000000"
    link.symlink_to(outside, target_is_directory=True)
    state = await snapshot(store)
    with pytest.raises(BackupError, match="symlink"):
        await store.verify_backup(link.name)
    with pytest.raises(BackupError, match="symlink"):
        await store.restore_backup(link.name)
    assert [b.id for b in await store.list_backups()] == [info.id]
    assert await store.prune_backups(keep=1) == []
    assert outside.exists() and link.is_symlink()
    assert await snapshot(store) == state


# -------------------------------------------------------------------------------------------------------------------
# consistency under concurrent writers
LOCKSTEP_WRITER = r"""
import asyncio, json, sys
import storage
async def main():
    store = await storage.open_store(config=storage.StoreConfig(**json.loads(sys.argv[1])))
    first = True
    while True:
        try:
            async with store.transaction() as tx:
                n = (await tx.get("a_counter", "c", {"n": 0}))["n"] + 1
                await tx.put("a_counter", "c", {"n": n})
                await tx.put("z_counter", "c", {"n": n})
        except storage.DatabaseError:
            continue  # a serialization failure under concurrency: try again
        await asyncio.sleep(0.001)  # let others take the lock (filelock is not fair)
        if first:
            print("RUNNING", flush=True)
            first = False
asyncio.run(main())
"""


async def test_backup_is_one_snapshot_while_writers_run(store, store_config):
    """Writers keep two documents in two collections in lockstep (one transaction each); every backup must show
    them equal, although other writers commit between reading the first and the second collection."""
    await store.put_many("m_bulk", {f"k{i:05d}": {"i": i, "pad": "x" * 200} for i in range(4000)})
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            try:
                async with store.transaction() as tx:
                    n = (await tx.get("a_counter", "c", {"n": 0}))["n"] + 1
                    await tx.put("a_counter", "c", {"n": n})
                    await asyncio.sleep(0)  # let other tasks run in the middle of the transaction
                    await tx.put("z_counter", "c", {"n": n})
            except storage.DatabaseError:
                await asyncio.sleep(0)  # a serialization failure: try again

    child = subprocess.Popen([sys.executable, "-c", LOCKSTEP_WRITER, json.dumps(dataclasses.asdict(store_config))],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    tasks = [asyncio.create_task(writer()) for _ in range(3)]
    try:
        assert await asyncio.to_thread(child.stdout.readline) == "RUNNING\n"  # type: ignore[union-attr]
        infos = []
        for _ in range(4):
            infos.append(await store.create_backup())
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        child.kill()
        child.wait()
        await asyncio.gather(*tasks)
    seen = []
    for info in infos:
        a, z = backup_docs(info, "a_counter")["c"], backup_docs(info, "z_counter")["c"]
        assert a == z, f"backup {info.id} is not one snapshot: {a} != {z}"
        assert len(backup_docs(info, "m_bulk")) == 4000
        seen.append(a["n"])
    assert seen == sorted(seen) and seen[-1] > seen[0]  # the writers really ran between the backups


# -------------------------------------------------------------------------------------------------------------------
# retention
def _info(backup_id: str, age_days: float, now: datetime) -> BackupInfo:
    return BackupInfo(id=backup_id, path=Path(backup_id), created_at=now - timedelta(days=age_days), backend="json",
                      library_version="0", format_version=1, migration_version=None, counts={}, messages=None,
                      size_bytes=0)


def test_retention_rules_keep_exactly_what_they_say():
    now = datetime(2024, 6, 30, tzinfo=timezone.utc)
    infos = [_info(f"202406{d:02d}_000000", 30 - d, now) for d in range(1, 30)]  # ages 29 .. 1 days
    ids = [i.id for i in infos]
    expired = lambda **kw: [i.id for i in select_expired(infos, now=now, **kw)]  # noqa: E731
    assert expired() == []
    assert expired(keep=3) == ids[:-3]
    assert expired(keep_days=7) == ids[:-7]  # ages 7 and younger stay
    assert expired(keep=10, keep_days=3) == ids[:-10]  # a backup stays when either rule keeps it
    assert expired(keep=2, keep_days=5) == ids[:-5]
    assert expired(keep_days=0) == ids[:-1]  # the newest backup always stays
    assert expired(keep=100) == []
    for bad in ({"keep": 0}, {"keep": -1}, {"keep": 1.5}, {"keep_days": -1}, {"keep_days": float("nan")}):
        with pytest.raises(ValidationError):
            select_expired(infos, now=now, **bad)  # type: ignore[arg-type]


async def test_retention_on_disk_prunes_only_after_a_verified_backup(store, store_config):
    await store.put("c", "k", {"v": 1})
    ids = [(await store.create_backup()).id for _ in range(5)]
    backup_dir = Path(store.config.backup_dir)
    (backup_dir / "20000101_000000").mkdir()  # a seed-era copy: no manifest, never ours to delete
    (backup_dir / "20000101_000000" / "members.json").write_text("{}")
    (backup_dir / "notes.txt").write_text("keep me")

    assert [b.id for b in await store.prune_backups(keep=3, dry_run=True)] == ids[:2]
    assert [b.id for b in await store.list_backups()] == ids
    removed = await store.prune_backups(keep=3)
    assert [b.id for b in removed] == ids[:2]
    assert [b.id for b in await store.list_backups()] == ids[2:]

    newest = await store.create_backup(keep=2)
    assert [b.id for b in await store.list_backups()] == [ids[4], newest.id]
    assert await store.prune_backups(keep_days=1) == []  # all younger than a day
    future = datetime.now(timezone.utc) + timedelta(days=10)
    assert [b.id for b in prune_backup_dir(backup_dir, None, 5, now=future, source=store_source(store.config))] \
        == [ids[4]]
    assert [b.id for b in await store.list_backups()] == [newest.id]
    assert (backup_dir / "20000101_000000" / "members.json").exists() and (backup_dir / "notes.txt").exists()
    assert "manifest.json is missing" in verify_backup_dir(backup_dir, "20000101_000000").problems[0]

    # STORAGE_BACKUP_KEEP / config.backup_keep applies to every create_backup
    await store.close()
    async with storage.open_store(config=dataclasses.replace(store_config, backup_keep=2)) as kept:
        for _ in range(3):
            last = await kept.create_backup()
        assert [b.id for b in await kept.list_backups()][-1] == last.id
        assert len(await kept.list_backups()) == 2


async def test_bad_retention_arguments_fail_before_any_work(store):
    await store.put("c", "k", {"v": 1})
    first = await store.create_backup()
    with pytest.raises(ValidationError):
        await store.create_backup(keep=0)
    with pytest.raises(ValidationError):
        await store.create_backup(keep_days=-1)
    assert [b.id for b in await store.list_backups()] == [first.id]  # no backup was written, none pruned


# -------------------------------------------------------------------------------------------------------------------
# crash safety
CRASHING_BACKUP = r"""
import asyncio, json, sys, time
import storage
from storage.progress import Progress

class Slow(Progress):
    n = 0
    def advance(self, n=1):
        self.n += n
        if n:
            print(f"P {self.n}", flush=True)
            time.sleep(0.01)

async def main():
    store = await storage.open_store(config=storage.StoreConfig(**json.loads(sys.argv[1])))
    await store.create_backup(progress=Slow())
    print("DONE", flush=True)
asyncio.run(main())
"""


async def test_kill_9_mid_backup_never_leaves_a_complete_looking_backup(store, store_config):
    await store.put_many("big", {f"k{i:06d}": {"i": i, "pad": "p" * 300} for i in range(12_000)})
    backup_dir = Path(store_config.backup_dir)
    config = json.dumps(dataclasses.asdict(store_config))
    # kill after the first progress report, in the middle, and right after the walk (fsync/manifest/rename)
    for kill_after in (1, 6, 12):
        child = subprocess.Popen([sys.executable, "-c", CRASHING_BACKUP, config], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = 0
        while lines < kill_after:
            line = await asyncio.to_thread(child.stdout.readline)  # type: ignore[union-attr]
            assert line, "the child ended early"
            if line == "DONE\n":
                break
            lines += 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        # Invariant: whatever looks like a backup (a folder under a backup id) verifies completely.
        for entry in os.listdir(backup_dir):
            if not entry.startswith("."):
                assert verify_backup_dir(backup_dir, entry).ok, entry
    assert any(name.startswith(".") for name in os.listdir(backup_dir))  # the killed runs left temp folders
    for backup in await store.list_backups():
        assert (await store.verify_backup(backup.id)).ok
    info = await store.create_backup()  # works, and sweeps the temp folders of dead processes
    assert [n for n in os.listdir(backup_dir) if n.startswith(".")] == []
    assert info.counts["big"] == 12_000 and (await store.verify_backup(info.id)).ok


# -------------------------------------------------------------------------------------------------------------------
# copy
async def test_copy_moves_everything_and_verifies(store, json_twin):
    await populate(store)
    report = await copy(store, json_twin, batch_size=7)
    assert await snapshot(json_twin) == await snapshot(store)
    assert report.counts == {name: await store.count(name) for name in await store.collections()}
    assert report.counts["_migrations"] == 3  # the migration ledger travels like any collection
    assert report.messages == (60 if has_messages(store) else None)


async def test_copy_refuses_a_non_empty_target_unless_told(store, json_twin):
    await populate(store)
    await json_twin.put("notes", "precious", {"keep": "me"})
    target_state = await snapshot(json_twin)
    with pytest.raises(TargetNotEmptyError, match="already holds data"):
        await copy(store, json_twin)
    assert await snapshot(json_twin) == target_state  # nothing was written
    assert isinstance(TargetNotEmptyError("x"), storage.DatabaseError)

    await json_twin.put("only_in_target", "k", {"v": 1})
    report = await copy(store, json_twin, overwrite=True)
    assert report.deleted == 2
    assert await snapshot(json_twin) == await snapshot(store)  # an exact replica

    with pytest.raises(ValidationError, match="same store"):
        await copy(store, store)


async def test_copy_rejects_bad_batch_sizes(store, json_twin):
    for bad in (0, -5, 1.5, "10"):
        with pytest.raises(ValidationError):
            await copy(store, json_twin, batch_size=bad)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------------------
# across backends
async def test_json_and_postgres_round_trip_through_backups_and_copies(store, other_backend, tmp_path):
    """A -> B by restoring A's backup into B, B -> A' by copy: identical data, identical content digests."""
    await populate(store)
    original = await snapshot(store)
    info = await store.create_backup()

    report = await other_backend.restore_backup(info.id)
    assert report.safety_backup is not None
    assert await snapshot(other_backend) == original
    back = await other_backend.create_backup()
    assert back.backend == other_backend.backend_name
    assert back.digests == info.digests and back.counts == info.counts and back.messages == info.messages

    if store.backend_name == "json":  # B -> a fresh JSON store
        async with storage.open_store(config=json_config(tmp_path / "again", tmp_path / "b2")) as again:
            copied = await copy(other_backend, again)
            assert await snapshot(again) == original
    else:  # B -> the original PostgreSQL store, changed meanwhile: overwrite makes it the original again
        await store.put("members", f"{GUILD}_1001", {"changed": True})
        await store.put("extra", "k", {"v": 1})
        copied = await copy(other_backend, store, overwrite=True)
        assert copied.deleted == 1
        assert await snapshot(store) == original
    assert copied.digests == info.digests


# -------------------------------------------------------------------------------------------------------------------
# command line
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_PUBLIC_URL", "DATABASE_URL", "PGHOST", "DB_HOST", "STORAGE_BACKEND",
                        "STORAGE_PATH", "STORAGE_BACKUP_DIR", "STORAGE_BACKUP_KEEP")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, timeout=240,
                          cwd=ROOT, env=env)


def store_args(config: StoreConfig) -> list[str]:
    where = ["--path", config.path] if config.backend == "json" else ["--dsn", str(config.dsn)]
    return [*where, "--backup-dir", config.backup_dir]


async def test_command_line(store, store_config, tmp_path):
    await populate(store)
    await store.close()
    where = store_args(store_config)

    created = await asyncio.to_thread(run_cli, "backup", "create", "--label", "cli", *where)
    assert created.returncode == 0, created.stderr
    backup_id = created.stdout.split()[1]
    assert "created and verified" in created.stdout and "members" in created.stdout
    assert "backup: documents" in created.stderr  # plain progress lines (stderr is not a terminal here)

    listed = await asyncio.to_thread(run_cli, "backup", "list", *where)
    assert backup_id in listed.stdout and "cli" in listed.stdout

    verified = await asyncio.to_thread(run_cli, "backup", "verify", *where)
    assert verified.returncode == 0 and f"{backup_id}: OK" in verified.stdout

    dry = await asyncio.to_thread(run_cli, "restore", backup_id, "--dry-run", *where)
    assert dry.returncode == 0 and "0 document(s) would change" in dry.stdout, dry.stdout + dry.stderr

    target = tmp_path / "copied"
    source = store_config.path if store_config.backend == "json" else str(store_config.dsn)
    copied = await asyncio.to_thread(run_cli, "copy", "--from", source, "--to", str(target))
    assert copied.returncode == 0 and "content digests verified" in copied.stdout, copied.stderr
    again = await asyncio.to_thread(run_cli, "copy", "--from", source, "--to", str(target))
    assert again.returncode == 1 and "already holds data" in again.stderr

    into = await asyncio.to_thread(run_cli, "restore", backup_id, "--into", str(tmp_path / "restored"),
                                   "--backup-dir", store_config.backup_dir)
    assert into.returncode == 0 and "restored backup" in into.stdout, into.stderr

    # the restore --into made a safety backup of the *other* store in this folder: it does not count here
    await asyncio.to_thread(run_cli, "backup", "create", *where)
    pruned = await asyncio.to_thread(run_cli, "backup", "prune", "--keep", "2", *where)
    assert pruned.returncode == 0 and "removed 0 backup(s)" in pruned.stdout, pruned.stdout
    await asyncio.to_thread(run_cli, "backup", "create", *where)
    pruned = await asyncio.to_thread(run_cli, "backup", "prune", "--keep", "2", *where)
    assert pruned.returncode == 0 and "removed 1 backup(s)" in pruned.stdout
    listed = await asyncio.to_thread(run_cli, "backup", "list", *where)
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == sorted(
        [line.split()[0] for line in listed.stdout.splitlines()[1:]], key=backup_sort_key)
    assert backup_id not in [line.split()[0] for line in listed.stdout.splitlines()]

    newest = (await asyncio.to_thread(run_cli, "backup", "list", *where)).stdout.splitlines()[-1].split()[0]
    flip_byte(Path(store_config.backup_dir) / newest / "collections" / "members.jsonl.gz")
    broken = await asyncio.to_thread(run_cli, "backup", "verify", *where)
    assert broken.returncode == 1 and "FAILED" in broken.stdout and "members.jsonl.gz" in broken.stdout

    bad = await asyncio.to_thread(run_cli, "restore", "../../etc", *where)
    assert bad.returncode == 1 and "not a backup id" in bad.stderr


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from storage.progress import TerminalProgress

    tty = io.StringIO()
    bar = TerminalProgress(tty, tty=True)
    bar.phase("backup: documents", 2000)
    bar.advance(1000)
    bar.done()
    assert "\r" in tty.getvalue() and "[###############---------------]  50% 1000/2000" in tty.getvalue()
    assert tty.getvalue().endswith("\n")

    log = io.StringIO()
    plain = TerminalProgress(log, tty=False, interval=0)
    plain.phase("copy: documents", 10)
    plain.advance(4)
    plain.advance(6)
    plain.done()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "copy: documents (10 records)..."
    assert lines[1].startswith("  copy: documents: 4/10 records")
    assert lines[-1].startswith("  copy: documents: 10 records in ")


async def test_a_malformed_manifest_is_reported_not_crashed_on(store):
    """A manifest with a valid checksum but nonsense inside (written by something else) is a clear problem."""
    await store.put("c", "k", {"v": 1})
    info = await store.create_backup()
    original = read_manifest(info.path)
    for bad in ({"source": "not a mapping"}, {"collections": {"../evil": {"file": "collections/../evil.jsonl",
                                                                         "count": 1, "bytes": 1, "sha256": "x"}}},
                {"collections": {"c": {"file": "manifest.json", "count": 1, "bytes": 1, "sha256": "x"}}},
                {"messages": {"file": "/etc/passwd", "count": 1, "bytes": 1, "sha256": "x"}}):
        manifest = {**original, **bad}
        del manifest["checksum"]
        (info.path / MANIFEST_NAME).unlink()
        write_manifest(info.path, manifest)
        report = await store.verify_backup(info.id)
        assert not report.ok and report.problems[0].startswith(("manifest", "messages point at")), report.problems
        with pytest.raises(BackupError):
            await store.restore_backup(info.id)
        assert await store.list_backups() == []
    assert await store.get("c", "k") == {"v": 1}


# -------------------------------------------------------------------------------------------------------------------
# sources: retention per store (issue 12)
async def test_manifest_records_the_source_store_and_never_a_password(store_config, tmp_path):
    config = store_config
    if config.backend == "postgres":  # trust auth accepts any password: the DSN carries one all the same
        config = dataclasses.replace(config, dsn=str(config.dsn).replace("postgresql://postgres@",
                                                                         "postgresql://postgres:S3cret%23PW@"))
        assert "S3cret" in str(config.dsn)
    async with storage.open_store(config=config) as store:
        await store.put("c", "k", {"v": 1})
        info = await store.create_backup()  # type: ignore[attr-defined]
    manifest = read_manifest(info.path)
    expected = store_source(config)
    assert manifest["source"]["store"] == expected == info.source
    if config.backend == "json":
        assert expected == {"backend": "json", "path": os.path.realpath(config.path)}
    else:
        assert set(expected) == {"backend", "host", "port", "database", "search_path"}
        target = urlsplit(str(config.dsn))
        assert expected["host"] == target.hostname and expected["port"] == str(target.port or 5432)
    for path in info.path.rglob("*"):
        if path.is_file():
            assert b"S3cret" not in path.read_bytes(), path
    listed = await asyncio.to_thread(run_cli, "backup", "list", "--backup-dir", config.backup_dir)
    assert describe_source(expected) in listed.stdout and "S3cret" not in listed.stdout


async def test_retention_prunes_only_the_same_stores_backups(store, store_config, tmp_path):
    """The typo case: an empty store (another folder) backed up into the same folder with --keep 1."""
    await populate(store)
    ours = [(await store.create_backup()).id for _ in range(3)]
    typo = json_config(tmp_path / "reall", store_config.backup_dir)
    async with storage.open_store(config=typo) as empty:
        theirs = [(await empty.create_backup(keep=1)).id for _ in range(3)]  # type: ignore[attr-defined]
        assert [b.id for b in await empty.list_backups()] == ours + theirs[-1:]  # type: ignore[attr-defined]
    # and the other way round: our retention never touches their backup
    newest = await store.create_backup(keep=2)
    assert [b.id for b in await store.list_backups()] == [ours[-1], theirs[-1], newest.id]
    where = store_args(store_config)
    listed = await asyncio.to_thread(run_cli, "backup", "list", *where)
    assert listed.returncode == 0
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert describe_source(store_source(typo)) in lines[theirs[-1]]
    assert describe_source(store_source(store_config)) in lines[newest.id]
    pruned = await asyncio.to_thread(run_cli, "backup", "prune", "--keep", "1", *where)
    assert pruned.returncode == 0 and f"removed 1 backup(s) of {describe_source(store_source(store_config))}" \
        in pruned.stdout, pruned.stdout
    assert [b.id for b in await store.list_backups()] == [theirs[-1], newest.id]


async def test_an_emptied_store_never_prunes_its_last_backup_holding_data(store):
    await store.put("c", "k", {"v": 1})
    with_data = await store.create_backup()
    await store.delete("c", "k")
    for _ in range(3):
        last = await store.create_backup(keep=1)
    assert [b.id for b in await store.list_backups()] == [with_data.id, last.id]


async def test_old_manifests_derive_their_source_or_are_never_pruned(store, store_config):
    await store.put("c", "k", {"v": 1})
    old, unknown, *_ = [await store.create_backup() for _ in range(4)]
    for info, strip in ((old, "store"), (unknown, "source")):
        manifest = read_manifest(info.path)
        if strip == "store":
            del manifest["source"]["store"]  # as written before the field existed: location only
        else:
            del manifest["source"]
        del manifest["checksum"]
        (info.path / MANIFEST_NAME).unlink()
        write_manifest(info.path, manifest)
    infos = {b.id: b for b in await store.list_backups()}
    assert infos[old.id].source == store_source(store_config)  # derived from the old "location"
    assert infos[unknown.id].source is None
    await store.prune_backups(keep=1)
    assert [b.id for b in await store.list_backups()][:1] == [unknown.id] and len(await store.list_backups()) == 2
    listed = await asyncio.to_thread(run_cli, "backup", "list", *store_args(store_config))
    assert "unknown" in next(line for line in listed.stdout.splitlines() if line.startswith(unknown.id))


async def test_open_store_with_explicit_arguments_follows_STORAGE_BACKUP_DIR(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORAGE_BACKUP_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("STORAGE_BACKUP_KEEP", "2")
    async with storage.open_store(backend="json", path=tmp_path / "data") as store:
        await store.put("c", "k", {"v": 1})
        info = await store.create_backup()  # type: ignore[attr-defined]
        assert store.config.backup_keep == 2
    assert info.path.parent == tmp_path / "elsewhere" and not (tmp_path / "backups").exists()
    async with storage.open_store(backend="json", path=tmp_path / "data", backup_dir=str(tmp_path / "b2")) as s2:
        assert s2.config.backup_dir == str(tmp_path / "b2")  # an explicit option still wins


async def test_postgres_backups_say_where_they_go(store, store_config):
    if store_config.backend != "postgres":
        pytest.skip("the note is about PostgreSQL stores")
    await store.put("c", "k", {"v": 1})
    created = await asyncio.to_thread(run_cli, "backup", "create", *store_args(store_config))
    assert created.returncode == 0, created.stderr
    assert "local folder" in created.stdout and "ephemeral" in created.stdout


def test_large_collections_are_written_in_key_order():
    """The backup file is in key order (diffable); the keys are sorted in runs merged in Python (see _sorted_keys)."""
    import random

    from storage.backup.operations import _sorted_keys

    keys = [f"{random.randrange(10**12)}_{i}" for i in range(30_000)]
    assert _sorted_keys(keys) == sorted(keys)
    assert _sorted_keys(keys[:10]) == sorted(keys[:10]) and _sorted_keys([]) == []


def test_trimmed_copies_hold_only_their_own_size() -> None:
    """``trimmed`` (what backups and copies keep of each encoded document or message): equal bytes in an
    allocation of their own size. orjson's ``dumps`` result keeps a ~4 KB buffer whatever its length, so 1,000
    kept results of 200-byte documents hold ~4 MB; their trimmed copies ~0.3 MB."""
    import tracemalloc

    docs = [{"n": i, "text": "x" * 180} for i in range(1000)]
    tracemalloc.start()
    try:
        raw = [orjson.dumps(doc) for doc in docs]
        raw_bytes = tracemalloc.get_traced_memory()[0]
        kept = [trimmed(line) for line in raw]
        del raw
        kept_bytes = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept == [orjson.dumps(doc) for doc in docs]
    assert kept_bytes < 1000 * 400 < raw_bytes, (kept_bytes, raw_bytes)
    one = orjson.dumps(docs[0])
    assert trimmed(one) == one and trimmed(one) is not one
