"""A full disk, an immutable folder, a library file that is a directory (issue 11, item 9).

The promise: everything the library raises is a :class:`storage.DatabaseError` (:class:`StorageIOError` when the
operating system refused, with its ``OSError`` chained as ``__cause__``), never a raw ``OSError``; nothing that was
acknowledged is lost; once the cause is gone the store works again, the very store object that failed included;
and the command line reports such a store in one line, without a traceback.

The full disk is real: a small tmpfs mounted for the test (root only; skipped with the reason otherwise) and filled
up, so every write path meets a real ``ENOSPC`` from ``write()``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import storage
from storage import CorruptDataError, DatabaseError, StorageIOError, StoreClosedError, StoreConfig
from storage.backends.json.journal import encode_record
from storage.backends.json.store import JOURNAL_NAME
from storage.fsutil import TEMP_MARK
from tests._fault_child import ROOT, child_env

PAD = "x" * 9000  # larger than a page: a write needs a new page, which a full tmpfs refuses


def config(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=30, source="tests")


def os_error_in_chain(exc: BaseException) -> OSError | None:
    cause: BaseException | None = exc.__cause__
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__
    return None


def assert_io_error(exc: BaseException, code: int) -> None:
    """A StorageIOError saying ``code``, with the operating system's OSError chained."""
    assert isinstance(exc, StorageIOError), repr(exc)
    assert exc.errno == code, (exc.errno, exc)
    cause = os_error_in_chain(exc)
    assert cause is not None and cause.errno == code, repr(cause)


class SmallDisk:
    """A tmpfs of a few MiB that a filler file can fill to the last page."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.filler = mountpoint / "filler"

    def fill(self, leave: int = 0) -> None:
        """Fill the disk, then give back ``leave`` bytes (whole pages): a write larger than that is then cut
        short by ENOSPC part-way (a short write, then the error), the hardest case for a cut-back."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for chunk in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            os.ftruncate(fd, os.fstat(fd).st_size - leave)
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield SmallDisk(mountpoint)
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def big(i: int) -> dict[str, Any]:
    return {"i": i, "pad": PAD}


def member(i: int) -> dict[str, Any]:
    return {"user_id": str(1000 + i), "guild_id": "42", "data": {"note": PAD, "i": i}}


def messages(guild: int, count: int, timestamp: str = "2026-01-02T03:04:05Z", **extra: Any) -> list[dict[str, Any]]:
    return [{"message_id": str(guild * 100000 + n), "guild_id": str(guild), "channel_id": "3", "author_id": "4",
             "timestamp": timestamp, "content_length": n, **extra} for n in range(count)]


async def _transaction(store: storage.Store, i: int) -> None:
    async with store.transaction() as tx:
        await tx.put("docs", f"t{i}", big(i))
        await tx.update("docs", "counter", lambda d: {"n": d.get("n", 0) + 1, "pad": PAD})


async def _align_journal(store: storage.Store, folder: Path) -> None:
    """Make the journal end on a page boundary, so that even a small record needs a new page (on tmpfs, an append
    that fits in the file's last page needs no new space, and succeeds on a full disk)."""
    journal = folder / JOURNAL_NAME
    empty = len(encode_record([("p", "docs", "align", b'{"p":""}')]))
    await store.put("docs", "align", {"p": "x" * (-(journal.stat().st_size + empty) % 4096)})
    assert journal.stat().st_size % 4096 == 0


async def _prepare_delete(store: storage.Store, i: int, folder: Path) -> None:
    await store.put("docs", f"d{i}", big(i))
    await _align_journal(store, folder)


async def _prepare_update_message(store: storage.Store, i: int, folder: Path) -> None:
    assert await store.record_messages(messages(i, 1)) == 1


async def _prepare_prune(store: storage.Store, i: int, folder: Path) -> None:
    """A month with 20 messages before the bound and 20 after it: pruning rewrites that month's file."""
    early = messages(i, 20, "2025-03-01T00:00:00Z", note=PAD)
    late = [{**m, "message_id": str(int(m["message_id"]) + 50)}
            for m in messages(i, 20, "2025-03-20T00:00:00Z", note=PAD)]
    assert await store.record_messages(early + late) == 40


