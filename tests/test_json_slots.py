"""Shared slots (json/slots.py): a writer waiting for another process's lock offers its record, the holder commits
it with its own in one fsync. Real processes, SIGKILL at every point of the protocol, an fdatasync failed by strace,
cancelled writers, two stores of one process. After every fault: each acknowledged write is on disk and in every
live store's view, and no record is committed twice (a later write of the same key is never undone)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from storage import LockTimeoutError, StoreConfig
from storage.backends.json import group_commit, holding, lease
from storage.backends.json import journal as journal_module
from storage.backends.json.journal import Journal
from storage.backends.json.slots import _STRIDE, COUNT, OFFERED, Slots
from storage.backends.json.store import JOURNAL_NAME, SLOTS_NAME
from storage.stores import JsonStore
from tests._fault_child import child_env, strace_problem

CHILD = Path(__file__).resolve().parent / "_slots_child.py"
WAIT = 15.0  # every wait of these tests is bounded by this


def cfg(folder: Path) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), lock_timeout=30, source="tests")


class Holder:
    """The holder process (tests/_slots_child.py) and what it printed."""

    def __init__(self, folder: Path, point: str, prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, str(CHILD), str(folder), point],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=child_env())
        self.lines: list[str] = []

    async def until(self, word: str | tuple[str, ...]) -> str:
        assert self.proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), WAIT)
            except TimeoutError:
                self.proc.kill()
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"no {word} from the holder within {WAIT} s: {self.lines} {err}") from None
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"the holder ended before {word}: {self.lines} {err}")
            self.lines.append(line.strip())
            if line.startswith(word):
                return line.strip()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def acked(self) -> set[str]:
        return {line.split()[1] for line in self.lines if line.startswith("ACK ")}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=WAIT)


async def offered(folder: Path) -> None:
    """Until some slot of ``folder`` says OFFERED."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        try:
            heads = (folder / SLOTS_NAME).read_bytes()[:COUNT * _STRIDE]
        except FileNotFoundError:
            heads = b""
        if OFFERED in heads[::_STRIDE]:
            return
        assert asyncio.get_running_loop().time() < deadline, "the writer never offered its record"
        await asyncio.sleep(0.005)


async def offer_f(holder: Holder, follower: JsonStore, folder: Path) -> asyncio.Task[None]:
    """Once the holder keeps the lock leased: the follower's put of ``f`` ({"v": 1}), offered to it (the put's
    task, not done)."""
    assert await holder.until("READY") == "READY leased"
    put = asyncio.create_task(follower.put("c", "f", {"v": 1}))
    await offered(folder)
    return put


def keep_leases(monkeypatch: pytest.MonkeyPatch, budget: float, hold: float) -> None:
    """In this process, a store saving in a run keeps the lock leased up to ``budget`` seconds, and up to ``hold``
    while another writer waits (json/lease.py), so that a writer of the test finds it taken and offers."""
    monkeypatch.setattr(lease, "BUDGET", budget)
    monkeypatch.setattr(lease, "HOLD", hold)
    monkeypatch.setattr(group_commit, "SOLO_TURN_BUDGET", budget)


def puts_of(folder: Path, key: str) -> list[Any]:
    """Every put of ``key`` in the journal's records, in order (each committed record once)."""
    found = []
    for line in (folder / JOURNAL_NAME).read_bytes().split(b"\n")[1:]:
        if not line.strip():
            continue
        for op in orjson.loads(line):
            if op[0] == "p" and op[2] == key:
                found.append(op[3])
    return found


async def docs(store: JsonStore) -> dict[str, Any]:
    return {k: d async for k, d in store.items("c")}


async def check(folder: Path, live: list[JsonStore], acked: set[str]) -> dict[str, Any]:
    """Every acknowledged key on disk, every live view equal to a fresh open's."""
    async with await JsonStore.open(cfg(folder)) as fresh:
        on_disk = await docs(fresh)
    assert acked <= set(on_disk), f"acknowledged writes lost: {acked - set(on_disk)}"
    for store in live:
        assert await docs(store) == on_disk
    return on_disk


@pytest.mark.parametrize("point", ["claimed", "written", "synced", "published"])
async def test_the_holder_killed_at_each_point_commits_the_offer_once(tmp_path: Path, point: str) -> None:
    """The holder claims the writer's offer and is SIGKILLed at ``point``. The writer's put still returns (the
    kernel opens its door and frees the lock; the slot is settled from the journal): its record is on disk once,
    committed by the dead holder (``published``) or by the writer itself (before that: never published, cut)."""
    follower = await JsonStore.open(cfg(tmp_path))  # first: its open waits for the lock
    holder = Holder(tmp_path, point)
    try:
        put = await offer_f(holder, follower, tmp_path)
        holder.go()
        await holder.until("PAUSED")
        holder.kill()
        await asyncio.wait_for(put, WAIT)
        assert puts_of(tmp_path, "f") == [{"v": 1}], "the offered record is committed exactly once"
        if point == "published":
            assert puts_of(tmp_path, "h3") == [{"by": "holder"}], "published: the holder's own record is committed"
        else:
            assert puts_of(tmp_path, "h3") == [], "never published: cut"
        await follower.put("c", "f", {"v": 2})  # a later write of the key stays the last
        on_disk = await check(tmp_path, [follower], holder.acked() | {"f"})
        assert on_disk["f"] == {"v": 2}
        assert puts_of(tmp_path, "f") == [{"v": 1}, {"v": 2}]
    finally:
        holder.kill()
        await follower.close()


async def test_the_holder_killed_between_the_offer_and_the_claim(tmp_path: Path) -> None:
    """The holder dies with the writer's record offered and not claimed: the writer's door opens, it finds its
    slot still OFFERED, takes the lock and commits its record itself, once."""
    follower = await JsonStore.open(cfg(tmp_path))
    holder = Holder(tmp_path, "none")
    try:
        put = await offer_f(holder, follower, tmp_path)
        holder.kill()
        await asyncio.wait_for(put, WAIT)
        assert puts_of(tmp_path, "f") == [{"v": 1}]
        await check(tmp_path, [follower], holder.acked() | {"f"})
    finally:
        holder.kill()
        await follower.close()


WRITER = """
import asyncio, sys
from storage.stores import JsonStore
from storage import StoreConfig, StorageIOError
from storage.backends.json import holding

holding.OFFER_MIN_SYNC = 0.0  # tests/conftest.py offers_always

async def main(folder):
    store = await JsonStore.open(StoreConfig(backend="json", path=folder, lock_timeout=30, source="tests"))
    print("OPEN", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    try:
        await store.put("c", KEY, {"v": 1})
    except StorageIOError as exc:
        print("FAIL", exc, flush=True)
    else:
        print("ACK", KEY, flush=True)
    await asyncio.to_thread(sys.stdin.readline) if KEY != "dead" else await asyncio.sleep(3600)
    await store.close()

asyncio.run(main(sys.argv[1]))
"""
#: A writer process that puts ``dead`` (then waits to be killed), ``w`` or ``t`` (then closes on a line of stdin)
#: once a line arrives on its stdin, after printing OPEN (:func:`writer_process`); a put that fails with
#: StorageIOError prints FAIL instead of ACK.
FOLLOWER = 'KEY = "dead"' + WRITER
STOPPABLE = 'KEY = "w"' + WRITER


