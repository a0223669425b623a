"""The journal's preallocated filler (json/filler.py, issue 15): records overwrite newlines written ahead of them.

What must hold, beyond the journal's own tests: the file stays readable text; a record overwrites filler instead of
growing the file; a crash (kill -9, or of the machine: the lock file's committed end is then not trusted) that
leaves a record torn inside the filler, whole or in pieces, loses nothing acknowledged and is cut away; a reader
never takes filler or an unfinished record for a record, also while the writer extends the filler; and a disk
too full for a chunk of filler still takes the record alone, or fails cleanly without a half-written line.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import threading
from pathlib import Path

import pytest

import storage
from storage import CorruptDataError, StorageIOError, StoreConfig
from storage.backends.json import filler
from storage.backends.json.journal import encode_record
from storage.backends.json.store import JOURNAL_NAME, LOCK_NAME
from storage.stores import JsonStore
from tests._proc import assert_crash_writes, crash_writer_round, spawn
from tests.test_json_disk_faults import SmallDisk, small_disk  # noqa: F401 - the fixture, used by name

PAD = "x" * 9000  # larger than a tmpfs page


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "data"


def config(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=30, source="tests")


def record_lines(journal: Path) -> list[bytes]:
    """The journal's non-blank lines (header first): what a person reading the file sees besides blank lines."""
    return [line for line in journal.read_bytes().split(b"\n") if line]


def crash(store: JsonStore) -> None:
    """Leave the store as a killed process would: descriptors gone, no close, no compaction."""
    store._journal.close()
    store._flock.close()


def reboot(folder: Path) -> None:
    """What a crash of the machine does to the published committed end: it is not trusted any more."""
    (folder / LOCK_NAME).unlink()


async def committed_store(folder: Path) -> tuple[int, int]:
    """A store with two committed records, crashed; returns (end of the records, file size)."""
    store = await JsonStore.open(config(folder))
    await store.put("things", "a", {"n": 1})
    await store.put("things", "b", {"n": 2})
    end, size = store._journal.offset, (folder / JOURNAL_NAME).stat().st_size
    crash(store)
    assert size > end  # the records are followed by filler
    return end, size


async def test_records_overwrite_filler_and_the_journal_stays_text(folder):
    store = await JsonStore.open(config(folder))
    try:
        await store.put("things", "first", {"n": 0})
        journal = folder / JOURNAL_NAME
        size = journal.stat().st_size
        assert size >= store._journal.offset + filler.MIN_CHUNK  # a chunk of filler after the first record
        for i in range(50):
            await store.put("things", f"k{i}", {"n": i, "pad": "p" * 50})
        assert journal.stat().st_size == size  # written in place: the file did not grow
        raw = journal.read_bytes()
        assert b"\0" not in raw and raw[store._journal.offset:].strip(b"\n") == b""  # text; filler is newlines
        lines = record_lines(journal)
        assert json.loads(lines[0])["storage_journal"] == 1
        assert [json.loads(line)[0][2] for line in lines[1:]] == ["first", *(f"k{i}" for i in range(50))]
    finally:
        await store.close()
    async with storage.open_store(config=config(folder)) as again:
        assert await again.count("things") == 51


async def test_chunks_grow_the_file_and_a_reopen_reads_through_them(folder, monkeypatch):
    monkeypatch.setattr(filler, "MIN_CHUNK", 4096)
    monkeypatch.setattr(filler, "MAX_CHUNK", 4096)
    store = await JsonStore.open(config(folder))
    sizes = set()
    for i in range(200):
        await store.put("things", f"k{i}", {"i": i, "pad": "q" * 100})
        sizes.add((folder / JOURNAL_NAME).stat().st_size)
    crash(store)
    assert 5 <= len(sizes) <= 20  # a few extensions (each a record plus a chunk); 200 appends would be 200 sizes
    async with storage.open_store(config=config(folder)) as again:
        assert {k: d["i"] async for k, d in again.items("things")} == {f"k{i}": i for i in range(200)}


