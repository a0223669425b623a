"""The JSON-files backend's promises: seed-compatible files, durability under kill -9, corruption reported."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
from pathlib import Path

import pytest

import storage
from storage import CorruptDataError, StoreConfig, ValidationError
from storage.backends.json.store import JOURNAL_NAME
from storage.stores import JsonStore
from tests._proc import assert_crash_writes, crash_writer_round, spawn

SEED_MEMBERS = {
    "987654321_123456789": {
        "user_id": "123456789",
        "guild_id": "987654321",
        "join_date": "2024-01-01T00:00:00Z",
        "roles": ["role1", "role2"],
        "preferences": {"notifications": True, "language": "ja"},
        "statistics": {"message_count": 150, "last_active": "2024-01-15T12:00:00Z"},
    },
    "987654321_42": {"user_id": "42", "guild_id": "987654321", "roles": [], "note": "日本語"},
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "config"
    path.mkdir()
    return path


def config(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=30, source="tests")


def write_like_the_seed(folder: Path, members: dict) -> None:
    with open(folder / "members.json", "w") as f:
        json.dump(members, f, indent=2, ensure_ascii=False)


# -- the files on disk ----------------------------------------------------------------------------------------------
async def test_a_file_written_by_the_seed_opens_unchanged(folder):
    write_like_the_seed(folder, SEED_MEMBERS)
    before = (folder / "members.json").read_bytes()
    async with storage.open_store(backend="json", path=folder) as store:
        assert await store.get_member_data(123456789, 987654321) == SEED_MEMBERS["987654321_123456789"]
        assert await store.get_member_data(42, 987654321) == SEED_MEMBERS["987654321_42"]
        assert (folder / "members.json").read_bytes() == before  # reading rewrites nothing
    assert (folder / "members.json").read_bytes() == before  # nothing changed: nothing to compact


async def test_after_close_files_are_plain_json_in_the_seed_shape(folder):
    write_like_the_seed(folder, SEED_MEMBERS)
    async with storage.open_store(backend="json", path=folder) as store:
        await store.save_member_data(7, 987654321, {"roles": ["new"]})
        await store.update("members", "987654321_42", lambda d: {**d, "roles": ["x"]})
        await store.put("settings", "guild_1", {"prefix": "!"})
    members = json.loads((folder / "members.json").read_text())
    assert members == {
        **SEED_MEMBERS,
        "987654321_42": {**SEED_MEMBERS["987654321_42"], "roles": ["x"]},
        "987654321_7": {"roles": ["new"]},
    }
    assert json.loads((folder / "settings.json").read_text()) == {"guild_1": {"prefix": "!"}}
    journal = (folder / JOURNAL_NAME).read_text().splitlines()
    assert len(journal) == 1 and json.loads(journal[0])["storage_journal"] == 1  # header only: all folded in


async def test_non_collection_json_files_are_left_alone_and_protected(folder):
    (folder / "version.json").write_text('{"version": "1.2.3"}')
    (folder / "spam_blocker.json").write_text("[1, 2, 3]")
    async with storage.open_store(backend="json", path=folder) as store:
        assert await store.collections() == []
        with pytest.raises(ValidationError):
            await store.put("version", "k", {})
        await store.put("other", "k", {})
    assert (folder / "version.json").read_text() == '{"version": "1.2.3"}'
    assert (folder / "spam_blocker.json").read_text() == "[1, 2, 3]"


async def test_compaction_keeps_data_and_bounds_the_journal(folder):
    store = await JsonStore.open(config(folder))
    store.min_compact_bytes = 4096
    for i in range(300):
        await store.put("things", f"k{i % 20}", {"i": i, "pad": "p" * 100})
    # the records (not the preallocated filler after them, json/filler.py) stay bounded: compaction folded them in
    assert len((folder / JOURNAL_NAME).read_bytes().rstrip(b"\n")) < 20_000
    assert json.loads((folder / "things.json").read_text())  # a snapshot was written along the way
    await store.close()
    again = await JsonStore.open(config(folder))
    assert {k: d["i"] async for k, d in again.items("things")} == {f"k{i}": 280 + i for i in range(20)}
    await again.close()


async def test_other_process_compaction_is_followed(folder):
    a = await JsonStore.open(config(folder))
    b = await JsonStore.open(config(folder))
    a.min_compact_bytes = 2048
    for i in range(100):
        await a.put("things", f"k{i % 5}", {"i": i, "pad": "p" * 64})
        if i % 10 == 0:
            assert await b.get("things", f"k{i % 5}") == {"i": i, "pad": "p" * 64}
    await b.put("things", "from_b", {"ok": True})
    assert await a.get("things", "from_b") == {"ok": True}
    for i in range(100):  # several generations pass while b is not looking: b reloads
        await a.put("things", f"k{i % 5}", {"i": 1000 + i})
    assert await b.get("things", "k4") == {"i": 1099}
    assert await b.count("things") == 6
    await a.close()
    await b.close()


# -- corruption is reported, never papered over ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, position",
    [
        (b"", 0),
        (b"   \n", 0),
        (b'{"1_2": {"a": 1}, "1_3": {"a"', 29),
        (b'{"1_2": {"a": 1},, }', 17),
        (b"\x00\x00\x00\x00", 0),
    ],
    ids=["empty", "blank", "truncated", "garbage", "zeros"],
)
async def test_corrupt_snapshot_raises_and_is_left_untouched(folder, content, position):
    (folder / "members.json").write_bytes(content)
    with pytest.raises(CorruptDataError) as info:
        await storage.open_store(backend="json", path=folder)
    assert "members.json" in str(info.value)
    assert info.value.path and info.value.path.endswith("members.json")
    assert info.value.position == position
    assert (folder / "members.json").read_bytes() == content


async def test_corrupt_journal_record_in_the_middle_raises(folder):
    async with storage.open_store(backend="json", path=folder) as store:
        await store.put("things", "a", {"n": 1})
        await store.put("things", "b", {"n": 2})
        # keep the journal: simulate a crash before close by writing more through a second store we do not close
    store = await JsonStore.open(config(folder))
    await store.put("things", "c", {"n": 3})
    await store.put("things", "d", {"n": 4})
    store._journal.close()  # "crash": no compaction on close
    journal = (folder / JOURNAL_NAME).read_bytes()
    lines = journal.split(b"\n")
    lines[1] = b"{#" + lines[1][2:]
    damaged = b"\n".join(lines)
    (folder / JOURNAL_NAME).write_bytes(damaged)
    with pytest.raises(CorruptDataError) as info:
        await storage.open_store(backend="json", path=folder)
    assert JOURNAL_NAME in str(info.value) and info.value.position == len(lines[0]) + 1
    assert (folder / JOURNAL_NAME).read_bytes() == damaged


async def test_torn_last_journal_record_is_dropped_with_a_warning(folder, caplog):
    store = await JsonStore.open(config(folder))
    await store.put("things", "a", {"n": 1})
    store._journal.close()  # crash
    with open(folder / JOURNAL_NAME, "ab") as f:
        f.write(b'[["p","things","b",{"n":')  # a write that never finished
    with caplog.at_level(logging.WARNING, logger="storage.journal"):
        async with storage.open_store(backend="json", path=folder) as again:
            assert await again.get("things", "a") == {"n": 1}
            assert await again.get("things", "b") is None
            await again.put("things", "c", {"n": 3})
    assert any("torn" in r.getMessage() for r in caplog.records)
    async with storage.open_store(backend="json", path=folder) as again:
        assert {k async for k, _ in again.items("things")} == {"a", "c"}


async def test_leftover_temp_files_are_removed_on_open(folder):
    (folder / "members.json.tmp-123-deadbeef").write_text("{half")
    (folder / "storage.journal.tmp-9-0badf00d").write_text("")
    (folder / "notes.tmp-keep").write_text("not ours")
    async with storage.open_store(backend="json", path=folder):
        pass
    assert sorted(p.name for p in folder.iterdir()) == ["notes.tmp-keep", "storage.journal", "storage.lock",
                                                        "storage.slots"]


# -- kill -9 --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
async def test_kill_9_at_random_moments_loses_no_acknowledged_write(folder):
    rng = random.Random(20261124)
    cfg = config(folder)
    acknowledged: dict[int, None] = {}
    start = 0
    for _round in range(25):
        acks = await crash_writer_round(cfg, start, rng.uniform(0.3, 1.2))
        acknowledged.update(dict.fromkeys(acks))
        start = max([start, *acks]) + 100
        # the next open must succeed, and every acknowledged write must be there
        async with storage.open_store(config=cfg) as store:
            assert_crash_writes({k: d async for k, d in store.items("crash")}, acks)
    assert len(acknowledged) > 200  # the test really exercised the writer
    async with storage.open_store(config=cfg) as store:
        assert await store.count("crash") >= len(acknowledged)


async def test_snapshot_fast_path_and_general_path_agree(folder):
    """Files in our one-document-per-line layout load without a full parse; anything else takes the full parse."""
    from storage.backends.json.snapshot import read_snapshot

    tricky = {
        "plain": {"a": 1},
        'quote"key': {"b": [1, {"c": None}]},
        "back\\slash": {},
        "日本": {"s": "line\nbreak", "q": '"'},
        "tab\tkey": {"nested": {"deep": [1.5, -2, True]}},
    }
    async with storage.open_store(backend="json", path=folder) as store:
        await store.put_many("things", tricky)
    ours = folder / "things.json"
    assert json.loads(ours.read_text()) == tricky
    docs, _size, _crc = read_snapshot(ours)
    assert {k: json.loads(v) for k, v in docs.items()} == tricky
    seed_style = folder / "seed.json"
    seed_style.write_text(json.dumps(tricky, indent=2, ensure_ascii=False))
    docs, _size, _crc = read_snapshot(seed_style)
    assert {k: json.loads(v) for k, v in docs.items()} == tricky
    # a damaged line in our layout is still reported with its byte position by the general path
    raw = ours.read_bytes()
    broken = raw.replace(b'{"a":1}', b'{"a":1')
    ours.write_bytes(broken)
    with pytest.raises(CorruptDataError) as info:
        read_snapshot(ours)
    assert info.value.position is not None and 0 < info.value.position < len(broken)


async def test_hand_edits_after_compaction_are_validated_not_trusted(folder):
    """Compaction records each snapshot's checksum; a file changed since then is parsed in full again."""
    async with storage.open_store(backend="json", path=folder) as store:
        await store.put_many("things", {"a": {"n": 1}, "b": {"n": 2}})
    path = folder / "things.json"
    path.write_bytes(path.read_bytes().replace(b'{"n":2}', b'{"n":22}'))  # a valid hand edit
    async with storage.open_store(backend="json", path=folder) as store:
        assert await store.get("things", "b") == {"n": 22}
    path.write_bytes(path.read_bytes().replace(b'{"n":22}', b'{"n":2'))  # a damaging one, same layout
    with pytest.raises(CorruptDataError):
        await storage.open_store(backend="json", path=folder)