async def writer_process(folder: Path, script: str) -> subprocess.Popen[str]:
    """The writer process ``script`` on ``folder``, started once the folder and its files exist (a store opened and
    closed first)."""
    async with await JsonStore.open(cfg(folder)):
        pass
    writer = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    assert writer.stdout is not None and writer.stdin is not None
    return writer


async def offered_to_holder(writer: subprocess.Popen[str], folder: Path, point: str) -> Holder:
    """Once ``writer`` (:func:`writer_process`) is open, a holder process (``point``) that keeps the lock leased,
    and the writer's put offered to it (the writer opened first: its open needs the lock)."""
    assert writer.stdout is not None and writer.stdin is not None
    assert (await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)).strip() == "OPEN"
    holder = Holder(folder, point)
    try:
        assert await holder.until("READY") == "READY leased"
        writer.stdin.write("put\n")
        writer.stdin.flush()
        await offered(folder)
    except BaseException:
        holder.kill()
        raise
    return holder


async def test_an_offer_whose_writer_died_is_not_claimed(tmp_path: Path) -> None:
    """A writer process offers its record and is SIGKILLed before any holder claims it: the holder's next commit
    leaves the slot alone (its owner's lock is gone: nobody would acknowledge it), and a new store takes the slot."""
    writer = await writer_process(tmp_path, FOLLOWER)
    holder: Holder | None = None
    try:
        holder = await offered_to_holder(writer, tmp_path, "none")
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=WAIT)
        holder.go()
        await holder.until("ACK h3")
        assert not [line for line in holder.lines if line.startswith("CLAIMED")]
        assert puts_of(tmp_path, "dead") == []
        holder.kill()
        async with await JsonStore.open(cfg(tmp_path)) as again:  # the dead writer's slot is free again
            await again.put("c", "g", {"v": 1})
        await check(tmp_path, [], holder.acked() | {"g"})
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate(timeout=WAIT)
        if holder is not None:
            holder.kill()


async def test_the_holder_commits_the_offer_and_the_writer_learns_it_at_its_door(tmp_path: Path) -> None:
    """No fault: the holder's one commit carries the writer's record; the writer's put returns without the lock
    (the holder keeps it), its view has the record, and it is on disk once."""
    follower = await JsonStore.open(cfg(tmp_path))
    holder = Holder(tmp_path, "none")
    try:
        put = await offer_f(holder, follower, tmp_path)
        holder.go()
        await holder.until("CLAIMED")
        await asyncio.wait_for(put, WAIT)
        assert await follower.get("c", "f") == {"v": 1}
        assert not follower._flock.held, "the writer never took the lock"
        await holder.until("ACK h3")
        lines = [line for line in (tmp_path / JOURNAL_NAME).read_bytes().split(b"\n") if b'"f"' in line]
        assert len(lines) == 1 and b'"h3"' in lines[0], "one record, one fsync: the holder's and the writer's"
        holder.kill()
        await check(tmp_path, [follower], holder.acked() | {"f"})
    finally:
        holder.kill()
        await follower.close()


async def test_a_failed_fsync_of_the_holder_makes_the_writer_commit_its_own(tmp_path: Path) -> None:
    """strace fails every fdatasync of the holder from the commit that carries the writer's record on: the holder
    reports its own save failed (StorageIOError, EIO), the writer commits its record itself; neither failed record
    is on disk, the writer's is, once."""
    problem = strace_problem()
    if problem:
        pytest.skip(problem)
    follower = await JsonStore.open(cfg(tmp_path))
    holder = Holder(tmp_path, "none")
    tracer: subprocess.Popen[str] | None = None
    try:
        assert await holder.until("READY") == "READY leased"
        tracer = subprocess.Popen(["strace", "-f", "-o", os.devnull, "-p", str(holder.proc.pid), "-e",
                                   "trace=fdatasync", "-e", "inject=fdatasync:error=EIO"],
                                  stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        attached = await asyncio.wait_for(asyncio.to_thread(tracer.stderr.readline), WAIT)
        assert "attached" in attached, attached
        put = asyncio.create_task(follower.put("c", "f", {"v": 1}))
        await offered(tmp_path)
        holder.go()
        failed = await holder.until("FAIL")
        assert failed.split()[1:] == ["h3", "5"], failed  # EIO
        await asyncio.wait_for(put, WAIT)
        assert puts_of(tmp_path, "f") == [{"v": 1}]
        holder.kill()
        on_disk = await check(tmp_path, [follower], holder.acked() | {"f"})
        assert "h3" not in on_disk
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.communicate(timeout=WAIT)
        holder.kill()
        await follower.close()


@pytest.mark.parametrize("point", ["offered", "claimed", "published"])
async def test_a_cancelled_writer_settles_its_offer(tmp_path: Path, point: str) -> None:
    """The writer's put is cancelled while its record is offered (withdrawn: never written, even by a holder
    committing later), claimed by a holder that then dies before writing (settled: not committed), or claimed by
    one that published it and died (settled: committed, in the writer's view). The cancellation is delivered
    only once the slot is settled."""
    follower = await JsonStore.open(cfg(tmp_path))
    holder = Holder(tmp_path, "none" if point == "offered" else point)
    try:
        put = await offer_f(holder, follower, tmp_path)
        if point == "offered":
            put.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(put, WAIT)
            holder.go()
            await holder.until("ACK h3")
            committed = False
        else:
            holder.go()
            await holder.until("PAUSED")
            put.cancel()
            await asyncio.sleep(0.2)
            assert not put.done(), "the cancelled writer waits for its claimed record's fate"
            holder.kill()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(put, WAIT)
            committed = point == "published"
        holder.kill()
        assert puts_of(tmp_path, "f") == ([{"v": 1}] if committed else [])
        assert (await follower.get("c", "f") is not None) == committed, "the writer's view equals the disk"
        await follower.put("c", "g", {"v": 1})  # the store goes on
        await check(tmp_path, [follower], holder.acked() | {"g"})
    finally:
        holder.kill()
        await follower.close()


async def test_two_stores_of_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stores on one folder in one process are two writers here too: one keeps the lock leased, the other's
    put is offered, claimed by the first's next commit, and acknowledged at its door; both views agree."""
    keep_leases(monkeypatch, 5.0, 5.0)
    a = await JsonStore.open(cfg(tmp_path))
    b = await JsonStore.open(cfg(tmp_path))
    try:
        for n in range(3):
            await a.put("c", f"a{n}", {"n": n})  # a hot lease: a keeps the lock
        assert a._lease.held
        put = asyncio.create_task(b.put("c", "b", {"n": 1}))
        await offered(tmp_path)
        await a.put("c", "a3", {"n": 3})  # claims b's record
        await asyncio.wait_for(put, WAIT)
        assert not b._flock.held
        assert puts_of(tmp_path, "b") == [{"n": 1}]
        assert await b.get("c", "b") == {"n": 1} and await a.get("c", "b") == {"n": 1}
        await b.put("c", "b", {"n": 2})
        await check(tmp_path, [a, b], {"a0", "a1", "a2", "a3", "b"})
        assert await a.get("c", "b") == {"n": 2}
    finally:
        await a.close()
        await b.close()


@pytest.mark.slow
async def test_writer_processes_killed_at_random_lose_no_acknowledged_write(tmp_path: Path) -> None:
    """Four writer processes (puts of two keys, which are offered when the lock is taken; transactions; updates)
    on one store; two are SIGKILLed at random moments, wherever they are in the protocol (holding claims, offered,
    waiting at their door). Every acknowledged write is on disk, no record is committed twice (each key of a
    writer is written once), and each writer's ``last`` key holds its last acknowledged put or a later one."""
    import random

    from tests import _fault_child as child

    config = cfg(tmp_path)
    async with await JsonStore.open(config) as store:
        await store.put("f", "seed", {"i": -1})
    count = 300
    names = ["a", "b", "c", "d"]
    procs = {name: child.spawn("acker", config, name, count) for name in names}
    rng = random.Random(15)
    try:
        for name in ("a", "b"):
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            procs[name].send_signal(signal.SIGKILL)
        outs = {}
        for name, proc in procs.items():
            out, err = await asyncio.wait_for(asyncio.to_thread(proc.communicate, None, 240), 250)
            if name in ("c", "d"):
                assert proc.returncode == 0, err
            outs[name] = out
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=WAIT)
    async with await JsonStore.open(config) as fresh:
        on_disk = {k: d async for k, d in fresh.items("f")}
    puts = [op for line in (tmp_path / JOURNAL_NAME).read_bytes().split(b"\n")[1:] if line.strip()
            for op in orjson.loads(line) if op[0] == "p"]
    for name, out in outs.items():
        acked = [int(f[0]) for f in child.lines(out, "ACK")]
        assert not child.lines(out, "FAIL"), out
        if name in ("c", "d"):
            assert len(acked) == count
        written = [i for i in acked if i % 3 != 2]
        for i in written:
            assert on_disk.get(f"{name}{i}") == {"i": i}, f"{name}{i} acknowledged, not on disk"
        keyed = [op[2] for op in puts if op[2].startswith(name) and op[2][len(name):].isdigit()]
        assert len(keyed) == len(set(keyed)), f"a record of {name} committed twice"
        if written:
            assert on_disk[f"{name}last"]["i"] >= max(written), f"{name}last went back"
        increments = len([i for i in acked if i % 3 == 2])
        counter = on_disk.get(f"{name}counter", {"i": 0})["i"]
        assert increments <= counter <= increments + 1


