"""A failed fdatasync with other processes on the folder (issue 11, item 2).

The promise: a write whose fsync failed raises :class:`StorageIOError` and is never seen by anyone (not this
process, not a second store on the folder, not another process reading without the lock); every acknowledged write
is there after a reopen; and the store keeps working (it rewrites its files from memory before the next commit,
since the journal's cached pages can no longer be trusted).

Two ways to make the syscall fail, both real failures of the real syscall path (the database code is not touched):

* in-process, ``os.fdatasync`` (what :func:`storage.fsutil.sync_fd` calls) is wrapped to fail with EIO on its Nth
  call, for N over a range of points, with a second store on the folder and a reader process;
* under ``strace -e inject=fdatasync:error=EIO``, two writer processes and a reader process, then a reopen.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

import storage
from storage import StorageIOError, StoreConfig
from tests import _fault_child as child


def config(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=30, source="tests")


def seen_values(out: str) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for key, value in child.lines(out, "SEEN"):
        seen.setdefault(key, set()).add(int(value))
    return seen


class FailingSync:
    """``os.fdatasync`` that fails with EIO on chosen calls (counted from 1 across every thread).

    ``uncut``: the ``ftruncate`` that cuts the failed record back fails too, so the record's bytes stay in the
    file past the committed end. When the failing call runs in a worker thread (the event loop free meanwhile), it
    holds the failure until the in-process readers have read at least twice: they read while the failed record's
    bytes are in the file, which is the window issue 11 found. A pause also gives the reader process that window.
    """

    def __init__(self, fail_at: set[int], *, uncut: bool) -> None:
        self.real_sync, self.real_truncate = os.fdatasync, os.ftruncate
        self.fail_at, self.uncut = fail_at, uncut
        self.calls = 0
        self.failed = 0
        self.in_window = threading.Event()
        self.reads_in_window = 0
        self.window_read = threading.Event()
        self.fail_truncate = False
        self.lock = threading.Lock()

    def fdatasync(self, fd: int) -> None:
        with self.lock:
            self.calls += 1
            fail = self.calls in self.fail_at
        time.sleep(0.001)  # a disk, not a RAM disk: appends move to the worker thread (see JsonStore._commit)
        if not fail:
            self.real_sync(fd)
            return
        self.failed += 1
        self.fail_truncate = self.uncut
        if threading.current_thread() is not threading.main_thread():
            self.reads_in_window = 0
            self.window_read.clear()
            self.in_window.set()
            assert self.window_read.wait(10), "the in-process readers did not read during the failing fsync"
            self.in_window.clear()
        time.sleep(0.05)
        raise OSError(errno.EIO, "Input/output error (injected)")

    def ftruncate(self, fd: int, length: int) -> None:
        if self.fail_truncate:
            self.fail_truncate = False
            raise OSError(errno.EIO, "Input/output error (injected)")
        self.real_truncate(fd, length)

    def note_read(self) -> None:
        if self.in_window.is_set():
            self.reads_in_window += 1
            if self.reads_in_window >= 2:
                self.window_read.set()


ROUNDS = 30  # two stores writing at once share fsyncs (json/slots.py): enough for fail_at + 11


@pytest.mark.parametrize("mode", ["cut-back", "cut-back-unsynced", "not-cut-back"])
@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 2, 3, 5, 8, 13, 18, 21])
async def test_failed_fdatasync_is_never_seen_and_loses_nothing(tmp_path, monkeypatch, fail_at, mode):
    """``cut-back``: the failed record is cut back (ftruncate + fdatasync); ``cut-back-unsynced``: the fdatasync
    after that ftruncate fails too; ``not-cut-back``: the ftruncate fails, the record's bytes stay in the file."""
    folder = tmp_path / "data"
    cfg = config(folder)
    a = await storage.open_store(config=cfg)
    b = await storage.open_store(config=cfg)  # a second "process" in this one: its own locks and memory
    stop = tmp_path / "stop"
    reader = child.spawn("reader", cfg, stop, "alast", "blast")
    assert reader.stdout is not None and reader.stdout.readline().strip() == "READY"

    fail = {fail_at, fail_at + 11} | ({fail_at + 1, fail_at + 12} if mode == "cut-back-unsynced" else set())
    sync = FailingSync(fail, uncut=mode == "not-cut-back")
    monkeypatch.setattr(os, "fdatasync", sync.fdatasync)
    monkeypatch.setattr(os, "ftruncate", sync.ftruncate)

    acked: dict[str, list[int]] = {"a": [], "b": []}
    failed: dict[str, list[int]] = {"a": [], "b": []}
    seen: dict[str, set[int]] = {"alast": set(), "blast": set()}
    stores = {"a": a, "b": b}
    done = False

    async def write(name: str, i: int) -> None:
        try:
            await stores[name].put_many("f", {f"{name}{i}": {"i": i}, f"{name}last": {"i": i}})
        except StorageIOError as exc:
            assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EIO
            failed[name].append(i)
            # the store that reported the failure does not serve it either (its view equals the disk)
            assert await stores[name].get("f", f"{name}{i}") is None
        else:
            acked[name].append(i)

    async def read(store: storage.Store, key: str) -> None:
        while not done:
            doc = await store.get("f", key)
            if doc is not None:
                seen[key].add(doc["i"])
            sync.note_read()
            await asyncio.sleep(0)

    readers = [asyncio.ensure_future(read(b, "alast")), asyncio.ensure_future(read(a, "blast"))]
    try:
        for i in range(ROUNDS):
            await asyncio.gather(write("a", i), write("b", i))
    finally:
        done = True
        await asyncio.gather(*readers)
        monkeypatch.undo()
        stop.touch()
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert sync.failed >= 1  # the fault really happened
    failures = failed["a"] + failed["b"]
    # one failed write per failing append (in cut-back-unsynced, the sync after the cut-back fails too)
    appends_failed = sync.failed if mode != "cut-back-unsynced" else len(failures)
    assert failures and len(failures) == appends_failed, (failed, sync.failed)

    # nobody ever saw a write that was reported as failed: not the other store, not the other process
    assert not seen["alast"] & set(failed["a"]) and not seen["blast"] & set(failed["b"])
    other = seen_values(out)
    assert not other.get("alast", set()) & set(failed["a"]) and not other.get("blast", set()) & set(failed["b"])
    # writes go on after the failure, on the store that saw it (one more write each: which store's write met the
    # last failing call depends on which of the two took the lock first in that round, and the last round's
    # failure left no later round to show it)
    for name in ("a", "b"):
        if failed[name]:
            await write(name, ROUNDS)
            assert acked[name][-1] == ROUNDS, (name, acked, failed)

    # both stores (and a fresh open) agree with what was acknowledged
    await a.close()
    await b.close()
    async with storage.open_store(config=cfg) as fresh:
        docs = {k: d async for k, d in fresh.items("f")}
    expected = {f"{name}{i}": {"i": i} for name in ("a", "b") for i in acked[name]}
    expected.update({f"{name}last": {"i": max(acked[name])} for name in ("a", "b") if acked[name]})
    assert docs == expected