class Heartbeat:
    """A task that counts its turns on the event loop, as a bot's gateway heartbeat would get them."""

    def __init__(self) -> None:
        self.turns = 0
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._task.cancel()


async def test_items_over_a_large_collection_is_a_snapshot_and_lets_the_loop_run(folder):
    """A bot's heartbeat shares the loop: other tasks run while a large items() is sorted and decoded, and what
    they write meanwhile does not change the snapshot the iteration started from."""
    async with storage.open_store(backend="json", path=folder) as store:
        docs = {f"7_{i:05d}": {"n": i} for i in range(12_000)}
        await store.put_many("things", {**docs, "8_1": {"n": -1}})
        beat = Heartbeat()
        seen = []
        after_writes = 0
        async for key, doc in store.items("things", prefix="7_"):
            if len(seen) == 10:
                await store.put("things", "7_zzz", {"n": 0})  # written after the snapshot: not seen
                await store.delete("things", "7_11999")       # deleted after it: still seen
                after_writes = beat.turns
            seen.append((key, doc))
        beat.stop()
        assert seen == sorted(docs.items())
        assert beat.turns - after_writes >= 10  # the loop had a turn every 1000 documents of the 12,000
        assert await store.get("things", "7_zzz") == {"n": 0}


async def test_a_large_transaction_lets_the_loop_run_and_its_items_see_its_own_deletes(folder):
    async with storage.open_store(backend="json", path=folder) as store:
        await store.put_many("things", {f"7_{i:05d}": {"n": i} for i in range(6_000)})
        beat = Heartbeat()
        async with store.transaction() as tx:
            seen = []
            async for key, _doc in tx.items("things", prefix="7_"):
                if not seen:
                    await tx.delete("things", "7_00001")  # deleted by this transaction: no longer seen
                seen.append(key)
            before = beat.turns
            for key in seen:
                await tx.delete("things", key)  # 6,000 calls that never wait on their own
            during_deletes = beat.turns - before
        beat.stop()
        assert "7_00001" not in seen and len(seen) == 5_999
        assert during_deletes >= 5  # a loop turn every 1000 staged operations
        assert await store.count("things") == 0


