"""The store's in-process mutex: an ``asyncio.Lock`` that can also be taken without an ``await``.

Why: a lone save whose store still leases the file lock (json/lease.py) commits without suspending at all (append
and fsync inline, publish, apply): nothing in it can wait, so it runs as plain synchronous code, which saves the
coroutines and the ``async with`` around a commit (about 3 us of a save that costs 60-70 us with its fsync). That
needs the mutex taken synchronously when it is free: :meth:`Mutex.try_acquire`, which ``asyncio.Lock`` does not
have (its ``_locked`` is private and undeclared).

Semantics are ``asyncio.Lock``'s: first come, first served; a waiter cancelled before it got the mutex leaves the
queue; ``release`` hands the mutex straight to the first waiter still waiting (a newcomer cannot take it in between,
:meth:`try_acquire` included), and a waiter cancelled just after it was handed the mutex passes it on.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Mutex"]


class Mutex:
    """An asyncio mutual-exclusion lock with a synchronous :meth:`try_acquire` (see the module doc). Not
    thread-safe: one event loop uses it."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        """Take the mutex if it is free and nobody waits for it; never waits."""
        if self._held or self._waiters:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        """Take the mutex, waiting (in order of arrival) while another holds it."""
        if not self._held and not self._waiters:
            self._held = True
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._hand_on()  # it was handed to us as we were cancelled: to the next, or free
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("Mutex is not acquired")
        self._hand_on()

    def _hand_on(self) -> None:
        """The holder lets go: the first waiter still waiting holds the mutex now (it stays held), else it is free."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._held = False