@pytest.mark.parametrize("trusted", [True, False], ids=["same-boot", "after-reboot"])
async def test_a_record_torn_inside_the_filler_is_cut_away(folder, caplog, trusted):
    """A killed writer leaves a prefix of its record over the filler; whether the committed end is known
    (same boot) or not (after a reboot), reopening drops it, keeps every committed record, and goes on."""
    end, _size = await committed_store(folder)
    torn = encode_record([("p", "things", "c", b'{"n":3,"pad":"' + b"z" * 200 + b'"}')])[:120]
    with open(folder / JOURNAL_NAME, "r+b") as f:
        f.seek(end)
        f.write(torn)
    if not trusted:
        reboot(folder)
    with caplog.at_level(logging.WARNING, logger="storage.journal"):
        async with storage.open_store(config=config(folder)) as again:
            assert {k: d async for k, d in again.items("things")} == {"a": {"n": 1}, "b": {"n": 2}}
            raw = (folder / JOURNAL_NAME).read_bytes()
            assert raw[end:].strip(b"\n") == b""  # no trace of it before the next write
            await again.put("things", "d", {"n": 4})
    assert any("never acknowledged" in r.getMessage() for r in caplog.records)
    async with storage.open_store(config=config(folder)) as again:
        assert {k async for k, _ in again.items("things")} == {"a", "b", "d"}


async def test_a_record_torn_into_pieces_between_filler_is_a_torn_write_not_corruption(folder, caplog):
    """A crash of the machine can write some pages of a record and not others: pieces of it between filler,
    the first piece possibly missing. Nothing parseable follows them, so they are a torn write: dropped."""
    end, _size = await committed_store(folder)
    record = encode_record([("p", "things", "c", b'{"pad":"' + b"w" * 3000 + b'"}')])
    with open(folder / JOURNAL_NAME, "r+b") as f:
        f.seek(end + 40)  # the record's first bytes never reached the disk
        f.write(record[40:1000])
        f.seek(end + 2000)
        f.write(record[2000:2500])
    reboot(folder)
    with caplog.at_level(logging.WARNING, logger="storage.journal"):
        async with storage.open_store(config=config(folder)) as again:
            assert {k async for k, _ in again.items("things")} == {"a", "b"}
            await again.put("things", "e", {"n": 5})
    assert any("torn" in r.getMessage() for r in caplog.records)
    async with storage.open_store(config=config(folder)) as again:
        assert {k async for k, _ in again.items("things")} == {"a", "b", "e"}


async def test_damage_in_the_filler_before_a_record_is_corruption(folder):
    """An unparseable line followed by a record that parses was not a torn write: refused, nothing changed."""
    end, _size = await committed_store(folder)
    later = encode_record([("p", "things", "c", b'{"n":3}')])
    with open(folder / JOURNAL_NAME, "r+b") as f:
        f.seek(end + 10)
        f.write(b"#garbage#\n")
        f.seek(end + 100)
        f.write(later)
    reboot(folder)
    before = (folder / JOURNAL_NAME).read_bytes()
    with pytest.raises(CorruptDataError) as info:
        await storage.open_store(config=config(folder))
    assert info.value.position == end + 10
    assert (folder / JOURNAL_NAME).read_bytes() == before


async def test_leftovers_deep_in_the_filler_are_cut_away_at_open(folder, caplog):
    """Bytes past the committed end that do not start right at it (the one byte a locked catch-up looks at) are
    found by the whole-tail look of an open and dropped, so that later records never run into them."""
    end, size = await committed_store(folder)
    with open(folder / JOURNAL_NAME, "r+b") as f:
        f.seek(size - 50)
        f.write(b'[["p","things","x"')
    with caplog.at_level(logging.WARNING, logger="storage.journal"):
        async with storage.open_store(config=config(folder)) as again:
            assert (folder / JOURNAL_NAME).read_bytes()[end:].strip(b"\n") == b""
            await again.put("things", "f", {"n": 6})
    assert any("never acknowledged" in r.getMessage() for r in caplog.records)
    async with storage.open_store(config=config(folder)) as again:
        assert {k async for k, _ in again.items("things")} == {"a", "b", "f"}


