"""The command line, run as a user would: ``python -m storage ...`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATABASE_PUBLIC_URL", "DATABASE_URL", "PGHOST", "DB_HOST", "STORAGE_BACKEND",
                         "STORAGE_PATH")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, timeout=240,
                          cwd=cwd or ROOT, env={**base, **(env or {})})


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "status", "check", "compact"):
        assert command in result.stdout


def test_demo_on_the_json_default_then_status_and_check(tmp_path):
    result = run("demo", "--members", "60", "--messages", "600", "--seed", "7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "60 members, 600 messages stored" in result.stdout
    members = json.loads((tmp_path / "config" / "members.json").read_text())
    assert len(members) == 60
    assert all(key == f"{doc['guild_id']}_{doc['user_id']}" for key, doc in members.items())
    assert sum(doc["statistics"]["message_count"] for doc in members.values()) == 600

    status = run("status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "members" in status.stdout and "60 documents" in status.stdout

    check = run("check", cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stdout + check.stderr


def test_check_reports_a_corrupt_file_and_exits_1(tmp_path):
    (tmp_path / "members.json").write_text('{"1_2": {"roles": [')
    result = run("check", "--path", str(tmp_path))
    assert result.returncode == 1
    assert "CORRUPT" in result.stdout and "members.json" in result.stdout
    assert (tmp_path / "members.json").read_text() == '{"1_2": {"roles": ['


def test_compact_folds_the_journal(tmp_path):
    data = tmp_path / "data"
    assert run("demo", "--members", "5", "--messages", "20", "--path", str(data)).returncode == 0
    result = run("compact", "--path", str(data))
    assert result.returncode == 0, result.stderr
    assert len((data / "storage.journal").read_text().splitlines()) == 1
