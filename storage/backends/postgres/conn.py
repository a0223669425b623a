"""A PostgreSQL connection that may be dead: keepalives, and abandoning it instead of waiting on it.

A server can stop answering without closing anything: a frozen VM, a backend stopped by a debugger or ``SIGSTOP``,
a half-open TCP connection after a network change. Nothing then tells the client, and every wait on that
connection is forever unless something bounds it. Three things do, together:

* **A command timeout** (``StoreConfig.command_timeout``, passed to asyncpg's pool as ``command_timeout``): every
  statement, and every wait for a pooled connection, gives up after it with :class:`storage.ConnectionError`.
* **TCP keepalives** (:func:`configure_socket`, on every new connection): an idle connection to a host that is gone
  is found dead after about a minute (:data:`KEEPALIVE_IDLE` + :data:`KEEPALIVE_COUNT` x :data:`KEEPALIVE_INTERVAL`
  seconds) and data left unacknowledged as long (``TCP_USER_TIMEOUT``) closes it, instead of the kernel's two
  hours. A process that is stopped on a live host still answers keepalives: there only the timeout helps.
* **Abandoning on cancellation** (:func:`abandons`, :func:`transaction`): when a statement is cancelled
  (``asyncio.wait_for``, ``task.cancel()``) or timed out, asyncpg asks the server to cancel it and, before the
  connection can be used or given back, waits for the server to acknowledge: on a frozen server, for as long as it
  stays frozen. Here such a connection is terminated at once instead (its socket closed; the server rolls back
  whatever transaction it had open when it notices). It costs a reconnect on a healthy server, where a cancelled
  statement is rare, and it is the only way a cancellation can return in bounded time on a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ...cancellation import run_to_completion
from ...errors import DatabaseError

__all__ = ["KEEPALIVE_COUNT", "KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "abandon", "abandons", "configure_socket",
           "settle_commit", "transaction", "unsafe_after"]

log = logging.getLogger("storage.postgres")

#: Seconds a connection may sit idle before the kernel starts probing the server.
KEEPALIVE_IDLE = 30
#: Seconds between two probes, and how many unanswered probes mean the server is gone.
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
_USER_TIMEOUT_MS = (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT) * 1000


def configure_socket(conn: Any) -> bool:
    """Turn TCP keepalives on for ``conn``'s socket; False when it has none to configure (a unix socket).

    asyncpg offers no keepalive option (libpq's ``keepalives*``), so the socket is reached through the asyncio
    transport, whose ``get_extra_info("socket")`` is public; options a platform lacks are skipped.
    """
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", _USER_TIMEOUT_MS)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return True


def abandons(exc: BaseException | None) -> bool:
    """True when the block that used a connection ended so that the connection may be waiting on the server: a
    cancellation, or asyncpg's command timeout. Such a connection is terminated, never waited on."""
    return isinstance(exc, (asyncio.CancelledError, asyncio.TimeoutError)) and not isinstance(exc, DatabaseError)


def unsafe_after(exc: BaseException | None) -> bool:
    """True when a connection whose operation ended with ``exc`` must be terminated before it goes back to the pool:
    the pool must never hand it out again, nor wait on it. Either :func:`abandons` (cancelled or timed out: it may
    be waiting on a server that does not answer), or asyncpg lost track of the protocol (``InternalClientError``,
    seen when the server ends a session mid-query, MagicStack/asyncpg#784)."""
    return isinstance(exc, asyncpg.exceptions.InternalClientError) or abandons(exc)


def abandon(conn: Any) -> None:
    """Close ``conn``'s socket without a word to the server. Idempotent: a pooled connection that was terminated
    already went back to its pool by itself, and its proxy then refuses every call."""
    try:
        conn.terminate()
    except asyncpg.InterfaceError:
        pass


@asynccontextmanager
async def transaction(conn: Any, **options: Any) -> AsyncIterator[None]:
    """``conn.transaction(**options)`` (a savepoint when one is open already) that, when the block is cancelled or
    times out, terminates the connection instead of sending a ``ROLLBACK`` that would wait for the server.

    Once the ``COMMIT`` is sent, a cancellation waits for its answer (:func:`settle_commit`)."""
    xact = conn.transaction(**options)
    await xact.start()
    try:
        yield
    except BaseException as exc:
        if abandons(exc):
            abandon(conn)
        else:
            try:
                await xact.rollback()
            except Exception as rollback_exc:  # the connection is gone: the server rolls back by itself
                log.debug("rollback failed (%s): terminating the connection", rollback_exc)
                abandon(conn)
        raise
    await settle_commit(xact)


async def settle_commit(xact: Any) -> None:
    """``await xact.commit()``, which a cancellation does not cut short: it waits for the server's answer, then is
    delivered (storage/cancellation.py).

    Why: a ``COMMIT`` cancelled after it was sent was abandoned with its connection, and the server went on to
    commit it moments later: the cancelled call's changes appeared after the caller had been told it was cancelled,
    so a read made just after could see part of them (one table read before they landed, the next after), and a
    restore started at once met the late commit (a serialization failure). Waiting settles the outcome before the
    caller resumes: the transaction committed (the cancellation is still raised) or it did not. The wait is
    bounded by the command timeout, which ends a commit on a frozen server (the connection is then abandoned)."""
    await run_to_completion(xact.commit())