async def test_a_follower_never_sees_a_record_before_its_fsync_while_filler_is_written(folder, monkeypatch):
    """Another store on the folder (its own lock description: another process as far as the lock goes) reads
    while the writer's record and new filler are written but not yet fsynced: it sees neither, and no error;
    once acknowledged, it sees the record. Every write here crosses into a new chunk of filler."""
    monkeypatch.setattr(filler, "MIN_CHUNK", 4096)
    monkeypatch.setattr(filler, "MAX_CHUNK", 4096)
    writer = await JsonStore.open(config(folder))
    reader = await JsonStore.open(config(folder))
    in_sync, release = threading.Event(), threading.Event()
    real_sync = os.fdatasync
    journal_ino = [0]

    def slow_sync(fd: int) -> None:
        if os.fstat(fd).st_ino == journal_ino[0]:
            in_sync.set()
            assert release.wait(30)
        real_sync(fd)

    try:
        await writer.put("big", "seed", {"pad": "s" * 100})
        journal_ino[0] = (folder / JOURNAL_NAME).stat().st_ino
        monkeypatch.setattr(os, "fdatasync", slow_sync)
        writer._sync_estimate = 1.0  # the append runs in a worker thread (as on a slow disk)
        for i in range(5):
            size_before = (folder / JOURNAL_NAME).stat().st_size
            in_sync.clear()
            release.clear()
            task = asyncio.create_task(writer.put("big", f"k{i}", {"pad": "b" * 5000}))
            assert await asyncio.to_thread(in_sync.wait, 30)
            assert (folder / JOURNAL_NAME).stat().st_size > size_before  # record and filler are in the file
            assert await reader.get("big", f"k{i}") is None  # ... but not committed: not seen
            assert await reader.count("big") == i + 1
            release.set()
            await task
            assert await reader.get("big", f"k{i}") == {"pad": "b" * 5000}
    finally:
        release.set()
        monkeypatch.setattr(os, "fdatasync", real_sync)
        await reader.close()
        await writer.close()


@pytest.mark.slow
async def test_a_reader_process_follows_a_writer_across_filler_chunks(folder, monkeypatch):
    """A reader in another process polls a counter while this process increments it across many chunk
    extensions: it only ever sees values that were written, in order, and reaches the last one."""
    monkeypatch.setattr(filler, "MIN_CHUNK", 4096)
    monkeypatch.setattr(filler, "MAX_CHUNK", 4096)
    cfg = config(folder)
    target = 300
    async with storage.open_store(config=cfg) as store:
        await store.put("counters", "c", {"n": 0})
        reader = spawn("watch-counter", cfg, target)
        assert reader.stdout is not None
        ready = await asyncio.wait_for(asyncio.to_thread(reader.stdout.readline), timeout=60)
        assert ready.strip() == "READY", reader.stderr.read() if reader.stderr else ""
        for n in range(1, target + 1):
            await store.put("counters", "c", {"n": n, "pad": "c" * 300})  # 10+ records per 4 KiB chunk
        out, err = await asyncio.to_thread(reader.communicate, timeout=120)
    assert reader.returncode == 0, err
    seen = [int(line.split()[1]) for line in out.splitlines() if line.startswith("SEEN ")]
    assert seen == sorted(seen) and seen[-1] == target and all(0 <= n <= target for n in seen)


@pytest.mark.slow
async def test_kill_9_while_writing_inside_the_filler_loses_no_acknowledged_write(folder):
    """The kill -9 test with the store's own compaction threshold: kills land while records overwrite filler
    (and while chunks are added); each reopen has every acknowledged write and nothing else past them."""
    rng = random.Random(20261205)
    cfg = config(folder)
    start = 0
    acknowledged = 0
    for _round in range(12):
        acks = await crash_writer_round(cfg, start, rng.uniform(0.2, 0.8), 0)
        acknowledged += len(acks)
        start = max([start, *acks]) + 100
        async with storage.open_store(config=cfg) as store:
            assert_crash_writes({k: d async for k, d in store.items("crash")}, acks)
            raw = (folder / JOURNAL_NAME).read_bytes()
            assert raw[store._journal.offset:].strip(b"\n") == b""  # nothing past the records but filler
    assert acknowledged > 100