FREEZER = """
import fcntl, os, sys, time
from storage.backends.json.slots import _DOOR, _MUTEX, COUNT, _OFD_SETLK, _flock_struct
fd = os.open(sys.argv[1], os.O_RDWR)
for index in range(COUNT):
    fcntl.fcntl(fd, _OFD_SETLK, _flock_struct(fcntl.F_WRLCK, _MUTEX + index))
fcntl.fcntl(fd, _OFD_SETLK, _flock_struct(fcntl.F_RDLCK, _DOOR, 2 * COUNT))
print("frozen", flush=True)
time.sleep(600)
"""


async def test_a_process_frozen_holding_every_slot_mutex_and_door_stops_no_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process stopped inside the slots' protocol (here: holding every slot's mutex and a read lock on every door,
    as a writer frozen between its two door syscalls would) must not stop another process's event loop: the holder
    closes the doors it can, a writer whose slot's mutex is taken does not offer and waits for the store lock, and
    every put is acknowledged and on disk. A watchdog kills the frozen process if the loop stops turning (the
    blocking waits this replaced hung for ever), and the test fails."""
    import threading
    import time

    monkeypatch.setattr(lease, "BUDGET", 5.0)
    monkeypatch.setattr(lease, "HOLD", 0.05)  # a leased holder lets go soon: the waiting store gets the lock
    a = await JsonStore.open(cfg(tmp_path))
    b = await JsonStore.open(cfg(tmp_path))
    freezer = subprocess.Popen([sys.executable, "-c", FREEZER, str(tmp_path / SLOTS_NAME)], stdout=subprocess.PIPE,
                               text=True, env=child_env())
    beat = [time.monotonic()]
    stalled: list[float] = []
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.1):
            if time.monotonic() - beat[0] > WAIT:
                stalled.append(time.monotonic() - beat[0])
                freezer.kill()  # what unblocks a loop stuck in the kernel's lock wait
                return

    async def ticker() -> None:
        while True:
            beat[0] = time.monotonic()
            await asyncio.sleep(0.01)

    dog = threading.Thread(target=watchdog, daemon=True)
    tick = asyncio.create_task(ticker())
    try:
        assert freezer.stdout is not None
        assert (await asyncio.wait_for(asyncio.to_thread(freezer.stdout.readline), WAIT)).strip() == "frozen"
        dog.start()
        acked: set[str] = set()
        for n in range(20):
            first = asyncio.create_task(a.put("c", f"a{n}", {"n": n}))
            second = asyncio.create_task(b.put("c", f"b{n}", {"n": n}))
            await asyncio.wait_for(asyncio.gather(first, second), WAIT)
            acked |= {f"a{n}", f"b{n}"}
        assert not stalled, f"the event loop stopped for {stalled[0]:.1f} s behind a frozen process's slot locks"
        await check(tmp_path, [a, b], acked)
        assert puts_of(tmp_path, "b0") == [{"n": 0}]
    finally:
        done.set()
        tick.cancel()
        freezer.kill()
        freezer.wait()
        await a.close()
        await b.close()


@pytest.mark.parametrize("delay", ["claimed+1.6", "claimed+3.2"])
async def test_a_writer_whose_wait_times_out_while_its_record_is_claimed_learns_its_fate(
        tmp_path: Path, delay: str) -> None:
    """The holder claims the writer's record and then stalls past the writer's lock timeout (1 s). The writer's
    wait times out with its record claimed, so it cannot withdraw it: it waits (one more lock timeout) at its door
    for the holder's verdict. Committed within that time (``+1.6``): the put returns, the record in its view and on
    disk once. Not within it (``+3.2``): LockTimeoutError saying the write may still be committed, and it is,
    once, and the writer's view gets it at its next read."""
    follower = await JsonStore.open(StoreConfig(backend="json", path=str(tmp_path), lock_timeout=1, source="tests"))
    holder = Holder(tmp_path, delay)
    try:
        put = await offer_f(holder, follower, tmp_path)
        holder.go()
        await holder.until("PAUSED")
        if delay == "claimed+1.6":
            await asyncio.wait_for(put, WAIT)
            assert await follower.get("c", "f") == {"v": 1}  # before the holder's acknowledgement: its own view
        else:
            with pytest.raises(LockTimeoutError, match="may still commit it"):
                await asyncio.wait_for(put, WAIT)
        await holder.until("ACK h3")
        assert await follower.get("c", "f") == {"v": 1}
        assert puts_of(tmp_path, "f") == [{"v": 1}], "committed exactly once"
        holder.kill()
        await follower.put("c", "f", {"v": 2})
        on_disk = await check(tmp_path, [follower], holder.acked() | {"f"})
        assert on_disk["f"] == {"v": 2}
    finally:
        holder.kill()
        await follower.close()


