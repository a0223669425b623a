"""GroupCommit on its own: real asyncio, a real lock, failures injected by a write function that raises.

The JSON backend's journal and message log both commit through it; their own tests cover the files. These pin down
the loop's promises: each caller gets its own outcome, writers that queue during a commit share the next one, a
failed round fails every waiter of that round (and acknowledges none of them) while later rounds work, a rejected
item fails alone, and cancellation and shutdown behave.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from storage.backends.json import group_commit
from storage.backends.json.group_commit import Failed, GroupCommit
from tests._turns import turns_during


class Disk:
    """The write side of a GroupCommit: records each committed round; failures and a pause injected on demand."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.rounds: list[list[int]] = []  # the items of every round that committed, in commit order
        self.attempts = 0
        self.failures: dict[int, BaseException] = {}  # write attempt (from 1) -> raised after its outcomes
        self.lock_attempts = 0
        self.lock_failures: set[int] = set()  # lock attempts (from 1) that time out
        self.reject: set[int] = set()  # items rejected on their own (Failed)
        self.gate: asyncio.Event | None = None  # when set, a write waits for it (a commit in progress)
        self.writing = asyncio.Event()
        self.after_calls = 0

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        self.lock_attempts += 1
        async with self.lock:
            if self.lock_attempts in self.lock_failures:
                raise TimeoutError("lock busy")  # as the store's file lock does after its timeout
            yield

    async def write(self, items: list[int], outcomes: list[int | Failed]) -> None:
        assert self.lock.locked(), "write must run under the lock"
        self.attempts += 1
        for item in items:
            outcomes.append(Failed(ValueError(f"bad item {item}")) if item in self.reject else item * 10)
        self.writing.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.attempts in self.failures:
            raise self.failures[self.attempts]
        self.rounds.append(list(items))

    async def after(self) -> None:
        assert not self.lock.locked(), "after runs outside the lock"
        self.after_calls += 1

    def commit(self, *, after: bool = False, solo: bool = False) -> GroupCommit[int, int]:
        return GroupCommit(self.locked, self.write, after=self.after if after else None, solo=solo)


async def test_each_caller_gets_its_own_result() -> None:
    disk = Disk()
    gc = disk.commit()
    results = await asyncio.gather(*(gc.submit(i) for i in range(50)))
    assert results == [i * 10 for i in range(50)]
    assert sorted(i for r in disk.rounds for i in r) == list(range(50))


async def test_concurrent_submitters_share_one_commit() -> None:
    disk = Disk()
    gc = disk.commit()
    await asyncio.gather(*(gc.submit(i) for i in range(100)))
    assert disk.rounds == [list(range(100))]  # all queued before the leader ran: one round, in submission order


async def test_writers_arriving_during_a_commit_share_the_next_one() -> None:
    disk = Disk()
    disk.gate = asyncio.Event()
    gc = disk.commit()
    first = asyncio.create_task(gc.submit(0))
    await disk.writing.wait()  # round 1 holds the lock and is "fsyncing"
    later = [asyncio.create_task(gc.submit(i)) for i in range(1, 20)]
    await asyncio.sleep(0)
    assert not first.done()  # not acknowledged before its write returned
    disk.gate.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [i * 10 for i in range(1, 20)]
    assert disk.rounds == [[0], list(range(1, 20))]  # 20 writers, 2 commits