async def _nothing(store: storage.Store, i: int, folder: Path) -> None:
    pass


class Write:
    """One write path: what to set up first (with room), the call, what the call returns once there is room."""

    def __init__(self, call: Callable[[storage.Store, int], Awaitable[Any]], result: Any = None,
                 prepare: Callable[[storage.Store, int, Path], Awaitable[None]] = _nothing) -> None:
        self.call, self.result, self.prepare = call, result, prepare


#: Every write path, each given a fresh number; each must fail with ENOSPC on the full disk.
WRITES: dict[str, Write] = {
    "put": Write(lambda s, i: s.put("docs", f"p{i}", big(i))),
    "put_many": Write(lambda s, i: s.put_many("docs", {f"m{i}": big(i), f"n{i}": big(-i)}), 2),
    "update": Write(lambda s, i: s.update("docs", f"u{i}", lambda d: big(i)), None),
    "delete": Write(lambda s, i: s.delete("docs", f"d{i}"), True, _prepare_delete),
    "batch_update_members": Write(lambda s, i: s.batch_update_members([member(i), member(i + 1)]), 2),
    "transaction": Write(_transaction),
    "record_messages": Write(lambda s, i: s.record_messages(messages(i, 300)), 300),
    "update_message": Write(lambda s, i: s.update_message(i * 100000, {"note": PAD}), True, _prepare_update_message),
    "prune_messages": Write(lambda s, i: s.prune_messages("2025-03-15T00:00:00Z"), 20, _prepare_prune),
    "compact": Write(lambda s, i: s.compact()),
}


def written_by(name: str, i: int) -> dict[str, dict[str, Any]]:
    """The documents a successful call of write path ``name`` with number ``i`` leaves in ``docs``."""
    return {"put": {f"p{i}": big(i)}, "put_many": {f"m{i}": big(i), f"n{i}": big(-i)}, "update": {f"u{i}": big(i)},
            "transaction": {f"t{i}": big(i), "counter": {"n": 1, "pad": PAD}}}.get(name, {})


@pytest.mark.slow
@pytest.mark.parametrize("room", [0, 4096], ids=["full", "one-page-left"])
async def test_every_write_path_on_a_full_disk(small_disk, room):
    """Each write path on a full disk (or with one page left, so the write is cut short part-way), while a second
    store on the folder follows: it never sees a failed write and ends with exactly what was acknowledged."""
    folder = small_disk.mountpoint / "data"
    cfg = config(folder)
    expected: dict[str, dict[str, Any]] = {}
    async with storage.open_store(config=cfg) as store:
        await store.put("docs", "first", big(0))
        expected["first"] = big(0)
    follower = await storage.open_store(config=cfg)
    writes = {name: write for name, write in WRITES.items() if not (room and name == "delete")}  # fits in a page
    for number, (name, write) in enumerate(writes.items(), start=1):
        store = await storage.open_store(config=cfg)
        try:
            await store.put("docs", f"before-{name}", big(number))  # acknowledged: must survive what follows
            expected[f"before-{name}"] = big(number)
            await write.prepare(store, number, folder)
            if name == "delete":
                expected[f"d{number}"] = big(number)
            small_disk.fill(leave=room)
            with pytest.raises(DatabaseError) as failed:
                await write.call(store, number)
                pytest.fail(f"{name} did not fail on a full disk")
            assert_io_error(failed.value, errno.ENOSPC)
            assert await store.get("docs", f"p{number}") is None
            assert {k: d async for k, d in follower.items("docs") if k != "align"} == expected
            # still full (a failure may free a little: a cache dropped): the next write, which first tries to
            # rewrite the store's files after a failed journal write, fails the same way
            small_disk.fill(leave=room)
            with pytest.raises(DatabaseError) as again:
                await store.put("docs", f"q{number}", big(number))
            assert_io_error(again.value, errno.ENOSPC)
            assert await store.get("docs", f"q{number}") is None
            small_disk.free()
            # the same store object works again once there is room: the failed call had changed nothing
            result = await write.call(store, number)
            if name not in ("update", "transaction"):
                assert result == write.result, name
            expected.update(written_by(name, number))
            expected.pop(f"d{number}", None)
            await store.put("docs", f"after-{name}", big(number))
            expected[f"after-{name}"] = big(number)
        finally:
            small_disk.free()
            await store.close()
    numbers = {name: number for number, name in enumerate(writes, start=1)}
    assert {k: d async for k, d in follower.items("docs") if k != "align"} == expected
    await follower.close()
    async with storage.open_store(config=cfg) as store:
        docs = {k: d async for k, d in store.items("docs")}
        if "delete" in writes:
            assert docs.pop("align")["p"].count("x") < 4096
        assert docs == expected  # d<n> was deleted
        assert await store.count("members") == 2
        assert await store.message_counts(numbers["record_messages"]) == 300
        assert await store.message_counts(numbers["update_message"]) == 1
        assert await store.message_counts(numbers["prune_messages"]) == 20
    assert not [p.name for p in folder.rglob(f"*{TEMP_MARK}*")]  # failed writes left no temp files behind