def line_of(folder: Path, key: str) -> int:
    """The number of the journal line that holds the last put of ``key``."""
    found = -1
    for number, line in enumerate((folder / JOURNAL_NAME).read_bytes().split(b"\n")[1:]):
        if line.strip() and any(op[0] == "p" and op[2] == key for op in orjson.loads(line)):
            found = number
    return found


async def test_a_writer_offers_only_while_its_fsyncs_are_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``holding.OFFER_MIN_SYNC``: a writer whose commits' fsyncs are fast (its estimate under the threshold) waits
    for the lock and commits its own record, as without slots; one whose fsyncs are slow offers it, and the
    holder's next commit carries it in its own journal line."""
    monkeypatch.setattr(holding, "OFFER_MIN_SYNC", 0.0005)
    keep_leases(monkeypatch, 5.0, 1.0)
    a = await JsonStore.open(cfg(tmp_path))
    b = await JsonStore.open(cfg(tmp_path))
    try:
        for n in range(3):
            await a.put("c", f"a{n}", {"n": n})
        assert a._lease.held
        b._offer_estimate = 0.0001  # fast fsyncs: no offer
        put = asyncio.create_task(b.put("c", "b", {"n": 1}))
        await asyncio.sleep(0.2)
        assert OFFERED not in (tmp_path / SLOTS_NAME).read_bytes()[:COUNT * _STRIDE][::_STRIDE]
        await asyncio.wait_for(put, WAIT)  # once a's lease lets go
        assert puts_of(tmp_path, "b") == [{"n": 1}]
        for n in range(3, 6):
            await a.put("c", f"a{n}", {"n": n})
        assert a._lease.held
        b._offer_estimate = 0.002  # slow fsyncs: offered
        put = asyncio.create_task(b.put("c", "b", {"n": 2}))
        await offered(tmp_path)
        await a.put("c", "a9", {"n": 9})
        await asyncio.wait_for(put, WAIT)
        assert line_of(tmp_path, "b") == line_of(tmp_path, "a9"), "the holder's commit carried the offer"
        await check(tmp_path, [a, b], {"a0", "a1", "a2", "a3", "a4", "a5", "a9", "b"})
    finally:
        await a.close()
        await b.close()


async def test_a_cancelled_writer_that_cannot_withdraw_at_once_leaves_no_offer_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer cancelled while its record is offered finds its slot's mutex taken (a holder looking at it this
    moment): it cannot tell offered from claimed, so it waits at its door for the holder's verdict or its letting
    go, and then withdraws the offer. Nothing of it is ever committed, and a later holder never finds it there:
    a stale offer committed after the writer's next, acknowledged put of the same key would undo that put."""
    keep_leases(monkeypatch, 1.0, 1.0)
    a = await JsonStore.open(cfg(tmp_path))
    b = await JsonStore.open(cfg(tmp_path))
    try:
        for n in range(3):
            await a.put("c", f"a{n}", {"n": n})  # a hot lease: a keeps the lock a while
        assert a._lease.held
        put = asyncio.create_task(b.put("c", "b", {"n": 1}))
        await offered(tmp_path)
        slots = b._slots
        try_lock = slots._try_lock
        busy = [True]

        def once_busy(index: int) -> bool:
            if busy and index == slots.index:
                busy.clear()
                return False
            return try_lock(index)

        monkeypatch.setattr(slots, "_try_lock", once_busy)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(put, WAIT)
        assert not busy, "the withdrawal found the mutex taken"
        heads = (tmp_path / SLOTS_NAME).read_bytes()[:COUNT * _STRIDE]
        assert OFFERED not in heads[::_STRIDE], "the offer was left standing"
        await b.put("c", "b", {"n": 2})  # acknowledged
        for n in range(3, 6):
            await a.put("c", f"a{n}", {"n": n})
        assert puts_of(tmp_path, "b") == [{"n": 2}], "the cancelled offer was never committed"
        await check(tmp_path, [a, b], {"a0", "a1", "a2", "a3", "a4", "a5", "b"})
    finally:
        await a.close()
        await b.close()


async def slots_tracer(holder: Holder | subprocess.Popen[str], folder: Path, when: str) -> subprocess.Popen[str]:
    """strace attached to the holder (or another process), failing its ``pwrite`` calls on ``storage.slots`` with
    EIO at ``when`` (strace's syntax: ``2`` the second one, ``2+`` the second and every later one). The holder's
    first is the header of its claim, the second its mark after the commit."""
    pid = holder.pid if isinstance(holder, subprocess.Popen) else holder.proc.pid
    tracer = subprocess.Popen(["strace", "-f", "-o", os.devnull, "-p", str(pid),
                               "-P", str(folder / SLOTS_NAME), "-e", "trace=pwrite64",
                               "-e", f"inject=pwrite64:error=EIO:when={when}"], stderr=subprocess.PIPE, text=True)
    assert tracer.stderr is not None
    attached = await asyncio.wait_for(asyncio.to_thread(tracer.stderr.readline), WAIT)
    assert "attached" in attached, attached
    return tracer


async def outcome(holder: Holder) -> str:
    """The holder's next ``ACK`` or ``FAIL`` line."""
    while True:
        line = await holder.until("")
        if line.startswith(("ACK", "FAIL")):
            return line


async def holder_view(holder: Holder) -> dict[str, Any]:
    assert holder.proc.stdin is not None
    holder.proc.stdin.write("view\n")
    holder.proc.stdin.flush()
    return orjson.loads((await holder.until("VIEW"))[len("VIEW "):])  # type: ignore[no-any-return]


def all_puts_of(folder: Path, key: str) -> list[Any]:
    """:func:`puts_of` over the journal and the generation a compaction kept (``storage.journal.<N>``)."""
    found = []
    for path in sorted(folder.glob(JOURNAL_NAME + "*")):
        for line in path.read_bytes().split(b"\n")[1:]:
            if line.strip():
                found += [op[3] for op in orjson.loads(line) if op[0] == "p" and op[2] == key]
    return found


