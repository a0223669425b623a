"""A batch's record is written back to the disk before its ``fdatasync`` (fsutil.start_writeback, Linux
``sync_file_range``), so that the commit plans its apply while the disk writes (json/store.py ``_timed_sync``).

The promise is the fsync's: the call starts writing, it makes nothing durable and acknowledges nothing. Where it
cannot be used (no such call, refused by a seccomp filter) nothing is started and the commit goes the way it did
before (the sync thread's offer); where it fails (EIO...) the commit fails as a failed write does:
:class:`StorageIOError`, nothing of the batch visible (now, to another process, or after a reopen), and the store
keeps working. The failure is injected in-process and, in a child process, into the real syscall under
``strace -e inject=sync_file_range``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import storage
from storage import StorageIOError, StoreConfig, fsutil
from storage.backends.json import store as json_store
from storage.stores import JsonStore
from tests import _fault_child as child


def cfg(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=30, source="tests")


def batch(n: int, tag: int) -> dict[str, dict[str, Any]]:
    return {f"k{i:04d}": {"tag": tag, "pad": "x" * 280} for i in range(n)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_starts_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 300_000, 0)
        assert fsutil.start_writeback(fd) is True
        os.pwrite(fd, b"y" * 10, 299_995)  # still writable, and nothing else changes
        assert fsutil.start_writeback(fd) is True
        fsutil.sync_fd(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 299_995 + b"y" * 5 + b"y" * 5


def failing_call(code: int) -> Any:
    """A ``sync_file_range`` that fails with ``code`` (in ctypes' own copy of errno, which ``get_errno`` reads)."""
    calls: list[int] = []

    def call(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append(fd)
        ctypes.set_errno(code)
        return -1

    call.calls = calls  # type: ignore[attr-defined]
    return call


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM, errno.ESPIPE, errno.EINVAL])
def test_start_writeback_where_it_cannot_be_used_starts_nothing(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    call = failing_call(code)
    monkeypatch.setattr(fsutil, "_sync_file_range", lambda: call)
    assert fsutil.start_writeback(3) is False
    assert call.calls == [3]
    monkeypatch.setattr(fsutil, "_sync_file_range", lambda: None)  # not Linux, or no such call in libc
    assert fsutil.start_writeback(3) is False


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOMEM, errno.ENOSPC, errno.EBADF])
def test_start_writeback_raises_what_went_wrong(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setattr(fsutil, "_sync_file_range", lambda: failing_call(code))
    with pytest.raises(OSError) as raised:
        fsutil.start_writeback(3)
    assert raised.value.errno == code


@pytest.mark.parametrize("where", ["inline", "threaded"])
async def test_a_batch_whose_writeback_fails_is_never_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           where: str) -> None:
    """The start of the writeback fails (EIO) on the loop's inline commit or in the threaded append's thread: the
    batch raises StorageIOError and is seen nowhere (this store, a second store on the folder, a reopen); the
    store rewrites its files and goes on."""
    n = json_store.PLAN_DURING_SYNC
    real = json_store.start_writeback
    if not sys.platform.startswith("linux"):
        real = lambda fd: True  # noqa: E731 - as if started: the failure below is what is tested
    failing = threading.Event()
    threads: list[str] = []

    def start_writeback(fd: int) -> bool:
        threads.append(threading.current_thread().name)
        if failing.is_set():
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(fd)

    monkeypatch.setattr(json_store, "start_writeback", start_writeback)
    store = await JsonStore.open(cfg(tmp_path))
    other = await JsonStore.open(cfg(tmp_path))
    try:
        await store.put_many("c", batch(n, 0))
        assert threads == ["MainThread"]
        store._batch_sync_estimate = 0.0
        store._sync_estimate = 1.0 if where == "threaded" else 0.0  # 1 s: the append goes to a thread
        failing.set()
        threads.clear()
        with pytest.raises(StorageIOError):
            await store.put_many("c", {**batch(n, 1), "new": {"tag": 1}})
        assert threads and (threads[0] == "MainThread") == (where == "inline")
        failing.clear()
        assert await store.get("c", "new") is None and (await store.get("c", "k0000"))["tag"] == 0
        assert await store.count("c") == n
        assert await other.get("c", "new") is None and (await other.get("c", "k0001"))["tag"] == 0
        store._sync_estimate = 0.0
        await store.put_many("c", batch(n, 2))  # rewrites the files first (the journal is suspect), then commits
        assert (await store.get("c", "k0000"))["tag"] == 2
        assert (await other.get("c", "k0002"))["tag"] == 2 and await other.get("c", "new") is None
    finally:
        await other.close()
        await store.close()
    store = await JsonStore.open(cfg(tmp_path))
    try:
        assert await store.get("c", "new") is None and await store.count("c") == n
        assert {doc["tag"] async for _key, doc in store.items("c")} == {2}
    finally:
        await store.close()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
@pytest.mark.parametrize("also_fdatasync", [False, True])
async def test_sync_file_range_eio_injected_by_strace(tmp_path: Path, also_fdatasync: bool) -> None:
    """A writer process whose every 5th ``sync_file_range`` from the 3rd on fails with EIO (strace; with
    ``also_fdatasync``, every 7th ``fdatasync`` from the 4th too): each batch is acknowledged or reported failed,
    writes go on after a failure, and a reopen holds exactly the acknowledged batches, each whole."""
    why = child.strace_problem()
    if why:
        pytest.skip(why)
    folder = tmp_path / "data"
    config = cfg(folder)
    async with storage.open_store(config=config) as store:  # the folder exists before the writer starts
        await store.put("f", "seed", {"i": -1})
    count, size = 40, json_store.PLAN_DURING_SYNC + 44
    proc = child.spawn("batcher", config, "b", count, size,
                       prefix=["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=sync_file_range,fdatasync",
                               "-e", "inject=sync_file_range:error=EIO:when=3+5",
                               *(["-e", "inject=fdatasync:error=EIO:when=4+7"] if also_fdatasync else [])])
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert out.rstrip().endswith("DONE")
    acked = [int(f[0]) for f in child.lines(out, "ACK")]
    failed = [int(f[0]) for f in child.lines(out, "FAIL")]
    assert failed, "no batch failed: the injection did not happen"
    if not also_fdatasync:  # one sync_file_range per batch (the rewrite after a failure starts none)
        assert failed == list(range(2, count, 5))
    assert all(f[1] == str(errno.EIO) for f in child.lines(out, "FAIL"))
    assert len(acked) + len(failed) == count and max(acked) > min(failed)
    async with storage.open_store(config=config) as store:
        docs = {key: doc async for key, doc in store.items("f")}
    expected: dict[str, Any] = {"seed": {"i": -1}, "blast": {"i": max(acked)}}
    for i in acked:
        expected.update({f"b{i}-{j}": {"i": i, "pad": "x" * 200} for j in range(size)})
    assert docs == expected
