"""The JSON backend under interruptions and damage (issue 11): cancellation at every await point of a commit, a
compaction and close; journal records that name paths; folders where files should be; read-only opens; files
changed behind the store's back.

Cancellation tests loop over the point at which the task is cancelled (event-loop turns after it started), not one
sample: each point must end with every acknowledged write on disk and the process's view equal to the disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from storage import (
    CorruptDataError,
    ExternalChangeError,
    ReadOnlyError,
    StoreConfig,
    TransactionError,
)
from storage.backends.json.snapshot import render_collection
from storage.backends.json.store import JOURNAL_NAME, LOCK_NAME
from storage.stores import JsonStore

from .test_json_files import write_like_the_seed


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "config"
    path.mkdir()
    return path


def cfg(folder: Path, **extra: object) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=30, source="tests", **extra)  # type: ignore[arg-type]


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def append_by_hand(folder: Path, data: bytes) -> None:
    """Append to the journal as damage or a crash would: the store never published these bytes as committed, so
    the lock file's committed end is removed too (as after a reboot), or they would be dropped as unacknowledged."""
    with open(folder / JOURNAL_NAME, "ab") as f:
        f.write(data)
    (folder / LOCK_NAME).unlink()


async def cancel_at(task: asyncio.Task[object], point: int) -> None:
    """Cancel ``task`` after ``point`` event-loop turns and wait for it to end, however it ends."""
    await turns(point)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def disk_view(folder: Path, collection: str) -> dict[str, dict]:
    """What a fresh process would read: a new store on the folder (closed without writing: read-only)."""
    async with storage.open_store(config=cfg(folder, read_only=True)) as other:
        return {k: d async for k, d in other.items(collection)}


# -- item 1: cancellation never releases the lock under running work, never leaves memory != disk ----------------------
@pytest.mark.parametrize("point", range(0, 24, 2))
async def test_cancelled_compaction_keeps_the_lock_until_it_is_done(folder, point):
    """A second store's commit made while the first one's cancelled compaction thread ran is never lost."""
    first = await JsonStore.open(cfg(folder))
    second = await JsonStore.open(cfg(folder))
    try:
        await first.put_many("bulk", {f"k{i}": {"i": i, "pad": "x" * 300} for i in range(3000)})
        task = asyncio.create_task(first.compact())
        await turns(point)
        task.cancel()
        await second.put("bulk", "late", {"written": "while the compaction was being cancelled"})
        with pytest.raises(asyncio.CancelledError):
            await task
        await first.put("bulk", "after", {"ok": True})
    finally:
        await first.close()
        await second.close()
    on_disk = await disk_view(folder, "bulk")
    assert on_disk["late"] == {"written": "while the compaction was being cancelled"}
    assert on_disk["after"] == {"ok": True}
    assert len(on_disk) == 3002


@pytest.mark.parametrize("point", range(1, 21, 2))
async def test_cancelled_close_finishes_its_compaction_before_releasing_the_files(folder, point):
    store = await JsonStore.open(cfg(folder))
    await store.put_many("bulk", {f"k{i}": {"i": i, "pad": "y" * 300} for i in range(3000)})
    task = asyncio.create_task(store.close())
    await cancel_at(task, point)
    assert store.closed
    other = await JsonStore.open(cfg(folder))  # the lock was given back: opening does not wait 30 s
    try:
        await other.put("bulk", "next", {"n": 1})
        assert await other.count("bulk") == 3001
    finally:
        await other.close()
    assert len(await disk_view(folder, "bulk")) == 3001


@pytest.mark.parametrize("point", range(0, 12))
async def test_a_transaction_cancelled_during_its_fsync_is_applied_iff_it_is_durable(folder, point):
    """The commit's fsync runs in a worker thread here (as on a slow disk); cancelling the transaction at any
    turn leaves this process's view equal to the disk, and a later update() builds on what is on disk."""
    store = await JsonStore.open(cfg(folder))
    try:
        await store.put("acct", "a", {"n": 0})
        store._sync_estimate = 1.0  # take the threaded append path (what a slow fsync makes the store do)

        async def transfer() -> None:
            async with store.transaction() as tx:
                await tx.put("acct", "a", {"n": 100})

        task = asyncio.create_task(transfer())
        await cancel_at(task, point)
        mine = await store.get("acct", "a")
        assert mine == (await disk_view(folder, "acct"))["a"]
        await store.update("acct", "a", lambda d: {"n": d["n"] + 1})
        assert (await disk_view(folder, "acct"))["a"] == {"n": mine["n"] + 1}
    finally:
        await store.close()