# -- a full disk --------------------------------------------------------------------------------------------------
def share_all_free_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the 4 MiB test disk get filler (by default a chunk takes at most 1/256 of the free space: none here)."""
    monkeypatch.setattr(filler, "FREE_SHARE", 1)
    monkeypatch.setattr(filler, "MIN_CHUNK", 4096)


async def test_a_small_disk_gets_no_filler(small_disk):  # noqa: F811
    """By default a chunk of filler never takes more than a small share of the free space: on a 4 MiB disk
    records are appended as before, and a full disk fails a write as before."""
    folder = small_disk.mountpoint / "data"
    async with storage.open_store(config=config(folder)) as store:
        await store.put("docs", "a", {"pad": PAD})
        assert (folder / JOURNAL_NAME).stat().st_size == store._journal.offset


async def test_a_write_into_the_filler_needs_no_free_space(small_disk, monkeypatch):  # noqa: F811
    share_all_free_space(monkeypatch)
    folder = small_disk.mountpoint / "data"
    async with storage.open_store(config=config(folder)) as store:
        await store.put("docs", "first", {"pad": "f" * 100})
        room = (folder / JOURNAL_NAME).stat().st_size - store._journal.offset
        assert room >= 4096
        small_disk.fill()
        await store.put("docs", "small", {"n": 1})  # fits in the filler: acknowledged on a full disk
        with pytest.raises(StorageIOError) as failed:
            await store.put("docs", "big", {"pad": PAD})  # needs new space: fails cleanly
        assert failed.value.errno == errno.ENOSPC
        assert await store.get("docs", "big") is None
        small_disk.free()
        await store.put("docs", "after", {"n": 2})
    async with storage.open_store(config=config(folder)) as again:
        assert {k async for k, _ in again.items("docs")} == {"first", "small", "after"}


async def test_no_room_for_a_chunk_of_filler_appends_the_record_alone(small_disk, monkeypatch, caplog):  # noqa: F811
    """The disk has room for the record but not for the record and its chunk of filler: the chunk's write is
    cut short by ENOSPC, cut back, and the record appended alone; a follower sees exactly the acknowledged
    writes. With no room at all, the write fails cleanly; once there is room again, writes go on."""
    share_all_free_space(monkeypatch)
    folder = small_disk.mountpoint / "data"
    cfg = config(folder)
    async with storage.open_store(config=cfg) as store:
        await store.put("docs", "first", {"n": 0})
    writer = await JsonStore.open(cfg)
    follower = await JsonStore.open(cfg)
    try:
        journal = folder / JOURNAL_NAME
        # use up the filler, so that the next record needs new space
        i = 0
        while journal.stat().st_size - writer._journal.offset > 200:
            await writer.put("docs", f"fill{i}", {"n": i})
            i += 1
        small_disk.fill(leave=3 * 4096)  # room for the record (9 KB), not for it and a chunk of filler
        monkeypatch.setattr(filler, "MIN_CHUNK", 8192)
        with caplog.at_level(logging.INFO, logger="storage.journal"):
            await writer.put("docs", "alone", {"pad": PAD})
        assert any("no room to preallocate" in r.getMessage() for r in caplog.records)
        assert journal.stat().st_size == writer._journal.offset  # no half-written filler left behind
        assert journal.read_bytes().endswith(b"\n")
        assert await follower.get("docs", "alone") == {"pad": PAD}
        small_disk.fill()
        with pytest.raises(StorageIOError) as failed:
            await writer.put("docs", "refused", {"pad": PAD})
        assert failed.value.errno == errno.ENOSPC
        assert await follower.get("docs", "refused") is None
        small_disk.free()
        await writer.put("docs", "after", {"n": 1})
        assert await follower.get("docs", "after") == {"n": 1}
    finally:
        await follower.close()
        await writer.close()
    async with storage.open_store(config=cfg) as again:
        docs = {k async for k, _ in again.items("docs")}
    assert {"first", "alone", "after"} <= docs and "refused" not in docs and len(docs) == 3 + i


async def test_a_compaction_keeps_the_previous_generation_without_its_filler(folder):
    store = await JsonStore.open(config(folder))
    try:
        await store.put("things", "a", {"n": 1})
        end = store._journal.offset
        generation = store._journal.generation
        await store.compact()
        kept = folder / f"{JOURNAL_NAME}.{generation}"
        assert kept.read_bytes()[end:] == b" "  # the records, then the compaction's mark: no filler
        await store.put("things", "b", {"n": 2})
    finally:
        await store.close()
