"""Read-only work in a child process (storage/child.py): a backup's message check there gives what the check in this
process gives, on both backends, and so do a PostgreSQL restore's ``COPY`` rows encoded there; a child that fails,
cannot start, dies midway or is asked for something outside the package raises ChildLost where its items stop, and
the caller does the rest itself, which raises the real error."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backends.postgres import store as pg_store
from storage.backup import messages as backup_messages
from storage.backup.messages import MessageOps
from storage.child import ChildLost, child_items
from storage.errors import BackupError
from tests.test_backup import has_messages, other_backend, other_config, populate, snapshot

__all__ = ["other_backend", "other_config"]  # fixtures


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


# -------------------------------------------------------------------------------------------------------------------
# a PostgreSQL restore's COPY rows, read and encoded in a child
def _counting_copy_data(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """This process's ``_next_copy_data``, counting the records it encodes."""
    encoded = [0]
    real = pg_store._next_copy_data

    def counted(batches: Any, encoder: Any, rows: int = pg_store.RESTORE_COPY_ROWS) -> bytes | None:
        def each() -> Any:
            for batch in batches:
                encoded[0] += len(batch)
                yield batch
        return real(each(), encoder, rows)

    monkeypatch.setattr(pg_store, "_next_copy_data", counted)
    return encoded


@pytest.mark.parametrize("lost", [False, True], ids=["whole", "lost-after-one-copy"])
async def test_a_postgres_restore_encodes_its_rows_in_a_child(store: Any, other_backend: Any, lost: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Restoring a backup of either backend into PostgreSQL, the child encodes every row (none here); a child lost
    after its first ``COPY`` leaves the rest to this process, from where it stopped: the messages are exactly the
    backup's either way."""
    pg = store if store.backend_name == "postgres" else other_backend
    await populate(store, members=5, messages=25_000)
    original = await snapshot(store)
    info = await store.create_backup()
    await pg.record_message({"message_id": "999999", "guild_id": "1", "channel_id": "1", "author_id": "2",
                             "timestamp": "2024-06-01T00:00:00Z"})  # messages to replace, on either side
    monkeypatch.setattr(pg_store, "CHILD_COPY_RECORDS", 0)
    monkeypatch.setattr(backup_messages, "CHILD_CHECK_RECORDS", 0)
    encoded = _counting_copy_data(monkeypatch)
    reads = [0]
    real_reads = MessageOps.backup_batches

    def counted_reads(root: Path, entry: dict[str, Any], size: int = backup_messages.MESSAGE_BATCH) -> Any:
        reads[0] += 1
        return real_reads(root, entry, size)

    monkeypatch.setattr(MessageOps, "backup_batches", staticmethod(counted_reads))
    if lost:
        real = pg_store.child_items

        def first_only(*args: Any) -> Any:
            items = real(*args)
            try:
                yield next(items)
            finally:
                items.close()
            raise ChildLost("gone")

        monkeypatch.setattr(pg_store, "child_items", first_only)
    await pg.restore_backup(info.id)
    assert await snapshot(pg) == original
    assert encoded[0] == (25_000 - pg_store.RESTORE_COPY_ROWS if lost else 0)
    assert reads[0] == (1 if lost else 0)  # this process reads the backup's messages only to resume


async def test_a_row_postgres_refuses_is_refused_as_before(store: Any, other_backend: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON backup holding a counter beyond bigint: the child fails on it, this process then encodes the rows
    and refuses the same record with the same error; nothing is restored."""
    if store.backend_name != "json":
        pytest.skip("a JSON store holds what PostgreSQL refuses")
    await populate(store, members=5, messages=300)
    await store.record_message({"message_id": "9999999", "guild_id": "1", "channel_id": "1", "author_id": "2",
                                "timestamp": "2024-06-01T00:00:00Z", "content_length": 2**63 + 5})
    info = await store.create_backup()
    before = await snapshot(other_backend)
    errors = []
    for threshold in (0, 1 << 40):
        monkeypatch.setattr(pg_store, "CHILD_COPY_RECORDS", threshold)
        with pytest.raises(BackupError) as caught:
            await other_backend.restore_backup(info.id)
        errors.append(str(caught.value))
        assert await snapshot(other_backend) == before
    assert errors[0] == errors[1] and "9999999" in errors[0]
