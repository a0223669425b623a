"""``python -m storage forget guild|user ID [--dry-run]`` and ``export user ID``, run as an operator would (a
subprocess), on both backends: the dry run changes nothing, the real run prints what it removed, the export is
the JSON of ``export_user``; bad ids and missing stores fail in the style of the other commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import storage
from storage import StoreConfig
from tests.test_lifecycle import everything, fill

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, timeout=240,
                          cwd=ROOT, env=env)


def where(config: StoreConfig) -> list[str]:
    return ["--path", config.path] if config.backend == "json" else ["--dsn", str(config.dsn)]


async def test_forget_guild_dry_run_then_for_real(store_config: StoreConfig):
    async with storage.open_store(config=store_config) as store:
        await fill(store, messages=100)
        expected = await store.forget_guild("12", dry_run=True)
        before = await everything(store)
    dry = run("forget", "guild", "12", "--dry-run", *where(store_config))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would remove from guild 12 (dry run, nothing changed):")
    for name, n in expected.items():
        assert any(line.split() == [*name.split(), str(n)] for line in dry.stdout.splitlines()), (name, dry.stdout)
    async with storage.open_store(config=store_config) as store:
        assert await everything(store) == before
    real = run("forget", "guild", "12", *where(store_config))
    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines()[0] == "removed guild 12:"
    assert real.stdout.replace("removed guild 12:", "") == dry.stdout.replace(
        "would remove from guild 12 (dry run, nothing changed):", "")
    again = run("forget", "guild", "12", *where(store_config))
    assert (again.returncode, again.stdout.strip()) == (0, "nothing stored about guild 12: nothing removed")


async def test_export_user_then_forget_user_in_one_guild(store_config: StoreConfig):
    async with storage.open_store(config=store_config) as store:
        await fill(store, messages=100)
        exported = await store.export_user("2")
        in_guild = await store.forget_user("2", guild_id="1", dry_run=True)
    result = run("export", "user", "2", *where(store_config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == exported
    forget = run("forget", "user", "2", "--guild", "1", *where(store_config))
    assert forget.returncode == 0, forget.stderr
    assert forget.stdout.splitlines()[0] == "removed user 2 in guild 1:"
    assert f"messages  {in_guild['messages']}" in forget.stdout
    async with storage.open_store(config=store_config) as store:
        left = await store.export_user("2", guild_id="1")
        assert (left["members"], left["documents"], left["messages"]) == ({}, {}, [])


async def test_bad_ids_fail_cleanly_and_change_nothing(store_config: StoreConfig):
    async with storage.open_store(config=store_config) as store:
        await fill(store, messages=20)
        before = await everything(store)
    for args in (("forget", "guild", "12x"), ("forget", "user", "-3"), ("forget", "user", "2", "--guild", "g"),
                 ("export", "user", "1_2")):
        result = run(*args, *where(store_config))
        assert result.returncode == 1, result
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert result.stdout == ""
    async with storage.open_store(config=store_config) as store:
        assert await everything(store) == before


def test_a_missing_store_is_refused_and_not_created(tmp_path: Path):
    for args in (("forget", "guild", "1"), ("forget", "user", "1", "--dry-run"), ("export", "user", "1")):
        result = run(*args, "--path", str(tmp_path / "typo"))
        assert result.returncode == 2 and result.stderr.startswith("refused: no store at"), result
    assert not (tmp_path / "typo").exists()


def test_help_says_what_the_commands_do():
    for args, words in ((("forget", "--help"), "first prints what it would remove"),
                        (("forget", "user", "--help"), "--dry-run"), (("export", "user", "--help"), "JSON")):
        result = run(*args)
        assert result.returncode == 0 and words in " ".join(result.stdout.split()), result
    assert "(all or nothing)" in " ".join(run("--help").stdout.split())
