"""A typo must not destroy anything (issue 12): commands that read or maintain a store refuse a folder that holds
none, and ``demo`` refuses a store holding real data and never doubles its own. Run as a user would:
``python -m storage ...`` in a subprocess, on real folders and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from storage.backup.messages import MessageOps

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, timeout=240,
                          cwd=cwd, env={**base, **(env or {})})


#: Every command that reads or maintains an existing store (``migrate up`` may create one: a first deploy).
READERS = [
    ("check",),
    ("status",),
    ("compact",),
    ("stats", "987654321"),
    ("backup", "create", "--backup-dir", "{tmp}/bk", "--keep", "1"),
    ("migrate", "status", "--migrations", "examples.migrations"),
    ("migrate", "down", "--migrations", "examples.migrations"),
    ("migrate", "validate", "--migrations", "examples.migrations"),
    ("migrate", "history", "--migrations", "examples.migrations"),
]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("command", READERS, ids=lambda c: " ".join(c[:2]))
def test_a_command_refuses_a_folder_that_holds_no_store_and_creates_nothing(command: tuple[str, ...],
                                                                            tmp_path: Path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a store")
    before = tree(tmp_path)
    for folder, why in (("reall", "does not exist"), ("empty", "holds no storage.journal")):
        result = run(*args, "--path", str(tmp_path / folder), cwd=tmp_path)
        assert result.returncode == 2, (folder, result.stdout, result.stderr)
        assert f"no store at {tmp_path / folder}" in result.stderr and why in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert tree(tmp_path) == before  # no folder, no journal, no lock, no backup dir
    # the default folder (./config) is no exception
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2 and "no store at" in result.stderr, result.stderr
    assert tree(tmp_path) == before


def test_a_typo_backup_never_prunes_the_real_stores_backups(tmp_path: Path):
    data = tmp_path / "data"
    assert run("demo", "--members", "5", "--messages", "20", "--path", str(data), cwd=tmp_path).returncode == 0
    for _ in range(2):
        created = run("backup", "create", "--path", str(data), "--backup-dir", "bk", cwd=tmp_path)
        assert created.returncode == 0, created.stderr
    backups = sorted(p.name for p in (tmp_path / "bk").iterdir())
    typo = run("backup", "create", "--path", str(tmp_path / "dta"), "--backup-dir", "bk", "--keep", "1",
               cwd=tmp_path)
    assert typo.returncode == 2 and "does not exist" in typo.stderr
    assert sorted(p.name for p in (tmp_path / "bk").iterdir()) == backups
    assert not (tmp_path / "dta").exists()


def test_a_store_with_only_a_seed_members_json_is_a_store(tmp_path: Path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "members.json").write_text(json.dumps({"1_2": {"roles": []}}))
    result = run("check", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stdout + result.stderr


async def test_the_python_api_still_creates_a_new_store(tmp_path: Path):
    path = tmp_path / "new" / "config"
    async with storage.open_store(backend="json", path=path) as store:
        await store.put("settings", "1", {"prefix": "!"})
    assert (path / "storage.journal").exists()


def demo_target(config: storage.StoreConfig) -> list[str]:
    return ["--path", config.path] if config.backend == "json" else ["--dsn", str(config.dsn)]


async def contents(config: storage.StoreConfig) -> tuple[dict[str, int], int]:
    async with storage.open_store(config=config) as store:
        counts = {name: await store.count(name) for name in await store.collections()}
        return counts, await MessageOps(store).count()


async def test_demo_twice_does_not_double_and_refuses_real_data_unless_forced(store_config: storage.StoreConfig,
                                                                             tmp_path: Path):
    config, where = store_config, demo_target(store_config)
    demo = ("demo", "--members", "30", "--messages", "300", *where)
    first = await asyncio.to_thread(run, *demo, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"about to fill {config.describe().split(' (from')[0]}" in first.stdout
    after_first = await contents(config)
    assert after_first[0]["members"] == 30 and after_first[1] == 300

    second = await asyncio.to_thread(run, *demo, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "replaying the same session" in second.stdout
    assert await contents(config) == after_first

    async with storage.open_store(config=config) as store:  # a real bot's data arrives
        await store.save_member_data("111111111111111111", "222222222222222222", {"roles": ["admin"]})
        await store.record_message({"message_id": "333333333333333333", "guild_id": "222222222222222222",
                                    "channel_id": "444444444444444444", "author_id": "111111111111111111",
                                    "timestamp": "2024-01-01T00:00:00Z", "content_length": 3})
    refused = await asyncio.to_thread(run, "demo", "--guild", "5555", "--members", "3", "--messages", "3", *where,
                                      cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "already holds data the demo did not write (1 members document(s), 1 message(s))" in refused.stderr
    assert (await contents(config))[0]["members"] == 31

    forced = await asyncio.to_thread(run, "demo", "--guild", "5555", "--members", "3", "--messages", "3", "--force",
                                     *where, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    counts, messages = await contents(config)
    assert counts["members"] == 34 and messages == 304


async def test_copy_from_a_typo_never_empties_the_target(tmp_path: Path, pg_dsn: str):
    async with storage.open_store(dsn=pg_dsn) as store:
        await store.put("members", "100_1", {"roles": ["admin"]})
    (tmp_path / "empty").mkdir()
    for source in ("confg", "empty"):
        result = await asyncio.to_thread(run, "copy", "--from", str(tmp_path / source), "--to", pg_dsn,
                                         "--overwrite", cwd=tmp_path)
        assert result.returncode == 2 and "no store at" in result.stderr, result.stdout + result.stderr
    async with storage.open_store(dsn=pg_dsn) as store:
        assert await store.get("members", "100_1") == {"roles": ["admin"]}
    assert not (tmp_path / "confg").exists()


def test_a_malformed_url_location_is_refused_not_taken_for_a_folder(tmp_path: Path):
    for location in ("postgresql:/bot:S3cretPw@127.0.0.1:1/db", "postgresql//bot:S3cretPw@127.0.0.1:1/db"):
        data = tmp_path / "data"
        assert run("demo", "--members", "2", "--messages", "2", "--path", str(data), cwd=tmp_path).returncode == 0
        for args in (("copy", "--from", str(data), "--to", location), ("copy", "--from", location, "--to", "x")):
            result = run(*args, cwd=tmp_path)
            assert result.returncode == 1 and "malformed PostgreSQL URL" in result.stderr, result.stderr
            assert "S3cretPw" not in result.stdout + result.stderr
        assert not any("S3cret" in p for p in tree(tmp_path))  # no folder named after the DSN