def stop_tracer(tracer: subprocess.Popen[str] | None) -> None:
    if tracer is not None and tracer.poll() is None:
        tracer.kill()
        tracer.communicate(timeout=WAIT)


@contextlib.asynccontextmanager
async def failing_mark(folder: Path, point: str, when: str) -> AsyncIterator[
        tuple[JsonStore, Holder, asyncio.Task[None], subprocess.Popen[str] | None]]:
    """A follower store, a holder process (``point``, tests/_slots_child.py) whose ``pwrite`` of marks on
    ``storage.slots`` strace fails (``when``: once, ``2``, or from then on, ``2+``), the follower's put of ``f``
    offered to it and the holder told to save: yields them and the tracer (stopped at the end, with the rest)."""
    problem = strace_problem()
    if problem:
        pytest.skip(problem)
    follower = await JsonStore.open(cfg(folder))
    holder = Holder(folder, point)
    tracer: subprocess.Popen[str] | None = None
    try:
        assert await holder.until("READY") == "READY leased"
        tracer = await slots_tracer(holder, folder, when)
        put = asyncio.create_task(follower.put("c", "f", {"v": 1}))
        await offered(folder)
        holder.go()
        yield follower, holder, put, tracer
    finally:
        stop_tracer(tracer)
        holder.kill()
        await follower.close()


@pytest.mark.parametrize("when", ["2", "2+"])
async def test_a_holder_that_cannot_mark_a_published_claim_keeps_every_record(tmp_path: Path, when: str) -> None:
    """strace fails the holder's ``pwrite`` of its COMMITTED mark on ``storage.slots`` (once, or from then on),
    after the record that carries the writer's is durable and published. The holder's save is acknowledged (its
    record stays on disk and in its view: it used to be reported failed and rewritten away from the files), the
    holder lets go, and the writer learns from the journal that its record was committed: its put returns, the
    record is on disk once, and every view equals a fresh open's."""
    async with failing_mark(tmp_path, "none", when) as (follower, holder, put, tracer):
        assert await outcome(holder) == "ACK h3", f"a published save reported failed: {holder.lines}"
        await asyncio.wait_for(put, WAIT)
        assert puts_of(tmp_path, "f") == [{"v": 1}], "the offered record committed exactly once"
        assert puts_of(tmp_path, "h3") == [{"by": "holder"}]
        holder.go()  # the holder takes the lock again (it let go after the unmarked claim) and goes on
        assert await outcome(holder) == "ACK h4"
        view = await holder_view(holder)
        stop_tracer(tracer)
        holder.proc.kill()  # the lock is free for the fresh open of check()
        _out, err = holder.proc.communicate(timeout=WAIT)
        assert "marking slot" in err, f"the mark's pwrite was not failed: {err}"
        on_disk = await check(tmp_path, [follower], holder.acked() | {"f"})
        assert view == on_disk, "the holder's view equals the disk"
        await follower.put("c", "f", {"v": 2})  # a later write of the key stays the last
        assert (await check(tmp_path, [follower], holder.acked() | {"f"}))["f"] == {"v": 2}
        assert puts_of(tmp_path, "f") == [{"v": 1}, {"v": 2}]


@pytest.mark.parametrize("when", ["2", "2+"])
async def test_a_compaction_after_an_unmarked_claim_commits_the_offer_once(tmp_path: Path, when: str) -> None:
    """The holder's mark of the writer's committed record fails (strace, as above) and the holder then compacts
    under the same lock (as a commit whose write failed does). The compaction first writes the verdict it could
    not (``2``: the retry succeeds, the journal is replaced) or, when that fails too (``2+``), is refused with
    StorageIOError and leaves the journal as it is. Either way the writer never takes its record for failed: it is
    committed once across the journal generations (a second copy, settled FAILED against the new journal, used to
    follow the compaction), and a later write of the key stays the last."""
    async with failing_mark(tmp_path, "compact", when) as (follower, holder, put, tracer):
        compacted = await holder.until("COMPACTED" if when == "2" else "REFUSED")
        assert compacted == "COMPACTED" or compacted.startswith("REFUSED 5 "), holder.lines
        assert await outcome(holder) == "ACK h3", holder.lines
        await asyncio.wait_for(put, WAIT)
        assert all_puts_of(tmp_path, "f") == [{"v": 1}], "the offered record committed exactly once"
        if when == "2+":
            assert puts_of(tmp_path, "h3") == [{"by": "holder"}], "the refused compaction left the journal as it was"
        view = await holder_view(holder)
        stop_tracer(tracer)
        holder.kill()
        assert view == await check(tmp_path, [follower], holder.acked() | {"f"})
        await follower.put("c", "f", {"v": 2})
        assert (await check(tmp_path, [follower], holder.acked() | {"f"}))["f"] == {"v": 2}


async def test_a_writer_whose_slot_is_emptied_after_the_verdict_does_not_commit_again(tmp_path: Path) -> None:
    """The holder commits the writer's offered record and marks it COMMITTED; before the writer reads its slot
    (SIGSTOPped meanwhile), ``storage.slots`` is truncated (the README warns against it; a person did it). The
    writer finds its slot empty: the journal since its offer holds its record, so it does not commit it a second
    time (which used to happen: two copies, the second after everything committed in between)."""
    writer = await writer_process(tmp_path, FOLLOWER)
    holder: Holder | None = None
    try:
        holder = await offered_to_holder(writer, tmp_path, "none")
        writer.send_signal(signal.SIGSTOP)
        holder.go()
        await holder.until("CLAIMED")
        assert await outcome(holder) == "ACK h3"
        assert puts_of(tmp_path, "dead") == [{"v": 1}], "the holder committed the offer"
        os.truncate(tmp_path / SLOTS_NAME, 0)
        holder.kill()  # the lock is free: the writer takes it and settles its offer
        writer.send_signal(signal.SIGCONT)
        acked = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)
        assert acked.strip() == "ACK dead"
        assert puts_of(tmp_path, "dead") == [{"v": 1}], "committed once"
        await check(tmp_path, [], holder.acked() | {"dead"})
    finally:
        if writer.poll() is None:
            writer.send_signal(signal.SIGCONT)
            writer.kill()
            writer.communicate(timeout=WAIT)
        if holder is not None:
            holder.kill()