async def test_a_failed_round_fails_every_waiter_and_later_rounds_work() -> None:
    disk = Disk()
    disk.gate = asyncio.Event()
    boom = OSError("disk full")
    disk.failures[2] = boom  # the second round (items 1-5) fails
    gc = disk.commit()
    first = asyncio.create_task(gc.submit(0))
    await disk.writing.wait()
    group = [asyncio.create_task(gc.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    disk.gate.set()
    assert await first == 0
    outcomes = await asyncio.gather(*group, return_exceptions=True)
    assert all(o is boom for o in outcomes)  # the same exception for every waiter, no result for any of them
    assert disk.rounds == [[0]]
    assert await asyncio.gather(*(gc.submit(i) for i in range(6, 9))) == [60, 70, 80]
    assert disk.rounds == [[0], [6, 7, 8]]


async def test_a_rejected_item_fails_alone() -> None:
    disk = Disk()
    disk.reject = {3}
    gc = disk.commit()
    outcomes = await asyncio.gather(*(gc.submit(i) for i in range(6)), return_exceptions=True)
    assert isinstance(outcomes[3], ValueError) and "bad item 3" in str(outcomes[3])
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 10, 20, 40, 50]


async def test_a_rejected_item_keeps_its_own_error_when_the_round_fails() -> None:
    disk = Disk()
    disk.reject = {1}
    disk.failures[1] = OSError("fsync failed")
    gc = disk.commit()
    outcomes = await asyncio.gather(*(gc.submit(i) for i in range(3)), return_exceptions=True)
    assert isinstance(outcomes[1], ValueError)  # its own error, not the round's
    assert isinstance(outcomes[0], OSError) and outcomes[0] is outcomes[2] is disk.failures[1]
    assert disk.rounds == []


async def test_a_lock_timeout_fails_everyone_queued() -> None:
    disk = Disk()
    disk.lock_failures = {1}
    gc = disk.commit()
    outcomes = await asyncio.gather(*(gc.submit(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert disk.attempts == 0  # nothing was written
    assert await gc.submit(9) == 90


async def test_writers_queued_while_the_lock_is_busy_share_one_commit() -> None:
    disk = Disk()
    gc = disk.commit()
    await disk.lock.acquire()  # another user of the store's lock (a transaction, a prune)
    first = asyncio.create_task(gc.submit(0))
    for _ in range(5):
        await asyncio.sleep(0)  # the leader is now waiting for the lock
    rest = [asyncio.create_task(gc.submit(i)) for i in range(1, 10)]
    await asyncio.sleep(0)
    disk.lock.release()
    assert [await first, *await asyncio.gather(*rest)] == [i * 10 for i in range(10)]
    assert disk.rounds == [list(range(10))]


async def test_a_caller_cancelled_while_queued_is_not_written() -> None:
    disk = Disk()
    disk.gate = asyncio.Event()
    gc = disk.commit()
    first = asyncio.create_task(gc.submit(0))
    await disk.writing.wait()
    doomed = asyncio.create_task(gc.submit(1))
    kept = asyncio.create_task(gc.submit(2))
    await asyncio.sleep(0)
    doomed.cancel()
    disk.gate.set()
    assert await first == 0
    assert await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert disk.rounds == [[0], [2]]


async def test_a_caller_cancelled_during_its_commit_is_still_written() -> None:
    disk = Disk()
    disk.gate = asyncio.Event()
    gc = disk.commit()
    a = asyncio.create_task(gc.submit(1))
    b = asyncio.create_task(gc.submit(2))
    await disk.writing.wait()
    a.cancel()
    await asyncio.sleep(0)
    disk.gate.set()
    assert await b == 20
    assert a.cancelled()
    assert disk.rounds == [[1, 2]]


async def test_after_runs_after_each_good_round_only() -> None:
    disk = Disk()
    disk.failures[2] = OSError("eio")
    gc = disk.commit(after=True)
    await gc.submit(1)
    assert disk.after_calls == 1
    with pytest.raises(OSError):
        await gc.submit(2)
    assert disk.after_calls == 1
    await gc.submit(3)
    assert disk.after_calls == 2


async def test_wait_returns_when_everything_queued_is_settled() -> None:
    disk = Disk()
    gc = disk.commit()
    await gc.wait()  # idle: nothing to wait for
    disk.gate = asyncio.Event()
    tasks = [asyncio.create_task(gc.submit(i)) for i in range(5)]
    await disk.writing.wait()
    waiter = asyncio.create_task(gc.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()  # cancelling a waiter does not cancel the commit
    disk.gate.set()
    closing = asyncio.create_task(gc.wait())
    await closing
    assert all(t.done() for t in tasks) and disk.rounds == [list(range(5))]


async def test_a_cancelled_write_fails_its_round_and_the_next_submit_starts_over() -> None:
    disk = Disk()
    disk.failures[1] = asyncio.CancelledError()  # as when the leader itself is cancelled mid-write
    gc = disk.commit()
    outcomes = await asyncio.gather(*(gc.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    await gc.wait()
    assert await gc.submit(4) == 40
    assert disk.rounds == [[4]]


async def test_a_write_that_forgets_an_outcome_fails_the_round_instead_of_hanging() -> None:
    lock = asyncio.Lock()

    async def short(items: list[int], outcomes: list[int | Failed]) -> None:
        outcomes.extend(items[:-1])

    gc: GroupCommit[int, int] = GroupCommit(lambda: lock, short)
    outcomes = await asyncio.gather(*(gc.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


# -- the lone writer's fast path (solo=True, what the document journal uses) ---------------------------------------
def loop_turned() -> asyncio.Event:
    """An event set at the loop's next turn: still unset after an await means that await never yielded."""
    turned = asyncio.Event()
    asyncio.get_running_loop().call_soon(turned.set)
    return turned


async def test_a_lone_writer_commits_in_its_own_task_without_a_loop_turn() -> None:
    disk = Disk()
    gc = disk.commit(solo=True)
    turned = loop_turned()
    tasks_before = len(asyncio.all_tasks())
    assert await gc.submit(1) == 10
    assert not turned.is_set() and len(asyncio.all_tasks()) == tasks_before
    assert disk.rounds == [[1]]


async def test_concurrent_writers_still_share_a_commit_with_the_fast_path() -> None:
    """The first writer commits alone at once; every other one of the same loop turn joins one group."""
    disk = Disk()
    gc = disk.commit(solo=True)
    assert await asyncio.gather(*(gc.submit(i) for i in range(100))) == [i * 10 for i in range(100)]
    assert disk.rounds == [[0], list(range(1, 100))]


async def test_writers_arriving_during_a_lone_commit_share_the_next_one() -> None:
    disk = Disk()
    disk.gate = asyncio.Event()
    gc = disk.commit(solo=True)
    first = asyncio.create_task(gc.submit(0))
    await disk.writing.wait()  # the lone commit holds the lock and is "fsyncing"
    later = [asyncio.create_task(gc.submit(i)) for i in range(1, 20)]
    await asyncio.sleep(0)
    waiter = asyncio.create_task(gc.wait())
    await asyncio.sleep(0)
    assert not first.done() and not waiter.done()  # wait() waits for a lone commit too
    disk.gate.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [i * 10 for i in range(1, 20)]
    await waiter
    assert disk.rounds == [[0], list(range(1, 20))]


async def test_after_concurrency_one_queued_round_then_lone_commits_again() -> None:
    disk = Disk()
    gc = disk.commit(solo=True, after=True)
    await asyncio.gather(*(gc.submit(i) for i in range(5)))
    assert await gc.submit(5) == 50  # crowded: queued, a round of one
    turned = loop_turned()
    assert await gc.submit(6) == 60  # lone again: no task, no loop turn
    assert not turned.is_set()
    assert disk.rounds == [[0], [1, 2, 3, 4], [5], [6]]
    assert disk.after_calls == 4  # after each good round, lone ones included


async def test_a_lone_writer_in_a_tight_loop_gives_the_loop_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_commit, "SOLO_TURN_BUDGET", 0.0)  # over budget at once: every second commit yields
    disk = Disk()
    gc = disk.commit(solo=True)

    async def ten() -> None:
        for i in range(10):
            await gc.submit(i)  # nothing here suspends but the fast path's own turn

    _, turns = await turns_during(ten())
    assert turns >= 5
    assert disk.rounds == [[i] for i in range(10)]  # still alone: the yield found nobody else writing


async def test_a_lone_writer_cancelled_while_waiting_for_the_lock_is_not_written() -> None:
    disk = Disk()
    gc = disk.commit(solo=True)
    await disk.lock.acquire()  # a transaction holds the store
    doomed = asyncio.create_task(gc.submit(1))
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    disk.lock.release()
    assert await gc.submit(2) == 20
    assert disk.rounds == [[2]]


@pytest.mark.parametrize("solo", [False, True], ids=["leader", "lone"])
async def test_a_lone_or_led_round_that_fails_fails_its_writer_and_later_rounds_work(solo: bool) -> None:
    disk = Disk()
    disk.failures[1] = OSError("eio")
    disk.reject = {3}
    gc = disk.commit(solo=solo)
    with pytest.raises(OSError):
        await gc.submit(1)
    with pytest.raises(ValueError, match="bad item 3"):
        await gc.submit(3)
    assert await gc.submit(4) == 40
    assert disk.rounds == [[3], [4]]  # Disk records every item handed to write, a rejected one too