@pytest.mark.parametrize("writers", [1, 8], ids=["lone", "group"])
@pytest.mark.parametrize("point", range(0, 10))
async def test_cancelled_group_commit_writers_see_durable_or_nothing(folder, point, writers):
    """A lone writer commits in its own task (no leader task), concurrent ones as a group: cancelling either at
    any loop turn of a threaded append leaves memory equal to the disk, every acknowledged write on it, and the
    store usable."""
    store = await JsonStore.open(cfg(folder))
    store._sync_estimate = 1.0
    try:
        tasks = [asyncio.create_task(store.put("w", f"k{i}", {"i": i})) for i in range(writers)]
        await turns(point)
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        acknowledged = {f"k{i}" for i, r in enumerate(results) if r is None}
        mine = {k: d async for k, d in store.items("w")}
        on_disk = await disk_view(folder, "w")
        assert mine == on_disk
        assert acknowledged <= set(on_disk)
        await store.put("w", "after", {"ok": True})  # the lock and the commit path were given back
        assert (await disk_view(folder, "w"))["after"] == {"ok": True}
    finally:
        await store.close()


# -- item 5: no deadlock for the seed's batch call inside a transaction ----------------------------------------------
async def test_batch_update_members_inside_a_transaction_raises_instead_of_deadlocking(store):
    update = {"user_id": "1", "guild_id": "2", "data": {"roles": []}}
    async with store.transaction() as tx:
        with pytest.raises(TransactionError):
            await asyncio.wait_for(store.batch_update_members([update]), 10)
        await tx.put("other", "x", {"ok": 1})
    assert await store.get("other", "x") == {"ok": 1}
    assert await store.get_member_data(1, 2) == {}


async def test_batch_update_members_after_close_raises_store_closed(store_config):
    store = await storage.open_store(config=store_config)
    await store.close()
    with pytest.raises(storage.StoreClosedError):
        await store.batch_update_members([{"user_id": "1", "guild_id": "2", "data": {}}])


# -- item 10: everything read from disk is checked like user input --------------------------------------------------
@pytest.mark.parametrize("collection", ["../../evil", "/etc/passwd", "a/b", ".hidden", "x.json", ""])
async def test_a_journal_record_naming_a_path_is_damage_not_a_file_to_write(folder, collection):
    async with storage.open_store(config=cfg(folder)) as store:
        await store.put("ok", "k", {"v": 1})
    journal = folder / JOURNAL_NAME
    append_by_hand(folder, json.dumps([["p", collection, "k", {"v": 2}]]).encode() + b"\n"
                   + json.dumps([["p", "ok", "k2", {"v": 3}]]).encode() + b"\n")
    before = journal.read_bytes()
    outside = sorted(p.name for p in folder.parent.iterdir())
    with pytest.raises(CorruptDataError) as info:
        await storage.open_store(config=cfg(folder))
    assert info.value.position is not None
    assert journal.read_bytes() == before  # left for a human
    assert sorted(p.name for p in folder.parent.iterdir()) == outside


async def test_a_last_journal_record_naming_a_path_is_not_dropped_as_torn(folder):
    async with storage.open_store(config=cfg(folder)) as store:
        await store.put("ok", "k", {"v": 1})
    append_by_hand(folder, json.dumps([["p", "../evil", "k", {"v": 2}]]).encode() + b"\n")
    with pytest.raises(CorruptDataError):
        await storage.open_store(config=cfg(folder))


# -- item 11: what stands where a collection file should be -----------------------------------------------------------
async def test_members_json_that_is_a_folder_is_damage(folder):
    (folder / "members.json").mkdir()
    with pytest.raises(CorruptDataError) as info:
        await storage.open_store(config=cfg(folder))
    assert "members.json" in str(info.value)
    assert (folder / "members.json").is_dir()