async def test_close_leaves_the_folding_to_the_stores_still_open(folder):
    """Closing while another writable store (another process, as far as the locks go) has the folder open does
    not rewrite the snapshots: at 100k members that held the lock for seconds while the others waited to write.
    The last one to close folds everything, the earlier stores' writes included, even those it never read."""
    first = await JsonStore.open(StoreConfig(backend="json", path=str(folder), lock_timeout=2, source="tests"))
    second = await JsonStore.open(config(folder))
    reader = await JsonStore.open(StoreConfig(backend="json", path=str(folder), read_only=True, source="tests"))
    try:
        await second.put("things", "b", {"n": 2})
        await first.put("things", "a", {"n": 1})
        async with second._locked():  # the other store is committing right now: the close does not wait for it
            await first.close()  # (a wait here would time out: lock_timeout=2)
        assert not (folder / "things.json").exists()
        await first.close()
    finally:
        await second.close()  # the last writable store (a read-only one never folds, so it does not count)
    assert json.loads((folder / "things.json").read_text()) == {"a": {"n": 1}, "b": {"n": 2}}
    assert len((folder / JOURNAL_NAME).read_text().splitlines()) == 1  # header only: all folded in
    assert await reader.get("things", "a") == {"n": 1}
    await reader.close()


async def test_a_killed_store_does_not_keep_the_last_close_from_folding(folder):
    """A process that dies with the folder open gives its share up with its descriptors: the next close folds."""
    proc = spawn("crash-writer", config(folder), 0)
    assert proc.stdout is not None
    await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=60)  # it has the folder open
    store = await JsonStore.open(config(folder))
    await store.put("things", "mine", {"n": 1})
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    await store.close()
    assert json.loads((folder / "things.json").read_text()) == {"mine": {"n": 1}}
    assert len((folder / JOURNAL_NAME).read_text().splitlines()) == 1