async def test_close_and_open_on_a_full_disk(small_disk):
    folder = small_disk.mountpoint / "data"
    cfg = config(folder)
    store = await storage.open_store(config=cfg)
    await store.put_many("docs", {f"k{i}": big(i) for i in range(20)})
    small_disk.fill()
    with pytest.raises(DatabaseError) as failed:
        await store.close()  # its compaction cannot write the snapshot
    assert_io_error(failed.value, errno.ENOSPC)
    with pytest.raises(StoreClosedError):
        await store.get("docs", "k1")
    with pytest.raises(StoreClosedError):
        await store.batch_update_members([member(1)])
    # a new store needs room for its journal: a clear error, nothing raw
    with pytest.raises(DatabaseError) as failed:
        await storage.open_store(config=config(small_disk.mountpoint / "new" / "data"))
    assert_io_error(failed.value, errno.ENOSPC)
    # the existing store still opens (reading needs no room) and holds everything
    async with storage.open_store(config=cfg) as reader:
        assert await reader.count("docs") == 20
        # the command line says so in one line
        assert_check_clean(run_cli("check", "--path", str(folder)), "No space left on device")
        assert_clean_failure(run_cli("compact", "--path", str(folder)), "error: ", "No space left on device")
        small_disk.free()
    async with storage.open_store(config=cfg) as reopened:
        assert {k: d async for k, d in reopened.items("docs")} == {f"k{i}": big(i) for i in range(20)}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "storage", *args], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), timeout=120)


