"""Read-only work in a child process (storage/child.py): a backup's message check there gives what the check in this
process gives, on both backends; a child that fails, cannot start or is asked for something outside the package
raises ChildLost where its items stop, and the caller's own check then raises the real error."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backup import messages as backup_messages
from storage.backup.messages import MessageOps
from storage.child import ChildLost, child_items
from storage.errors import BackupError
from tests.test_backup import has_messages, populate, snapshot


def _messages_entry(store: Any, backup_id: str) -> tuple[Path, dict[str, Any]]:
    root = Path(store.config.backup_dir) / backup_id
    manifest = orjson.loads((root / "manifest.json").read_bytes())
    return root, manifest["messages"]


async def test_a_restore_checks_its_messages_in_a_child(store: storage.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both backends: with every check sent to a child and this process's check broken, a dry run and a restore
    still pass and restore exactly (the child checked); a backup that fails the check still fails it."""
    if not has_messages(store):
        pytest.skip("no message log")
    await populate(store, messages=300)
    original = await snapshot(store)
    info = await store.create_backup()  # type: ignore[attr-defined]
    await store.record_message({"message_id": "999999", "guild_id": "1", "channel_id": "1",  # type: ignore[attr-defined]
                                "author_id": "2", "timestamp": "2024-06-01T00:00:00Z"})
    changed = await snapshot(store)
    monkeypatch.setattr(backup_messages, "CHILD_CHECK_RECORDS", 0)
    monkeypatch.setattr(MessageOps, "check_backup", classmethod(lambda cls, root, entry: 1 / 0))
    dry = await store.restore_backup(info.id, dry_run=True)  # type: ignore[attr-defined]
    assert dry.dry_run and await snapshot(store) == changed
    await store.restore_backup(info.id)  # type: ignore[attr-defined]
    assert await snapshot(store) == original


@pytest.mark.parametrize("damage", ["not normalized", "twice", "not an object"])
async def test_the_childs_check_equals_the_check_here(store: storage.Store, damage: str) -> None:
    if not has_messages(store):
        pytest.skip("no message log")
    await populate(store, messages=200)
    info = await store.create_backup()  # type: ignore[attr-defined]
    root, entry = _messages_entry(store, info.id)
    assert list(child_items("storage.backup.messages:checked_count", str(root), entry)) == [200]
    assert MessageOps.check_backup(root, entry) == 200

    path = root / entry["file"]
    lines = gzip.decompress(path.read_bytes()).split(b"\n") if entry["file"].endswith(".gz") else \
        path.read_bytes().split(b"\n")
    record = orjson.loads(lines[5])
    if damage == "not normalized":
        lines[5] = orjson.dumps({**record, "content_length": str(record["content_length"])})
    elif damage == "twice":
        lines[5] = lines[6]
    else:
        lines[5] = b"[1, 2]"
    data = b"\n".join(lines)
    path.write_bytes(gzip.compress(data) if entry["file"].endswith(".gz") else data)
    with pytest.raises(ChildLost):
        list(child_items("storage.backup.messages:checked_count", str(root), entry))
    errors = []
    for threshold in (0, 1 << 40):  # in a child (which fails, so here again), and only here
        backup_messages.CHILD_CHECK_RECORDS, saved = threshold, backup_messages.CHILD_CHECK_RECORDS
        try:
            with pytest.raises(BackupError) as info_:
                MessageOps.check_backup_anywhere(root, entry)
        finally:
            backup_messages.CHILD_CHECK_RECORDS = saved
        errors.append(str(info_.value))
    assert errors[0] == errors[1]


def test_a_child_that_cannot_start_or_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ChildLost):
        list(child_items("os:listdir", str(tmp_path)))  # only this package's generators run there
    with pytest.raises(ChildLost):
        list(child_items("storage.backup.messages:no_such_function"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(ChildLost):
        list(child_items("storage.backup.messages:checked_count", str(tmp_path), {}))


def test_items_come_as_they_are_made(tmp_path: Path) -> None:
    """Items cross as marshal writes them (bytes, tuples, None...), in order, and stop where the child fails."""
    good = tmp_path / "a.jsonl"
    good.write_bytes(b'{"message_id":"1","guild_id":"2","channel_id":"3","author_id":"4",'
                     b'"timestamp":"2024-01-01T00:00:00Z","analysis":{}}\n')
    got = list(child_items("storage.backends.json.column_process:answers",
                           [[str(good), good.stat().st_size], [str(tmp_path / "missing"), 10]]))
    assert len(got) == 2 and got[1] is None
    ino, consumed, micros, *_rest = got[0]
    assert (ino, consumed) == (good.stat().st_ino, good.stat().st_size) and isinstance(micros, bytes)
