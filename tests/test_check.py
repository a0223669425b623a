"""``python -m storage check`` finds every kind of damage and changes nothing (issue 12): a corrupt line in the
middle of a message log, of the journal, a damaged migration ledger entry; a torn last line is only a note. Run as a
user would, in a subprocess, on real folders and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import storage
from storage.migrations.ledger import LEDGER

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, timeout=240,
                          env=env)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime: ``check`` must leave all of them as they were."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "storage.lock"}


def record(i: int, month: str = "2024-03") -> dict[str, object]:
    return {"message_id": str(1_000_000 + i), "guild_id": "100", "channel_id": "200", "author_id": str(300 + i % 3),
            "timestamp": f"{month}-0{1 + i % 9}T12:00:00Z", "content_length": 5,
            "analysis": {"sentiment": "positive", "topics": ["gaming"]}}


async def make_store(path: Path) -> None:
    async with storage.open_store(backend="json", path=path) as store:
        await store.save_member_data("11", "100", {"roles": ["member"]})
        await store.record_messages([record(i) for i in range(50)])
        await store.record_messages([record(i, "2024-04") for i in range(50, 60)])


def damage_line(path: Path, number: int) -> int:
    """Garble line ``number`` of ``path`` in place (same length); returns its byte offset."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    offset = sum(len(line) + 1 for line in lines[:number])
    lines[number] = b"#" * len(lines[number])
    path.write_bytes(b"\n".join(lines))
    return offset


async def test_a_corrupt_line_in_the_middle_of_a_message_log_fails_check(tmp_path: Path):
    data = tmp_path / "data"
    await make_store(data)
    clean = await asyncio.to_thread(run, "check", "--path", str(data))
    assert clean.returncode == 0 and "60 messages readable" in clean.stdout, clean.stdout + clean.stderr

    month = data / "messages" / "100" / "2024-03.jsonl"
    offset = damage_line(month, 20)
    before = snapshot(data)
    result = await asyncio.to_thread(run, "check", "--path", str(data))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{month}: corrupt message line at byte {offset}" in result.stdout, result.stdout
    assert snapshot(data) == before


async def test_a_torn_last_message_line_is_a_note_not_damage(tmp_path: Path):
    data = tmp_path / "data"
    await make_store(data)
    month = data / "messages" / "100" / "2024-04.jsonl"
    size = month.stat().st_size
    with open(month, "ab") as f:
        f.write(b'{"message_id":"99')  # a crash mid-append: never acknowledged
    before = snapshot(data)
    result = await asyncio.to_thread(run, "check", "--path", str(data))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{month}: incomplete last line at byte {size}" in result.stdout
    assert snapshot(data) == before


async def test_a_corrupt_journal_line_fails_check_with_its_position(tmp_path: Path):
    live, copy = tmp_path / "live", tmp_path / "copy"
    store = await storage.open_store(backend="json", path=live)
    try:
        for i in range(4):
            await store.put("settings", str(i), {"prefix": "!" * (i + 1)})
        shutil.copytree(live, copy)  # the folder as a crash would leave it: snapshots + a 5-line journal
    finally:
        await store.close()
    offset = damage_line(copy / "storage.journal", 2)
    before = snapshot(copy)
    result = await asyncio.to_thread(run, "check", "--path", str(copy))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "storage.journal" in result.stdout and f"byte {offset}" in result.stdout, result.stdout
    assert snapshot(copy) == before


async def test_a_damaged_migration_ledger_entry_fails_check(store_config: storage.StoreConfig):
    async with storage.open_store(config=store_config) as store:
        await store.put("members", "100_11", {"roles": []})
        await store.put(LEDGER, "1.1.0", {"version": "1.1.0", "applied_at": "yesterday", "seq": "one"})
    where = ["--path", store_config.path] if store_config.backend == "json" else ["--dsn", str(store_config.dsn)]
    result = await asyncio.to_thread(run, "check", *where)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"migration ledger: {LEDGER}/1.1.0" in result.stdout, result.stdout


async def test_check_reads_every_document_and_message_on_both_backends(store_config: storage.StoreConfig):
    async with storage.open_store(config=store_config) as store:
        await store.put_many("settings", {str(i): {"n": i} for i in range(7)})
        await store.record_messages([record(i) for i in range(12)])
    where = ["--path", store_config.path] if store_config.backend == "json" else ["--dsn", str(store_config.dsn)]
    result = await asyncio.to_thread(run, "check", *where)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 documents and 12 messages readable" in result.stdout, result.stdout


async def test_check_changes_nothing_not_even_a_pending_journal(tmp_path: Path):
    """A bot that crashed leaves a journal that the next writable open would fold into the snapshots: ``check``
    must not (before it was read-only, its close compacted)."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    store = await storage.open_store(backend="json", path=live)
    try:
        for i in range(5):
            await store.put("settings", str(i), {"prefix": "!" * (i + 1)})
        await store.record_messages([record(i) for i in range(5)])
        shutil.copytree(live, crashed)
    finally:
        await store.close()
    with open(crashed / "messages" / "100" / "2024-03.jsonl", "ab") as f:
        f.write(b'{"message_id":"77')  # and a torn append, which a writer would cut
    before, lock = snapshot(crashed), (crashed / "storage.lock").read_bytes()
    assert len([line for line in (crashed / "storage.journal").read_bytes().splitlines() if line]) == 6  # no filler
    result = await asyncio.to_thread(run, "check", "--path", str(crashed))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 documents and 5 messages readable" in result.stdout, result.stdout
    assert snapshot(crashed) == before
    assert (crashed / "storage.lock").read_bytes() == lock  # not even the lock file's state


async def test_a_member_the_rule_refuses_is_a_note_not_damage(store_config: storage.StoreConfig):
    """A member stored by an older version that did not check (storage/rules.py) reads as it is: noted, exit 0."""
    async with storage.open_store(config=store_config) as store:
        await store._put_stored("members", {"100_11": {"statistics": {"message_count": -3}}, "odd": {}})
        await store.save_member_data(12, 100, {"roles": []})
    where = ["--path", store_config.path] if store_config.backend == "json" else ["--dsn", str(store_config.dsn)]
    result = await asyncio.to_thread(run, "check", *where)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note: 2 document(s) of 'members' would be refused by its rule" in result.stdout, result.stdout
    assert "'100_11': statistics.message_count must be a non-negative integer" in result.stdout
