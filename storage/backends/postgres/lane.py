"""The lane: one pooled connection the PostgreSQL store keeps between operations, with its own state machine.

Why it exists
    asyncpg's ``pool.acquire()`` + ``release()`` cost about as much client time as a one-statement ``get`` itself (a
    queue, a holder, timeouts, the reset hook). So the store keeps one pool connection between operations, the
    lane, and an operation takes it when no other operation is using it (a state check: no await, no lock);
    otherwise it borrows from the pool as usual. A lone bot task reading and writing members thus runs at the speed
    of a plain connection, and concurrent tasks still spread over the pool. Transactions never use the lane: one
    may last as long as its caller likes, and its escape hatch (``tx.connection``) may leave session state that
    only the pool's reset clears.

    The lane is a pool connection that is never given back while all is well, so the pool's own care (its reset
    query, replacing a dead connection) does not reach it. The rule is therefore: the lane goes back to the pool
    whenever anything unusual happened on it (an exception of any kind, a transaction left open, its session lost,
    the store closing), and the next operation takes a fresh one from the pool.

The model is asyncpg's ``PoolConnectionHolder`` (asyncpg/pool.py), which keeps one slot of the pool: connected or
not, in use or not, and what to do with its connection on release. :class:`Lane` is that for the one connection the
store keeps, with the states written out:

============  ===============================================================================================
``EMPTY``     No connection held. The next :meth:`Lane.take` acquires one from the pool (state ``BUSY`` while it
              waits) and registers a termination listener on it.
``IDLE``      A connection is held and nobody uses it. :meth:`Lane.take` hands it out at once.
``BUSY``      One operation uses it (or is acquiring it). :meth:`Lane.take` returns ``None``: borrow from the pool.
``CLOSED``    Never lends again (:meth:`Lane.take` returns ``None``): the store closed, or it was never opened, or
              its pool has a single connection (a lane would leave nothing for transactions and concurrent calls).
============  ===============================================================================================

Transitions::

    EMPTY  --take-->              BUSY    acquire (a failure or cancellation goes back to EMPTY)
    IDLE   --take, take_nowait--> BUSY
    BUSY   --give_back, keep-->   IDLE    no exception, no transaction left open, same session, not closed
    BUSY   --give_back-->         EMPTY   anything else: the connection goes back to the pool (terminated first
                                          when it may be waiting on the server, see postgres/conn.py)
    IDLE   --make_room-->         EMPTY   a borrow would wait on a pool whose only free connection is the idle lane
    IDLE   --session lost-->      EMPTY   the termination listener (asyncpg gave the connection back by itself)
    BUSY   --session lost-->      BUSY    without its connection: the operation fails, its give_back finds it gone
    any    --close-->             CLOSED  an IDLE connection goes back to the pool now, a BUSY one at its give_back

While the lane holds a connection, its server pid is in the store's ``quiet`` set, so that the pool's reset hook
skips the reset query when it comes back after a clean operation (see PostgresStore._reset_connection); after
trouble it gets the pool's full reset.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import asyncpg

from . import conn as pg_conn
from .errors import DRIVER_ERRORS

__all__ = ["Lane", "LaneState"]

log = logging.getLogger("storage.postgres")


class LaneState(enum.Enum):
    """Where the lane is in its life: see the module documentation for what each state means."""

    EMPTY = "empty"
    IDLE = "idle"
    BUSY = "busy"
    CLOSED = "closed"


EMPTY, IDLE, BUSY, CLOSED = LaneState.EMPTY, LaneState.IDLE, LaneState.BUSY, LaneState.CLOSED


class Lane:
    """One pool connection kept between operations; at most one operation uses it at a time.

    ``pool`` is the store's asyncpg pool (``None`` before the store is opened: the lane is then ``CLOSED``),
    ``quiet`` the store's set of server pids whose reset query may be skipped, ``timeout`` how long :meth:`take`
    waits for a pooled connection, ``target`` the server as logs name it (never a password).

    Usage, for one operation::

        conn = await lane.take()          # None: busy or closed, borrow from the pool instead
        try:
            ...                           # statements on conn
        except BaseException as exc:
            await lane.give_back(conn, exc)
            raise
        await lane.give_back(conn, None)

    :meth:`take_nowait` and :meth:`keep` are the halves of :meth:`take` and :meth:`give_back` that need no await:
    the common case (an idle lane taken, a clean operation kept) then costs no coroutine at all, which is what the
    store's borrow does (PostgresStore._connection).
    """

    __slots__ = ("_conn", "_pid", "_pool", "_quiet", "_state", "_target", "_timeout")

    def __init__(self, pool: Any, *, quiet: set[int], timeout: float | None, target: str) -> None:
        self._pool = pool
        self._quiet = quiet
        self._timeout = timeout
        self._target = target
        self._conn: Any = None  # the connection held (IDLE, BUSY once acquired), else None
        self._pid = 0  # its server pid, kept until it is given back to the pool
        self._state = CLOSED if pool is None or pool.get_max_size() < 2 else EMPTY

    def __repr__(self) -> str:
        return f"<Lane {self._state.name} pid={self._pid}>"

    @property
    def state(self) -> LaneState:
        return self._state

    @property
    def connection(self) -> Any:
        """The connection the lane holds (``None`` when ``EMPTY`` or ``CLOSED``, or acquiring, or just lost)."""
        return self._conn

    @property
    def pid(self) -> int:
        """The server pid of the connection the lane holds or last held (``0`` before the first one)."""
        return self._pid

    def take_nowait(self) -> Any:
        """The idle connection for one operation (``IDLE`` -> ``BUSY``), without an await; ``None`` in any other
        state (then :meth:`take`). The fast half of :meth:`take`: it runs on nearly every call of a lone task."""
        if self._state is IDLE:
            self._state = BUSY
            return self._conn
        return None

    async def take(self) -> Any:
        """The lane's connection for one operation (state ``BUSY``), or ``None`` when another operation holds it or
        the lane is closed: the caller then borrows from the pool. Only ``EMPTY`` awaits (the pool's acquire, bounded
        by ``timeout``); its errors (asyncpg's, ``asyncio.TimeoutError``) come out as they are."""
        if self._state is not EMPTY:
            return self.take_nowait()
        self._state = BUSY
        try:
            conn = await self._pool.acquire(timeout=self._timeout)
        except BaseException:
            if self._state is BUSY:  # not closed meanwhile
                self._state = EMPTY
            raise
        self._conn, self._pid = conn, conn.get_server_pid()
        self._quiet.add(self._pid)
        conn.add_termination_listener(self._lost)
        return conn

    def keep(self, conn: Any, exc: BaseException | None) -> bool:
        """The fast half of :meth:`give_back`, without an await: keep ``conn`` (``BUSY`` -> ``IDLE``) and return True
        when its operation returned, left no transaction open, its session still lives and the lane is not closed;
        otherwise change nothing and return False (then :meth:`give_back`)."""
        if exc is not None or self._state is not BUSY or self._conn is not conn:
            return False
        try:
            if conn.is_in_transaction():
                return False
        except asyncpg.InterfaceError:  # its session ended during the operation
            return False
        self._state = IDLE
        return True

    async def give_back(self, conn: Any, exc: BaseException | None) -> None:
        """End the operation that took ``conn``, which raised ``exc`` (``None``: it returned).

        Kept (``IDLE``) when the operation returned, left no transaction open, its session still lives and the lane
        is not closed; otherwise given back to the pool (``EMPTY``, or still ``CLOSED``): terminated first when
        ``exc`` means it may be waiting on the server (postgres/conn.py), with the pool's full reset after any
        trouble. A driver error of the give-back itself is logged, not raised: ``exc`` is what the caller reports.
        """
        if self.keep(conn, exc):
            return
        try:
            idle = not conn.is_in_transaction()
            usable = True
        except asyncpg.InterfaceError:  # its session ended during the operation: the pool has it back already
            idle = usable = False
        self._conn = None
        try:
            if usable:
                conn.remove_termination_listener(self._lost)
                if pg_conn.unsafe_after(exc):
                    pg_conn.abandon(conn)
            await self._discard(conn, clean=exc is None and idle)
        finally:
            if self._state is BUSY:  # not before: while it goes back, other operations borrow from the pool
                self._state = EMPTY

    async def make_room(self) -> None:
        """Before an operation waits for the pool: when every connection is out and one of them is the idle lane,
        give it back (``IDLE`` -> ``EMPTY``), so that a transaction (or any borrow) never waits on a connection
        nobody is using."""
        pool = self._pool
        if self._state is not IDLE or pool.get_idle_size() or pool.get_size() < pool.get_max_size():
            return
        self._state = EMPTY
        await self._let_go()

    async def close(self) -> None:
        """Lend no more (``CLOSED``, idempotent). An idle connection goes back to the pool now, so that closing the
        pool does not wait for it; a busy one goes back when its operation calls :meth:`give_back`."""
        state, self._state = self._state, CLOSED
        if state is IDLE:
            await self._let_go()

    async def _let_go(self) -> None:
        """Give the idle connection back to the pool: cleanly, unless its session ended a moment ago (the listener
        has not run yet, and asyncpg has given it back already)."""
        conn, self._conn = self._conn, None
        try:
            conn.remove_termination_listener(self._lost)
            clean = True
        except asyncpg.InterfaceError:
            clean = False
        await self._discard(conn, clean=clean)

    async def _discard(self, conn: Any, *, clean: bool) -> None:
        """Put ``conn`` back in the pool; after trouble (``clean=False``) with the pool's full reset."""
        pid = self._pid
        if not clean:
            self._quiet.discard(pid)
        try:
            await self._pool.release(conn)
        except DRIVER_ERRORS as exc:  # the connection is broken: the pool has dropped it already
            log.debug("%s: giving a connection back failed: %s", self._target, exc)
        finally:
            self._quiet.discard(pid)

    def _lost(self, conn: Any) -> None:
        """asyncpg's termination listener: the lane's session ended (a server restart, ``pg_terminate_backend``)
        and asyncpg has given the connection back to the pool by itself. An idle lane becomes ``EMPTY``, so the
        next operation takes a new connection; a busy one gives it back at its end (:meth:`give_back`)."""
        if conn is not self._conn:  # a connection the lane no longer holds (the listener runs a moment later)
            return
        self._conn = None
        self._quiet.discard(self._pid)
        if self._state is IDLE:
            self._state = EMPTY