async def test_a_slots_file_truncated_before_the_mark_still_gets_the_verdict(tmp_path: Path) -> None:
    """``storage.slots`` is truncated while the holder's commit that carries the writer's record is between its
    publish and its mark. The holder writes the verdict where it knows it belongs (the slot read as nothing at
    all, never as another offer) and opens both of the slot's doors: the writer's put returns at its door, while
    the holder keeps the lock (it used to find a verdict without a journal position and wait for the lock, which
    the holder's lease kept), and its record is on disk once."""
    follower = await JsonStore.open(cfg(tmp_path))
    holder = Holder(tmp_path, "published+1.5")
    try:
        put = await offer_f(holder, follower, tmp_path)
        holder.go()
        await holder.until("PAUSED published")
        os.truncate(tmp_path / SLOTS_NAME, 0)
        assert await outcome(holder) == "ACK h3"
        await asyncio.wait_for(put, WAIT)
        assert not follower._flock.held and await follower.get("c", "f") == {"v": 1}
        assert puts_of(tmp_path, "f") == [{"v": 1}]
        holder.kill()
        await follower.put("c", "f", {"v": 2})
        assert (await check(tmp_path, [follower], holder.acked() | {"f"}))["f"] == {"v": 2}
        assert puts_of(tmp_path, "f") == [{"v": 1}, {"v": 2}]
    finally:
        holder.kill()
        await follower.close()


async def test_an_offer_a_holder_does_not_look_for_is_committed_by_its_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder that found no other store owning a slot when it took the lock neither closes the doors nor reads
    the slots at its commits (json/slots.py ``close_doors``). A store that had no slot then (all taken at its
    open) and takes one later offers into that holding: its door is open, it finds its offer standing, waits for
    the lock giving the wait sign, and commits its record itself, once; the holder's next holding claims its next
    offer as usual."""
    keep_leases(monkeypatch, 1.0, 0.05)
    a = await JsonStore.open(cfg(tmp_path))
    fillers = [await JsonStore.open(cfg(tmp_path)) for _ in range(COUNT - 1)]
    b = await JsonStore.open(cfg(tmp_path))
    try:
        assert b._slots.index < 0, "every slot was taken at b's open"
        for filler in fillers:
            await filler.close()
        fillers = []
        for n in range(3):
            await a.put("c", f"a{n}", {"n": n})  # a hot lease, taken with no other slot owner
        assert a._lease.held and not a._slots.doors_closed
        put = asyncio.create_task(b.put("c", "b", {"n": 1}))
        await offered(tmp_path)
        await a.put("c", "a3", {"n": 3})  # not claimed; a lets go after HOLD, b waiting
        await asyncio.wait_for(put, WAIT)
        assert puts_of(tmp_path, "b") == [{"n": 1}] and line_of(tmp_path, "b") != line_of(tmp_path, "a3")
        for n in range(4, 7):
            await a.put("c", f"a{n}", {"n": n})  # a takes the lock again: b owns a slot now
        assert a._lease.held and a._slots.doors_closed
        put = asyncio.create_task(b.put("c", "b", {"n": 2}))
        await offered(tmp_path)
        await a.put("c", "a9", {"n": 9})
        await asyncio.wait_for(put, WAIT)
        assert line_of(tmp_path, "b") == line_of(tmp_path, "a9"), "claimed by the holder's commit"
        assert puts_of(tmp_path, "b") == [{"n": 1}, {"n": 2}]
        await check(tmp_path, [a, b], {f"a{n}" for n in (0, 1, 2, 3, 4, 5, 6, 9)} | {"b"})
    finally:
        for store in [a, b, *fillers]:
            await store.close()




async def saves_until_acked(holder: JsonStore, writer: subprocess.Popen[str], first: int) -> int:
    """The holder saves ``a<first>``, ``a<first+1>``... (its lease stays hot) until the writer acknowledges its
    put of ``w``, for up to 3 s; returns the number after the last key saved."""
    assert writer.stdout is not None
    ack = asyncio.ensure_future(asyncio.to_thread(writer.stdout.readline))
    loop = asyncio.get_running_loop()
    until = loop.time() + 3.0
    n = first
    while not ack.done() and loop.time() < until:
        await holder.put("c", f"a{n}", {"n": n})
        n += 1
        await asyncio.sleep(0.001)
    assert ack.done(), "the writer waited at a door closed again while the holder kept the lock"
    assert ack.result().strip() == "ACK w"
    return n


def close_writer(writer: subprocess.Popen[str]) -> None:
    assert writer.stdin is not None
    writer.stdin.write("close\n")
    writer.stdin.flush()
    writer.communicate(timeout=WAIT)


def stop_writer(writer: subprocess.Popen[str], stopped: bool) -> None:
    if stopped:
        writer.send_signal(signal.SIGCONT)
    if writer.poll() is None:
        writer.kill()
        writer.communicate(timeout=WAIT)


async def blocked_at_a_door(folder: Path) -> None:
    """Until a process is blocked in the kernel waiting for a read lock on a door of ``folder``'s slots file (its
    ``F_OFD_SETLKW``, /proc/locks' ``->`` lines)."""
    ino = (folder / SLOTS_NAME).stat().st_ino
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        lines = Path("/proc/locks").read_text().splitlines()
        if any("->" in line and f":{ino} " in line and " READ " in line for line in lines):
            return
        assert asyncio.get_running_loop().time() < deadline, "the writer never waited at its door"
        await asyncio.sleep(0.005)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
