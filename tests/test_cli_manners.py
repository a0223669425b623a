"""The command line's manners (issue 12): a closed pipe ends it quietly, ``status`` shows what an operator needs
and hides internals, nothing to roll back is success, every subcommand's help says what it does in plain text,
``STORAGE_CACHE_TTL`` takes fractions, and ``copy --overwrite`` shows and reports its deletions in the words of
the interface used. Subprocesses on real folders and the real PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from storage import StoreConfig
from storage.backup.copy import TargetNotEmptyError, copy
from storage.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **(extra or {})}


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, timeout=240,
                          cwd=cwd or ROOT, env=environment(env))


def run_into_closed_pipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is already gone (what ``| head -1`` becomes after one line)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "storage", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=240, cwd=cwd, env=environment())
    finally:
        os.close(write)


def where(config: StoreConfig) -> list[str]:
    return ["--path", config.path] if config.backend == "json" else ["--dsn", str(config.dsn)]


def record(i: int, guild: str) -> dict[str, object]:
    return {"message_id": str(5_000_000 + i), "guild_id": guild, "channel_id": "200", "author_id": "300",
            "timestamp": f"2024-0{1 + i % 3}-1{i % 10}T08:00:00Z", "content_length": 5}


def test_a_closed_pipe_ends_status_and_backup_list_quietly(tmp_path: Path):
    data = tmp_path / "data"
    assert run("demo", "--members", "5", "--messages", "20", "--path", str(data)).returncode == 0
    assert run("backup", "create", "--path", str(data), "--backup-dir", str(tmp_path / "bk")).returncode == 0
    for args in (("status", "--path", str(data)), ("backup", "list", "--backup-dir", str(tmp_path / "bk"))):
        result = run_into_closed_pipe(*args, cwd=tmp_path)
        assert result.returncode == 141, (args, result.stderr)
        assert result.stderr == "", (args, result.stderr)


async def test_status_shows_what_an_operator_needs_and_hides_internals(store_config: StoreConfig, tmp_path: Path):
    async with storage.open_store(config=store_config) as store:
        await store.put_many("members", {f"100_{i}": {"roles": []} for i in range(4)})
        await store.record_messages([record(i, "100") for i in range(9)] + [record(100 + i, "101") for i in range(3)])
        backup = await store.create_backup()  # type: ignore[attr-defined]
    up = await asyncio.to_thread(run, "migrate", "up", "--no-backup", "--migrations", "examples.migrations",
                                 *where(store_config))
    assert up.returncode == 0, up.stderr
    result = await asyncio.to_thread(run, "status", *where(store_config),
                                     env={"STORAGE_BACKUP_DIR": store_config.backup_dir})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "members" in out and "4 documents" in out
    assert "_migration" not in out, out  # the ledger is an internal, not a collection of the bot
    assert "messages: 12 in 2 guild(s), oldest 2024-01-10T08:00:00Z, newest 2024-03-" in out, out
    assert f"last backup: {backup.id}" in out, out
    assert "migration version: 1.2.0 (2 applied)" in out, out
    if store_config.backend == "json":
        assert "journal: " in out


def test_migrate_down_with_nothing_applied_is_success(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "members.json").write_text("{}")
    result = run("migrate", "down", "--path", str(data), "--migrations", "examples.migrations")
    assert result.returncode == 0, result.stderr
    assert "nothing to roll back: no migration is applied" in result.stdout


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...],
                                                                                           argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.append(((*path, name), child))
                found += subcommands(child, (*path, name))
    return found


def test_every_subcommand_help_has_a_description_in_plain_text():
    commands = subcommands(build_parser())
    assert len(commands) >= 15
    for path, parser in commands:
        text = parser.format_help()
        assert parser.description, f"storage {' '.join(path)} --help has no description"
        assert "`" not in text, f"storage {' '.join(path)} --help: {text}"
    result = run("backup", "create", "--help")  # and as a user sees it
    assert result.returncode == 0 and "back up every collection" in result.stdout and "`" not in result.stdout


def test_storage_cache_ttl_takes_fractional_seconds(tmp_path: Path):
    assert StoreConfig.from_env({"STORAGE_CACHE_TTL": "2.5"}).cache_ttl == 2.5
    assert StoreConfig.from_env({"STORAGE_CACHE_TTL": "3"}).cache_ttl == 3.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(storage.ValidationError, match="STORAGE_CACHE_TTL"):
            StoreConfig.from_env({"STORAGE_CACHE_TTL": bad})
    data = tmp_path / "data"
    assert run("demo", "--members", "3", "--messages", "3", "--path", str(data),
               env={"STORAGE_CACHE_TTL": "2.5"}).returncode == 0
    assert run("status", "--path", str(data), env={"STORAGE_CACHE_TTL": "2.5"}).returncode == 0


async def test_copy_overwrite_shows_progress_while_deleting_and_reports_deleted_messages(tmp_path: Path,
                                                                                         pg_dsn: str):
    source, target = tmp_path / "source", pg_dsn
    async with storage.open_store(backend="json", path=source) as store:
        await store.put_many("members", {f"100_{i}": {"n": i} for i in range(10)})
        await store.record_messages([record(i, "100") for i in range(5)])
    async with storage.open_store(dsn=target) as store:
        await store.put_many("members", {f"200_{i}": {"n": i} for i in range(3000)})
        await store.record_messages([record(1000 + i, "200") for i in range(40)])

    refused = await asyncio.to_thread(run, "copy", "--from", str(source), "--to", target)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr and "overwrite=True" not in refused.stderr

    async with storage.open_store(backend="json", path=source) as a, storage.open_store(dsn=target) as b:
        with pytest.raises(TargetNotEmptyError) as info:
            await copy(a, b)
    assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)

    result = await asyncio.to_thread(run, "copy", "--from", str(source), "--to", target, "--overwrite",
                                     "--batch-size", "500")
    assert result.returncode == 0, result.stderr
    assert "deleting what the source does not have (3000 records)" in result.stderr, result.stderr
    assert "deleting the target's messages" in result.stderr
    assert "3000 document(s) the source does not have were deleted" in result.stdout, result.stdout
    assert "40 message(s) of the target were deleted" in result.stdout, result.stdout