def assert_clean_failure(result: subprocess.CompletedProcess[str], prefix: str, *words: str) -> None:
    """Exit 1 with a short report starting with ``prefix`` that says ``words``; no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, (result.returncode, output)
    assert "Traceback" not in output, output
    assert output.startswith(prefix) and output.count("\n") <= 2, output
    for word in words:
        assert word in output, output


def assert_check_clean(result: subprocess.CompletedProcess[str], why: str) -> None:
    """``storage check`` reads every file; in this version it also compacts on exit (issue 11 item 12), which the
    fault may refuse: either it reports the store readable, or it fails in one line saying ``why``."""
    if result.returncode == 0:
        assert result.stdout.startswith("ok: ") and "Traceback" not in result.stderr, result
    else:
        assert_clean_failure(result, "FAILED: ", why)


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """``chattr +i`` a folder for the test (skipped where chattr or the file system does not allow it)."""
    made: list[Path] = []
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")

    def make(path: Path) -> None:
        result = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot make a folder immutable here: {result.stderr.strip()}")
        made.append(path)

    try:
        yield make
    finally:
        for path in made:
            subprocess.run(["chattr", "-i", str(path)], check=False)


async def test_immutable_folder(tmp_path, immutable):
    folder = tmp_path / "data"
    cfg = config(folder)
    async with storage.open_store(config=cfg) as store:
        await store.put_many("docs", {"a": {"i": 1}, "b": {"i": 2}})
    immutable(folder)
    # the files in it can still be written: writes work, but nothing can be created, renamed or removed
    store = await storage.open_store(config=cfg)
    await store.put("docs", "c", {"i": 3})
    with pytest.raises(DatabaseError) as failed:
        await store.compact()
    assert_io_error(failed.value, errno.EPERM)
    assert await store.get("docs", "c") == {"i": 3}  # the failed compaction left the store usable
    await store.put("docs", "d", {"i": 4})
    with pytest.raises(DatabaseError) as failed:
        await store.close()
    assert_io_error(failed.value, errno.EPERM)
    # a store inside it cannot even be created
    with pytest.raises(DatabaseError) as failed:
        await storage.open_store(config=config(folder / "inner"))
    assert_io_error(failed.value, errno.EPERM)

    assert_check_clean(run_cli("check", "--path", str(folder)), "Operation not permitted")
    assert_clean_failure(run_cli("compact", "--path", str(folder)), "error: ", "Operation not permitted")

    async with storage.open_store(config=dataclasses.replace(cfg, read_only=True)) as reader:
        assert {k: d async for k, d in reader.items("docs")} == {k: {"i": i} for i, k in enumerate("abcd", 1)}


async def test_immutable_folder_without_its_lock_file(tmp_path, immutable):
    folder = tmp_path / "data"
    async with storage.open_store(config=config(folder)) as store:
        await store.put("docs", "a", {"i": 1})
    (folder / "storage.lock").unlink()
    immutable(folder)
    with pytest.raises(DatabaseError) as failed:
        await storage.open_store(config=config(folder))
    assert_io_error(failed.value, errno.EPERM)
    assert_clean_failure(run_cli("compact", "--path", str(folder)), "error: ", "Operation not permitted")


async def test_members_json_that_is_a_directory(tmp_path):
    folder = tmp_path / "data"
    async with storage.open_store(config=config(folder)) as store:
        await store.put("docs", "a", {"i": 1})
    (folder / "members.json").mkdir()
    with pytest.raises(CorruptDataError, match="members"):
        await storage.open_store(config=config(folder))
    assert_clean_failure(run_cli("check", "--path", str(folder)), "CORRUPT: ", "members.json", "directory")
    assert_clean_failure(run_cli("compact", "--path", str(folder)), "error: ", "members.json", "directory")
    assert (folder / "members.json").is_dir()  # left as it is


async def test_batch_update_members_after_close(tmp_path):
    store = await storage.open_store(config=config(tmp_path / "data"))
    await store.batch_update_members([{"user_id": "1", "guild_id": "2", "data": {"a": 1}}])
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.batch_update_members([{"user_id": "1", "guild_id": "2", "data": {"a": 2}}])
    async with storage.open_store(config=config(tmp_path / "data")) as reopened:
        assert await reopened.get_member_data(1, 2) == {"a": 1}


@pytest.mark.parametrize("call", ["compact", "close", "open"])
async def test_fsync_eio_in_compaction_close_and_open(tmp_path, monkeypatch, call):
    """``os.fsync`` (snapshot files, folders) failing with EIO: a StorageIOError, the files still valid."""
    folder = tmp_path / "data"
    cfg = config(folder)
    store = await storage.open_store(config=cfg)
    await store.put_many("docs", {f"k{i}": {"i": i} for i in range(50)})
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    try:
        with pytest.raises(DatabaseError) as failed:
            if call == "compact":
                await store.compact()
            elif call == "close":
                await store.close()
            else:
                await storage.open_store(config=config(tmp_path / "new" / "data"))
        assert_io_error(failed.value, errno.EIO)
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
    if call == "compact":  # the store that failed to compact goes on
        await store.put("docs", "after", {"i": -1})
        assert await store.get("docs", "k7") == {"i": 7}
    await store.close()
    async with storage.open_store(config=cfg) as reopened:
        expected = {f"k{i}": {"i": i} for i in range(50)}
        if call == "compact":
            expected["after"] = {"i": -1}
        assert {k: d async for k, d in reopened.items("docs")} == expected
    assert not [p.name for p in folder.rglob(f"*{TEMP_MARK}*")]