async def test_a_writer_not_running_when_its_door_opened_is_not_shut_in_by_the_next_holder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unlock only wakes the process blocked on the door; it takes the lock when it runs. A writer stopped from
    the holder's mark (its record committed, its door opened) until after the holder let go of the lock and took it
    again found its door closed again, and waited there (its slot COMMITTED, no wait sign) for as long as the
    holder kept a hot lease: here while it saved for 3 s. The holder that takes the lock opens the doors of the
    slots already decided: the writer's put returns while the holder goes on saving."""
    keep_leases(monkeypatch, 1.0, 5.0)  # a waiter's sign would not end the lease within the test's 3 s
    writer = await writer_process(tmp_path, STOPPABLE)
    holder = await JsonStore.open(cfg(tmp_path))
    stopped = False
    try:
        assert (await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)).strip() == "OPEN"
        for n in range(3):
            await holder.put("c", f"a{n}", {"n": n})
        assert holder._lease.held
        writer.stdin.write("put\n")
        writer.stdin.flush()
        await offered(tmp_path)
        await blocked_at_a_door(tmp_path)
        writer.send_signal(signal.SIGSTOP)
        stopped = True
        await holder.put("c", "a3", {"n": 3})  # claims the writer's record, marks it, opens its door
        assert line_of(tmp_path, "w") == line_of(tmp_path, "a3"), "the holder's commit carried the offer"
        async with holder.transaction() as tx:  # another use of the lock: the lease lets go (every door opens) and
            await tx.put("c", "t", {"n": 0})  # it is taken again (every free door closes)
        for n in range(4, 7):
            await holder.put("c", f"a{n}", {"n": n})  # a hot lease again
        assert holder._lease.held
        writer.send_signal(signal.SIGCONT)
        stopped = False
        n = await saves_until_acked(holder, writer, 7)
        assert puts_of(tmp_path, "w") == [{"v": 1}]
        await check(tmp_path, [holder], {f"a{i}" for i in range(n)} | {"t", "w"})
        close_writer(writer)
    finally:
        stop_writer(writer, stopped)
        await holder.close()


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
async def test_a_writer_not_running_when_its_holder_died_is_not_shut_in_by_the_next_holder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race after a holder's death: the holder dies with the writer's record published, its locks (the
    writer's door among them) go with it, but the writer, not running, finds its door closed again by the next
    holder, which settles the slot COMMITTED from the journal. That settle opens the writer's door as a mark does
    (before, the door stayed closed while the new holder's lease was hot)."""
    keep_leases(monkeypatch, 1.0, 5.0)
    survivor = await JsonStore.open(cfg(tmp_path))  # before the holder: its open needs the lock
    writer = await writer_process(tmp_path, STOPPABLE)
    holder: Holder | None = None
    stopped = False
    try:
        holder = await offered_to_holder(writer, tmp_path, "published")
        await blocked_at_a_door(tmp_path)
        writer.send_signal(signal.SIGSTOP)
        stopped = True
        holder.go()
        await holder.until("PAUSED")  # the writer's record committed and published, the slot not marked
        holder.kill()
        for n in range(3):
            await survivor.put("c", f"a{n}", {"n": n})  # settles the claim, then a hot lease
        assert survivor._lease.held
        writer.send_signal(signal.SIGCONT)
        stopped = False
        n = await saves_until_acked(survivor, writer, 3)
        assert puts_of(tmp_path, "w") == [{"v": 1}], "committed once, by the dead holder"
        await check(tmp_path, [survivor], {f"a{i}" for i in range(n)} | holder.acked() | {"w"})
        close_writer(writer)
    finally:
        stop_writer(writer, stopped)
        if holder is not None:
            holder.kill()
        await survivor.close()


async def test_a_writer_searching_a_large_journal_for_its_wiped_offer_leaves_the_loop_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower's offer is wiped (``storage.slots`` truncated) before the holder claims it, and the holder then
    commits 16 MB. When the follower takes the lock and finds its slot empty, it searches those 16 MB for its record
    (json/offer_search.py) in a worker thread: the event loop goes on meanwhile (it ran on the loop's thread, which
    could stall it far beyond 20 ms: here the search waits for the loop to tick, for at most 5 s). Not found, the
    follower commits the record itself, once."""
    follower = await JsonStore.open(cfg(tmp_path))
    holder = Holder(tmp_path, "none")
    ticked = threading.Event()
    seen: list[object] = []
    search = Slots.found_in_journal

    def searching(self: Slots, journal_path: str, now: tuple[int, int] | None) -> bool:
        seen.append(threading.get_ident())
        ticked.clear()
        found = search(self, journal_path, now)
        seen.append(ticked.wait(5.0))  # the loop's ticker runs meanwhile, unless this runs on the loop
        return found

    async def ticker() -> None:
        while True:
            ticked.set()
            await asyncio.sleep(0.001)

    monkeypatch.setattr(Slots, "found_in_journal", searching)
    ticking = asyncio.create_task(ticker())
    try:
        put = await offer_f(holder, follower, tmp_path)
        os.truncate(tmp_path / SLOTS_NAME, 0)  # the offer wiped before any claim
        assert holder.proc.stdin is not None
        holder.proc.stdin.write("fill 16\n")
        holder.proc.stdin.flush()
        await holder.until("FILLED")
        holder.kill()  # the lock is free: the follower takes it and finds its slot empty
        await asyncio.wait_for(put, WAIT)
        assert seen[:1] != [threading.get_ident()] and seen[1:] == [True], "the search ran off the loop's thread"
        assert all_puts_of(tmp_path, "f") == [{"v": 1}], "not found in the journal: committed by its writer, once"
        await check(tmp_path, [follower], holder.acked() | {"f"})
    finally:
        ticking.cancel()
        holder.kill()
        await follower.close()


@pytest.mark.parametrize("when", ["1", "1+"])
async def test_a_claim_whose_verdict_cannot_be_written_stops_no_write(tmp_path: Path, when: str) -> None:
    """The holder dies between publishing the record that carries the writer's offer and marking it: the slot
    stays CLAIMED. The next holder's ``pwrite`` on ``storage.slots`` fails (strace: its first one, or every one):
    its open and saves still succeed (they used to fail with StorageIOError for as long as the file failed: the
    verdict, derived from the journal, could not be written), only its compaction is refused while the verdict is
    unwritten, with an error naming ``storage.slots``, and goes on by itself once the file works. The writer's put
    returns; its record is committed once across the journal generations."""
    problem = strace_problem()
    if problem:
        pytest.skip(problem)
    writer = await writer_process(tmp_path, FOLLOWER)
    holder: Holder | None = None
    second: Holder | None = None
    tracer: subprocess.Popen[str] | None = None
    stopped = False
    try:
        holder = await offered_to_holder(writer, tmp_path, "published")
        writer.send_signal(signal.SIGSTOP)
        stopped = True
        holder.go()
        await holder.until("PAUSED published")
        second = Holder(tmp_path, "none")  # its open waits for the lock
        tracer = await slots_tracer(second, tmp_path, when)
        holder.kill()  # the claim is left CLAIMED, its record published
        assert (await second.until("READY")).startswith("READY"), second.lines
        assert second.proc.stdin is not None
        second.go()
        assert await outcome(second) == "ACK h3", "a write proceeds while storage.slots fails"
        second.proc.stdin.write("compact\n")
        second.proc.stdin.flush()
        if when == "1+":
            refused = await second.until("REFUSED")
            assert refused.startswith("REFUSED 5 ") and SLOTS_NAME in refused, refused
            stop_tracer(tracer)  # the file works again
            second.proc.stdin.write("compact\n")
            second.proc.stdin.flush()
        assert await second.until("COMPACTED") == "COMPACTED", second.lines
        writer.send_signal(signal.SIGCONT)
        stopped = False
        assert writer.stdout is not None
        acked = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)
        assert acked.strip() == "ACK dead"
        assert all_puts_of(tmp_path, "dead") == [{"v": 1}], "the offered record committed exactly once"
        stop_tracer(tracer)
        second.proc.kill()
        _out, err = second.proc.communicate(timeout=WAIT)
        assert err.count("settling slot") == 1, f"the failure reported once: {err}"
        await check(tmp_path, [], holder.acked() | second.acked() | {"dead"})
    finally:
        stop_tracer(tracer)
        stop_writer(writer, stopped)
        for proc in (holder, second):
            if proc is not None:
                proc.kill()


async def test_a_slots_file_truncated_across_a_compaction_commits_the_offer_once(tmp_path: Path) -> None:
    """The holder commits the writer's offered record, marks it COMMITTED and compacts (the journal replaced);
    ``storage.slots`` is then truncated before the writer (SIGSTOPped) read its verdict. The writer finds its slot
    empty and the journal another file: it finds its record in the kept previous generation (json/offer_search.py)
    and does not commit it again (which it did: two copies, the second after everything committed in between)."""
    writer = await writer_process(tmp_path, FOLLOWER)
    holder: Holder | None = None
    stopped = False
    try:
        holder = await offered_to_holder(writer, tmp_path, "compact")
        writer.send_signal(signal.SIGSTOP)
        stopped = True
        holder.go()
        await holder.until("CLAIMED")
        assert await holder.until("COMPACTED") == "COMPACTED"
        assert await outcome(holder) == "ACK h3"
        os.truncate(tmp_path / SLOTS_NAME, 0)
        holder.kill()
        writer.send_signal(signal.SIGCONT)
        stopped = False
        assert writer.stdout is not None
        acked = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)
        assert acked.strip() == "ACK dead"
        assert all_puts_of(tmp_path, "dead") == [{"v": 1}], "committed once across the journal generations"
        await check(tmp_path, [], holder.acked() | {"dead"})
    finally:
        stop_writer(writer, stopped)
        if holder is not None:
            holder.kill()


TAKER = 'KEY = "t"' + WRITER


@pytest.mark.parametrize("when", ["3", "3+"])
async def test_a_writer_that_cannot_take_its_offer_back_gives_its_slot_up(tmp_path: Path, when: str) -> None:
    """A writer offers its put; the holder lets go without claiming it (killed); the writer takes the lock, and its
    ``pwrite`` emptying its slot fails (strace: its third on ``storage.slots``, after the offer's two; once or
    from then on). It gives the slot up and commits its record itself: the put returns (it used to fail with
    StorageIOError, the slot left OFFERED and owned, and the next holder claimed it and committed the write its
    writer had been told failed). The next holder claims nothing; the record is on disk once."""
    problem = strace_problem()
    if problem:
        pytest.skip(problem)
    writer = await writer_process(tmp_path, TAKER)
    holder: Holder | None = None
    second: Holder | None = None
    tracer: subprocess.Popen[str] | None = None
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert (await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)).strip() == "OPEN"
        tracer = await slots_tracer(writer, tmp_path, when)
        holder = Holder(tmp_path, "none")
        assert await holder.until("READY") == "READY leased"
        writer.stdin.write("put\n")
        writer.stdin.flush()
        await offered(tmp_path)
        holder.kill()  # unclaimed: the writer takes the lock and takes its offer back
        acked = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)
        assert acked.strip() == "ACK t", acked
        second = Holder(tmp_path, "none")
        assert (await second.until("READY")).startswith("READY")
        second.go()
        assert await outcome(second) == "ACK h3"
        assert not [line for line in second.lines if line.startswith("CLAIMED")], second.lines
        assert puts_of(tmp_path, "t") == [{"v": 1}], "committed once, by its writer"
        second.kill()
        writer.stdin.write("close\n")
        writer.stdin.flush()
        writer.communicate(timeout=WAIT)
        stop_tracer(tracer)
        await check(tmp_path, [], holder.acked() | second.acked() | {"t"})
    finally:
        stop_tracer(tracer)
        stop_writer(writer, False)
        for proc in (holder, second):
            if proc is not None:
                proc.kill()


@pytest.mark.parametrize("truncated", ["before", "after"])
async def test_a_writer_finds_its_record_across_compactions_and_a_truncated_slots_file(
        tmp_path: Path, truncated: str) -> None:
    """The holder commits the writer's offered record, marks it COMMITTED and writes the key again; before the
    writer (SIGSTOPped) read its verdict, the holder compacts twice, and ``storage.slots`` is truncated ``before`` or
    ``after`` those compactions. The writer finds its slot empty and searches the journal since its offer: every
    generation from its own was kept while it waited (its since byte), so it finds its record and does not commit
    it again (it did: the kept generation was one back, and its second copy undid the holder's later write). The
    next compaction removes the generations kept for it."""
    writer = await writer_process(tmp_path, FOLLOWER)
    holder: Holder | None = None
    second: Holder | None = None
    stopped = False
    try:
        holder = await offered_to_holder(writer, tmp_path, "none")
        writer.send_signal(signal.SIGSTOP)
        stopped = True
        holder.go()
        await holder.until("CLAIMED")
        assert await outcome(holder) == "ACK h3"
        assert holder.proc.stdin is not None
        holder.proc.stdin.write("put dead\n")  # a later write of the writer's key
        holder.proc.stdin.flush()
        assert await outcome(holder) == "ACK dead"
        if truncated == "before":
            os.truncate(tmp_path / SLOTS_NAME, 0)
        for _ in range(2):
            holder.proc.stdin.write("compact\n")
            holder.proc.stdin.flush()
            assert await holder.until(("COMPACTED", "REFUSED")) == "COMPACTED", holder.lines
        assert len(list(tmp_path.glob(JOURNAL_NAME + ".*"))) == 2, "both generations kept for the writer"
        if truncated == "after":
            os.truncate(tmp_path / SLOTS_NAME, 0)
        holder.kill()
        writer.send_signal(signal.SIGCONT)
        stopped = False
        assert writer.stdout is not None
        acked = await asyncio.wait_for(asyncio.to_thread(writer.stdout.readline), WAIT)
        assert acked.strip() == "ACK dead"
        assert all_puts_of(tmp_path, "dead") == [{"v": 1}, {"by": "holder"}], "committed once, the later write last"
        second = Holder(tmp_path, "none")
        assert (await second.until("READY")).startswith("READY")
        assert second.proc.stdin is not None
        second.proc.stdin.write("compact\n")
        second.proc.stdin.flush()
        assert await second.until(("COMPACTED", "REFUSED")) == "COMPACTED", second.lines
        assert len(list(tmp_path.glob(JOURNAL_NAME + ".*"))) == 1, "the generations kept for the writer removed"
        second.kill()
        on_disk = await check(tmp_path, [], holder.acked() | second.acked() | {"dead"})
        assert on_disk["dead"] == {"by": "holder"}, "the later write of the key stays the last"
    finally:
        stop_writer(writer, stopped)
        for proc in (holder, second):
            if proc is not None:
                proc.kill()


def test_the_generations_kept_for_a_waiting_writer_stop_at_what_its_search_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """json/journal.py ``_drop_older``: the kept files a waiting writer needs (its since byte, ``kept_needed``) stay,
    newest first, up to what its journal search reads at most; older ones, and all of them once nobody needs them,
    are removed (a writer frozen while it waits never makes them grow with every compaction)."""
    monkeypatch.setattr(journal_module, "SEARCH_MAX", 2500)
    journal = Journal(tmp_path / JOURNAL_NAME)
    for generation in range(3, 9):
        (tmp_path / f"{JOURNAL_NAME}.{generation}").write_bytes(b"x" * 1000)
    journal._drop_older(8, lambda generation: generation >= 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{JOURNAL_NAME}.7", f"{JOURNAL_NAME}.8"]
    journal._drop_older(8, lambda generation: False)
    assert list(tmp_path.iterdir()) == []