@pytest.mark.parametrize("content", [b"[1, 2, 3]", b'{"987654321_1": 5}', b'"text"'])
async def test_members_json_of_another_shape_is_damage(folder, content):
    (folder / "members.json").write_bytes(content)
    with pytest.raises(CorruptDataError):
        await storage.open_store(config=cfg(folder))
    assert (folder / "members.json").read_bytes() == content


async def test_another_folder_named_like_a_collection_is_refused_for_writes(folder):
    (folder / "notes.json").mkdir()
    async with storage.open_store(config=cfg(folder)) as store:
        with pytest.raises(storage.ValidationError):
            await store.put("notes", "k", {"v": 1})
        await store.put_many("other", {"a": {"v": 1}})
    assert (folder / "notes.json").is_dir()


async def test_a_symlinked_collection_file_is_followed_and_the_link_kept(folder, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    write_like_the_seed(volume, {"1_2": {"roles": ["a"]}})
    (folder / "members.json").symlink_to(volume / "members.json")
    async with storage.open_store(config=cfg(folder)) as store:
        assert await store.get_member_data(2, 1) == {"roles": ["a"]}
        await store.save_member_data(3, 1, {"roles": ["b"]})
        await store.compact()
        await store.save_member_data(4, 1, {"roles": ["c"]})
    assert (folder / "members.json").is_symlink()
    assert json.loads((volume / "members.json").read_bytes()) == {
        "1_2": {"roles": ["a"]}, "1_3": {"roles": ["b"]}, "1_4": {"roles": ["c"]}}
    assert not [p for p in volume.iterdir() if ".tmp-" in p.name]


# -- item 12: read-only opens ------------------------------------------------------------------------------------------
def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


async def test_read_only_open_serves_reads_refuses_writes_and_changes_nothing(folder):
    async with storage.open_store(config=cfg(folder)) as store:
        await store.put_many("settings", {"1": {"prefix": "!"}, "2": {"prefix": "?"}})
        await store.record_messages([{"message_id": "10", "guild_id": "1", "channel_id": "5", "author_id": "7",
                                      "timestamp": "2024-01-01T00:00:00Z"}])
    # an uncompacted change and a torn tail, as a crash leaves them: nothing to fix read-only
    append_by_hand(folder, json.dumps([["p", "settings", "3", {"prefix": "$"}]]).encode() + b"\n" + b'[["p","set')
    before = tree_digest(folder)
    async with storage.open_store(config=cfg(folder, read_only=True)) as ro:
        assert await ro.get("settings", "3") == {"prefix": "$"}
        assert await ro.count("settings") == 3
        assert await ro.message_counts(1) == 1
        for write in (ro.put("settings", "4", {}), ro.delete("settings", "1"),
                      ro.update("settings", "1", lambda d: d), ro.put_many("x", {"a": {}}),
                      ro.save_member_data(1, 2, {}), ro.batch_update_members([]),
                      ro.record_messages([]), ro.prune_messages("2030-01-01T00:00:00Z")):
            with pytest.raises(ReadOnlyError):
                await write
        async with ro.transaction() as tx:  # a consistent view (backups and copies read through one)
            assert await tx.count("settings") == 3
            with pytest.raises(ReadOnlyError):
                await tx.put("settings", "5", {})
        with pytest.raises(ReadOnlyError):
            await ro.compact()
    assert tree_digest(folder) == before


async def test_read_only_open_takes_no_lock_and_sees_a_writers_commits(folder):
    writer = await storage.open_store(config=cfg(folder))
    try:
        await writer.put("s", "a", {"v": 1})
        async with writer.transaction() as tx:  # the writer holds the store lock for the whole block
            await tx.put("s", "b", {"v": 2})
            ro = await asyncio.wait_for(storage.open_store(config=cfg(folder, read_only=True)), 10)
            assert await ro.get("s", "a") == {"v": 1}
            assert await ro.get("s", "b") is None  # not committed yet
        assert await ro.get("s", "b") == {"v": 2}
        await writer.compact()
        await writer.put("s", "c", {"v": 3})
        assert {k async for k, _ in ro.items("s")} == {"a", "b", "c"}
        await ro.close()
    finally:
        await writer.close()


async def test_read_only_open_of_a_missing_folder_creates_nothing(tmp_path):
    with pytest.raises(storage.DatabaseError):
        await storage.open_store(config=cfg(tmp_path / "typo", read_only=True))
    assert not (tmp_path / "typo").exists()


def test_read_only_open_works_on_a_read_only_mount(folder, tmp_path):
    """A mounted backup or a snapshot: the folder itself cannot be written."""
    asyncio.run(_fill(folder))
    mount = tmp_path / "ro"
    mount.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(folder), str(mount)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot bind-mount here: {exc}")
    try:
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.decode()}")
        code = ("import asyncio, storage\n"
                "async def main():\n"
                f"    async with storage.open_store(backend='json', path={str(mount)!r}, read_only=True) as s:\n"
                "        print(await s.count('s'), (await s.get('s', 'k1'))['v'])\n"
                "asyncio.run(main())\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["50", "1"]
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


async def _fill(folder: Path) -> None:
    async with storage.open_store(config=cfg(folder)) as store:
        await store.put_many("s", {f"k{i}": {"v": i} for i in range(50)})


# -- snapshots changed behind the store's back ------------------------------------------------------------------------
async def test_an_edit_while_the_store_is_closed_is_picked_up(folder):
    async with storage.open_store(config=cfg(folder)) as store:
        await store.save_member_data(1, 2, {"roles": ["a"]})
    data = json.loads((folder / "members.json").read_text())
    data["2_9"] = {"roles": ["edited by hand"]}
    write_like_the_seed(folder, data)
    async with storage.open_store(config=cfg(folder)) as store:
        assert await store.get_member_data(9, 2) == {"roles": ["edited by hand"]}
        await store.save_member_data(10, 2, {"roles": []})
    assert set(json.loads((folder / "members.json").read_text())) == {"2_1", "2_9", "2_10"}


async def test_an_edit_while_the_store_is_open_is_never_overwritten(folder):
    store = await storage.open_store(config=cfg(folder))
    await store.save_member_data(1, 2, {"roles": ["a"]})
    await store.compact()
    await store.save_member_data(1, 2, {"roles": ["b"]})  # in the journal only
    write_like_the_seed(folder, {"2_1": {"roles": ["the seed's code wrote this"]}})
    edited = (folder / "members.json").read_bytes()
    with pytest.raises(ExternalChangeError) as info:
        await store.compact()
    assert "members.json" in str(info.value)
    assert (folder / "members.json").read_bytes() == edited
    with pytest.raises(ExternalChangeError):
        await store.close()  # its compaction refuses too; the journal keeps the store's write
    assert (folder / "members.json").read_bytes() == edited
    with pytest.raises(ExternalChangeError):  # and the next open does not silently replay over the edit
        await storage.open_store(config=cfg(folder))
    assert (folder / "members.json").read_bytes() == edited


async def test_a_seed_file_edited_before_its_first_compaction_is_protected(folder):
    write_like_the_seed(folder, {"2_1": {"roles": ["seed"]}})
    store = await storage.open_store(config=cfg(folder))
    await store.save_member_data(1, 2, {"roles": ["store"]})
    write_like_the_seed(folder, {"2_1": {"roles": ["seed, edited"]}})
    with pytest.raises(ExternalChangeError):
        await store.close()
    assert json.loads((folder / "members.json").read_text()) == {"2_1": {"roles": ["seed, edited"]}}


async def test_a_crash_between_snapshot_rewrite_and_new_journal_is_not_an_external_change(folder):
    store = await JsonStore.open(cfg(folder))
    await store.save_member_data(1, 2, {"roles": ["a"]})
    await store.compact()
    await store.save_member_data(1, 2, {"roles": ["b"]})
    await store.save_member_data(3, 2, {"roles": ["c"]})
    # what compaction writes first, then "crash" before the new journal: the files stay as they are
    (folder / "members.json").write_bytes(render_collection(store._tables.data["members"]))
    store._journal.close()
    store._flock.close()
    store._closed = True
    async with storage.open_store(config=cfg(folder)) as again:
        assert await again.get_member_data(1, 2) == {"roles": ["b"]}
        assert await again.get_member_data(3, 2) == {"roles": ["c"]}


async def edited_while_open(folder: Path) -> None:
    """members.json written by hand while the journal holds a newer value of one of its members: the close
    refuses to overwrite it, and the conflict is left for the next open."""
    store = await storage.open_store(config=cfg(folder))
    await store.save_member_data(1, 2, {"roles": ["a"]})
    await store.compact()
    await store.save_member_data(1, 2, {"roles": ["store"]})
    write_like_the_seed(folder, {"2_1": {"roles": ["edit"]}, "2_5": {"roles": ["added by hand"]}})
    with pytest.raises(ExternalChangeError):
        await store.close()


async def test_merge_external_keeps_the_edit_and_the_journals_newer_values(folder):
    await edited_while_open(folder)
    with pytest.raises(ExternalChangeError):
        await JsonStore.open(cfg(folder))
    merged = await JsonStore.open(cfg(folder), merge_external=True)
    await merged.close()
    assert json.loads((folder / "members.json").read_text()) == {
        "2_1": {"roles": ["store"]}, "2_5": {"roles": ["added by hand"]}}
    async with storage.open_store(config=cfg(folder)) as again:
        assert await again.get_member_data(5, 2) == {"roles": ["added by hand"]}


def test_the_cli_reports_an_external_change_and_merges_it_when_asked(folder):
    asyncio.run(edited_while_open(folder))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("DATABASE_URL", None)
    env.pop("DATABASE_PUBLIC_URL", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "storage", *args, "--path", str(folder)],
                              capture_output=True, text=True, env=env, timeout=60)

    checked = cli("check")
    assert checked.returncode == 1 and "members.json" in checked.stdout + checked.stderr
    refused = cli("compact")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--merge-external" in refused.stdout + refused.stderr
    merged = cli("compact", "--merge-external")
    assert merged.returncode == 0, merged.stderr
    assert json.loads((folder / "members.json").read_text()) == {
        "2_1": {"roles": ["store"]}, "2_5": {"roles": ["added by hand"]}}
    assert cli("check").returncode == 0