async def test_stores_closing_together_still_fold(folder):
    """Each lets go of its share before it asks whether it is the last: of stores closing at once, one folds."""
    stores = [await JsonStore.open(config(folder)) for _ in range(3)]
    for i, store in enumerate(stores):
        await store.put("things", f"k{i}", {"n": i})
    await asyncio.gather(*(store.close() for store in stores))
    assert json.loads((folder / "things.json").read_text()) == {f"k{i}": {"n": i} for i in range(3)}
    assert len((folder / JOURNAL_NAME).read_text().splitlines()) == 1


def _kept_generations(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(JOURNAL_NAME + "."))


async def test_the_last_close_removes_the_kept_journal_generation(folder):
    """A compaction keeps the journal it replaces (storage.journal.<N>) for stores that follow it; once the last
    writable store has closed nobody can, and it is removed: a bulk-loaded store kept a second copy of its whole
    journal on disk. While another writer is open it stays, and that store still follows every write."""
    first = await JsonStore.open(config(folder))
    second = await JsonStore.open(config(folder))
    await first.put_many("things", {f"k{i}": {"n": i} for i in range(500)})
    await first.compact()
    kept = _kept_generations(folder)
    assert kept, "the compaction kept the journal it replaced"
    await first.close()  # not the last writer: the kept generation may still serve `second`
    assert _kept_generations(folder) == kept
    assert await second.count("things") == 500
    await second.put("things", "last", {"n": -1})
    await second.close()  # the last writer: it folds, and nothing is left that could follow the kept file
    assert _kept_generations(folder) == []
    async with storage.open_store(backend="json", path=folder) as store:
        assert await store.count("things") == 501 and await store.get("things", "last") == {"n": -1}


async def test_a_read_only_store_that_missed_a_generation_still_reads_everything(folder):
    """A read-only follower does not count as present: when the last writer closes and removes the kept
    generation, a follower that missed it reloads the snapshots and reads exactly what was written."""
    writer = await JsonStore.open(config(folder))
    reader = await JsonStore.open(StoreConfig(backend="json", path=str(folder), read_only=True, source="tests"))
    await writer.put("things", "a", {"n": 1})
    assert await reader.get("things", "a") == {"n": 1}
    await writer.put("things", "b", {"n": 2})
    await writer.compact()  # one generation the reader never looks at...
    await writer.put("things", "c", {"n": 3})
    await writer.close()  # ...and a second one at the close, after which the kept file is removed
    assert _kept_generations(folder) == []
    assert {k: d async for k, d in reader.items("things")} == {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3}}
    await reader.close()
