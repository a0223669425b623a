"""The JSON store's mutex (json/mutex.py): ``asyncio.Lock``'s promises, plus a synchronous ``try_acquire``.

The store's synchronous commit path (a lone put while the lease is on) takes the mutex with ``try_acquire``; every
other holder awaits ``acquire``. These pin down what both rely on: first come, first served; ``try_acquire`` never
jumps the queue; a waiter cancelled before it got the mutex leaves no trace; one cancelled just as it was handed
the mutex passes it on (nobody is left waiting for a mutex that nobody holds).
"""

from __future__ import annotations

import asyncio

import pytest

from storage.backends.json.mutex import Mutex


async def test_try_acquire_takes_a_free_mutex_only() -> None:
    mutex = Mutex()
    assert mutex.try_acquire() and mutex.locked()
    assert not mutex.try_acquire()
    mutex.release()
    assert not mutex.locked()
    with pytest.raises(RuntimeError):
        mutex.release()


async def test_waiters_get_it_in_order_and_try_acquire_never_jumps_the_queue() -> None:
    mutex = Mutex()
    await mutex.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await mutex.acquire()
        order.append(n)
        await asyncio.sleep(0)
        mutex.release()

    tasks = [asyncio.create_task(waiter(n)) for n in range(5)]
    await asyncio.sleep(0)
    mutex.release()  # handed to waiter 0 at once: it stays held
    assert mutex.locked()
    assert not mutex.try_acquire(), "a waiter was handed the mutex: nobody may take it in between"
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert not mutex.locked() and mutex.try_acquire()


async def test_a_waiter_cancelled_while_waiting_leaves_the_queue() -> None:
    mutex = Mutex()
    await mutex.acquire()
    doomed = asyncio.create_task(mutex.acquire())
    later = asyncio.create_task(mutex.acquire())
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    mutex.release()
    await later  # the cancelled waiter did not hold it up
    assert mutex.locked()
    mutex.release()
    assert not mutex.locked() and mutex.try_acquire()


async def test_a_waiter_cancelled_as_it_is_handed_the_mutex_passes_it_on() -> None:
    mutex = Mutex()
    await mutex.acquire()
    doomed = asyncio.create_task(mutex.acquire())
    later = asyncio.create_task(mutex.acquire())
    await asyncio.sleep(0)
    mutex.release()  # doomed holds it now, but has not run yet
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(later, 5)  # passed on to the next waiter
    mutex.release()
    # and with nobody after it, it ends free
    await mutex.acquire()
    lone = asyncio.create_task(mutex.acquire())
    await asyncio.sleep(0)
    mutex.release()
    lone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lone
    assert not mutex.locked()