async def test_a_reader_that_slept_through_two_compactions_reloads(folder):
    """The newest journal's previous_end speaks of the file in between, not of the one the reader still has."""
    writer = await JsonStore.open(cfg(folder))
    reader = await JsonStore.open(cfg(folder))
    try:
        await writer.put_many("s", {f"k{i}": {"i": i, "pad": "p" * 100} for i in range(50)})
        assert await reader.count("s") == 50
        for round_ in range(3):  # the reader's journal ends with the first compaction's mark
            await writer.compact()
            await writer.put_many("s", {f"r{round_}-{i}": {"i": i, "pad": "q" * 200} for i in range(80)})
        assert await reader.count("s") == 50 + 3 * 80
        assert await reader.get("s", "r2-79") == {"i": 79, "pad": "q" * 200}
    finally:
        await writer.close()
        await reader.close()


def test_backup_create_and_copy_from_never_change_the_source(folder, tmp_path):
    """Both open the source read-only: a crashed bot's pending journal is not compacted, nothing is cut or locked."""
    async def crashed_bot() -> None:
        store = await JsonStore.open(cfg(folder))
        await store.put_many("settings", {f"g{i}": {"prefix": "!"} for i in range(20)})
        await store.save_member_data(1, 2, {"roles": ["a"]})
        store._journal.close()  # the process dies: no close(), no compaction
        store._flock.close()
        store._closed = True

    asyncio.run(crashed_bot())
    before = tree_digest(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, env=env,
                              timeout=120, cwd=tmp_path)

    made = cli("backup", "create", "--path", str(folder), "--backup-dir", str(tmp_path / "bk"))
    assert made.returncode == 0, made.stdout + made.stderr
    copied = cli("copy", "--from", str(folder), "--to", str(tmp_path / "copy"))
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert tree_digest(folder) == before

    async def check_copy() -> None:
        async with storage.open_store(config=cfg(tmp_path / "copy")) as target:
            assert await target.count("settings") == 20
            assert await target.get_member_data(1, 2) == {"roles": ["a"]}

    asyncio.run(check_copy())
