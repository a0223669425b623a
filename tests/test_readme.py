"""The README's Python examples run (issue 17), so they cannot drift from the library.

Every ```python block of README.md is executed, in order, in one namespace, against a JSON store in a temporary
folder (the environment points ``open_store()`` there; no PostgreSQL variable is set). A block that cannot run
here says why in an HTML comment just before its fence: ``<!-- not-run: needs a PostgreSQL server -->``; the
exclusions are listed by the test and kept few. Blocks may use top-level ``await`` (they are run as the body of a
coroutine) and a few names the README takes as given, defined in :func:`_given`: ``store`` (an open store),
``user_id``, ``guild_id``, ``updates``, ``records``, ``key``, ``before`` (a cutoff time).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import storage

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->\s*$")
#: How many blocks may be excluded at most: a README whose examples mostly cannot run is not checked by this test.
MAX_EXCLUDED = 2

ENV_NAMES = ("STORAGE_BACKEND", "DATABASE_PUBLIC_URL", "DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD",
             "PGDATABASE", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME", "STORAGE_CACHE_TTL",
             "STORAGE_MIGRATIONS", "STORAGE_BACKUP_EXTRA", "STORAGE_BACKUP_KEEP")


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, reason_not_run)`` for every python fence of ``text``."""
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rpartition("\n")[2]
        reason = NOT_RUN.search(before)
        out.append((line, match.group(1), reason.group(1) if reason else None))
    return out


def _given(store: storage.Store) -> dict[str, Any]:
    user_id, guild_id = 300000000000000001, 800000000000000001
    return {
        "storage": storage, "store": store, "user_id": user_id, "guild_id": guild_id, "key": "alice",
        "before": "2024-01-02T00:00:00Z",
        "updates": [{"user_id": user_id, "guild_id": guild_id, "data": {"roles": ["member"]}},
                    {"user_id": "not an id", "guild_id": guild_id, "data": {}}],
        "records": [{"message_id": 900 + i, "guild_id": guild_id, "channel_id": 5, "author_id": user_id,
                     "timestamp": f"2024-01-0{i + 1}T12:00:00Z", "content_length": 10 * i} for i in range(3)],
    }


async def _run(code: str, namespace: dict[str, Any], where: str) -> None:
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if compiled.co_flags & inspect.CO_COROUTINE:  # the block awaits at top level: run it in this loop
        await eval(compiled, namespace)
    else:  # plain code, which may call asyncio.run itself: not inside this running loop, so in a thread
        await asyncio.to_thread(exec, compiled, namespace)


def test_readme_blocks_are_found() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    excluded = [(line, reason) for line, _, reason in blocks if reason]
    assert len(excluded) <= MAX_EXCLUDED, excluded


def test_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain test with its own event loop, where ``store`` is opened and the blocks that await run (a store
    works only in its own loop); a block without top-level ``await`` runs in a worker thread, where no loop runs,
    so it may call ``asyncio.run(main())`` itself as a script does."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_PATH", str(tmp_path / "config"))
    monkeypatch.setenv("STORAGE_BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.chdir(tmp_path)
    ran, skipped = [], []
    loop = asyncio.new_event_loop()
    try:
        store = loop.run_until_complete(storage.open_store().__aenter__())
        namespace: dict[str, Any] = {"__name__": "readme"}
        for line, code, reason in readme_blocks(README.read_text(encoding="utf-8")):
            if reason:
                skipped.append((line, reason))
                continue
            namespace.update(_given(store))  # a block may have rebound or closed `store` (async with ...)
            try:
                loop.run_until_complete(_run(code, namespace, f"README.md:{line}"))
            except Exception as exc:  # say which block; its traceback has the block's own line numbers
                raise AssertionError(f"README.md's python block at line {line} failed: {exc!r}") from exc
            ran.append(line)
        if "MyBot" in namespace:  # the discord.py section's bot: its setup_hook opens a store, close() closes it
            bot = namespace["MyBot"]()
            loop.run_until_complete(bot.setup_hook())
            assert loop.run_until_complete(bot.store.get("settings", 1234567890)) == {"prefix": "?"}
            loop.run_until_complete(bot.close())
            assert bot.store.closed
        # what the blocks did is in the store (they ran against it, not against a stub)
        # (the API tour's transfer: alice got 10 points, then gave 5 to bob)
        assert loop.run_until_complete(store.get("economy", "alice")) == {"points": 5}
        loop.run_until_complete(store.close())
    finally:
        loop.close()
    print(f"\nREADME: ran the python blocks at lines {ran}; not run: {skipped or 'none'}")
    assert ran