@pytest.mark.slow
async def test_fdatasync_eio_injected_by_strace_in_two_writer_processes(tmp_path):
    why = child.strace_problem()
    if why:
        pytest.skip(why)
    folder = tmp_path / "data"
    cfg = config(folder)
    async with storage.open_store(config=cfg) as store:  # the folder exists before the readers start
        await store.put("f", "seed", {"i": -1})
    stop = tmp_path / "stop"
    reader = child.spawn("reader", cfg, stop, "alast", "blast")
    assert reader.stdout is not None and reader.stdout.readline().strip() == "READY"
    count = 400
    writers = {
        # every 7th fdatasync from the 5th on, then every 11th from the 3rd: different points in each process
        name: child.spawn("acker", cfg, name, count,
                          prefix=["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=fdatasync",
                                  "-e", f"inject=fdatasync:error=EIO:when={start}+{step}"])
        for name, start, step in (("a", 5, 7), ("b", 3, 11))
    }
    outs = {}
    for name, proc in writers.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.rstrip().endswith("DONE")
        outs[name] = out
    stop.touch()
    reader_out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err

    acked = {name: [int(f[0]) for f in child.lines(out, "ACK")] for name, out in outs.items()}
    failed = {name: [int(f[0]) for f in child.lines(out, "FAIL")] for name, out in outs.items()}
    for name in outs:
        assert failed[name], f"no fdatasync failed in writer {name}: the injection did not happen"
        assert all(f[1] == str(errno.EIO) for f in child.lines(outs[name], "FAIL"))
        assert len(acked[name]) + len(failed[name]) == count
        assert max(acked[name]) > min(failed[name])  # writes went on after a failure
    seen = seen_values(reader_out)
    for name in outs:
        assert not seen.get(f"{name}last", set()) & set(failed[name])

    async with storage.open_store(config=cfg) as store:
        docs = {k: d async for k, d in store.items("f")}
    expected: dict[str, dict[str, int]] = {"seed": {"i": -1}}
    for name in outs:
        puts = [i for i in acked[name] if i % 3 != 2]
        increments = [i for i in acked[name] if i % 3 == 2]
        expected.update({f"{name}{i}": {"i": i} for i in puts})
        if puts:
            expected[f"{name}last"] = {"i": max(puts)}
        if increments:
            expected[f"{name}counter"] = {"i": len(increments)}
    assert docs == expected


def journal_generation(folder: Path) -> int:
    with open(folder / "storage.journal", "rb") as f:
        return int(json.loads(f.readline())["generation"])


async def test_transaction_cancelled_while_its_fsync_fails(tmp_path, monkeypatch):
    """The commit's fdatasync fails while the transaction's task is being cancelled: the caller sees the
    cancellation (storage.cancellation waits for the thread, then delivers it), and the failure must still make the
    store distrust its journal: the next commit first rewrites the files (a new journal generation)."""
    folder = tmp_path / "data"
    cfg = config(folder)
    store = await storage.open_store(config=cfg)
    sync = FailingSync(set(), uncut=False)
    monkeypatch.setattr(os, "fdatasync", sync.fdatasync)
    for i in range(5):  # slow syncs: the next appends run in a worker thread, which a cancellation waits for
        await store.put("f", f"k{i}", {"i": i})
    sync.fail_at = {sync.calls + 1}
    generation = journal_generation(folder)

    async def commit() -> None:
        async with store.transaction() as tx:
            await tx.put("f", "t", {"i": -1})

    task = asyncio.ensure_future(commit())
    while not sync.in_window.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    sync.window_read.set()  # let the failing fdatasync return its error
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sync.failed == 1
    assert await store.get("f", "t") is None
    await store.put("f", "after", {"i": 99})
    assert journal_generation(folder) > generation  # the journal was rewritten from memory before that commit
    monkeypatch.undo()
    await store.close()
    async with storage.open_store(config=cfg) as reopened:
        docs = {k: d async for k, d in reopened.items("f")}
    assert docs == {**{f"k{i}": {"i": i} for i in range(5)}, "after": {"i": 99}}
