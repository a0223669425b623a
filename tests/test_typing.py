"""mypy in a bot's own project sees the installed library and its typed records (issue 17).

The snippets are type-checked the way a user's project is: ``python -m mypy --strict`` run from a folder outside
this repository, with no ``MYPYPATH``, so ``storage`` is found only the way it is installed in this interpreter (an
editable install must put a plain path on ``sys.path``, not setuptools' import hook, which mypy cannot follow; see
``package_dir`` in setup.cfg). One mypy run for both snippets, a few seconds with a fresh cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")

GOOD = '''
from __future__ import annotations

import storage
from storage import Member, MessageRecord


async def bump(store: storage.Store, user_id: int, guild_id: int) -> int:
    member: Member = await store.get_member_data(user_id, guild_id)
    stats = member.setdefault("statistics", {"message_count": 0})
    stats["message_count"] = stats.get("message_count", 0) + 1
    last: str | None = stats.get("last_active")
    await store.save_member_data(user_id, guild_id, member)
    roles: list[str] = member.get("roles", [])
    return stats["message_count"] + len(roles) + (0 if last is None else 1)


async def lengths(guild_id: int) -> int:
    total = 0
    async with storage.open_store(backend="json", path="data") as store:
        await store.put("settings", guild_id, {"prefix": "!"})      # an int key: a snowflake
        settings = await store.get("settings", guild_id, default={})
        total += len(str(settings.get("prefix", "!")))
        async for record in store.scan_messages(guild_id):
            typed: MessageRecord = record
            total += typed["content_length"] + len(typed["analysis"].get("topics", []))
    return total
'''

BAD = '''
import storage


async def typo(store: storage.Store) -> int:
    member = await store.get_member_data(1, 2)
    return member["statistics"]["mesage_count"]


async def maybe_absent(store: storage.Store) -> str:
    return str((await store.get("settings", 1))["prefix"])   # None when absent: mypy says so
'''


def test_mypy_strict_in_a_users_project_sees_member_and_message_record(tmp_path: Path) -> None:
    project = tmp_path / "mybot"
    project.mkdir()
    (project / "good.py").write_text(textwrap.dedent(GOOD))
    (project / "bad.py").write_text(textwrap.dedent(BAD))
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                           "--no-error-summary", "good.py", "bad.py"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if line.startswith("good.py")], done.stdout + done.stderr
    assert any(line.startswith("bad.py:7") and '"mesage_count"' in line and "MemberStatistics" in line
               for line in lines), done.stdout + done.stderr
    assert any(line.startswith("bad.py:11") and "None" in line and "not indexable" in line
               for line in lines), done.stdout  # get() without a default may return None
    # only those two lines (the typo's error, its "did you mean" note, the Any it leaves): the library was found
    assert all(line.startswith(("bad.py:7:", "bad.py:11:")) for line in lines), done.stdout
