"""The one connection per store that LISTENs for other processes' commits, outside the pool, kept up by a task.

Why outside the pool: a LISTEN belongs to a session, and a pooled connection is reset (``UNLISTEN *``) and lent to
anyone; a listening connection also must never be the one a busy pool withholds. Why a task: the connection can
be lost at any time (a server restart, ``pg_terminate_backend``, a network change), and whatever was committed
while it was down is unknown. So the task reconnects with a growing pause (:data:`BACKOFF_FIRST` doubling up to
:data:`BACKOFF_MAX` seconds) and reports both edges: ``on_down`` (the coherent cache stops trusting itself) and
``on_up(again)`` (``again``: after a loss, watchers get ``resync``; the cache starts afresh).

Behind PgBouncer in transaction mode a LISTEN does not survive the transaction, so ``STORAGE_LISTEN_DSN`` names a
direct connection for this one (see postgres/store.py); its password never appears in a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from ...dsn import mask_secrets
from . import conn as pg_conn
from .errors import DRIVER_ERRORS

__all__ = ["Listener", "BACKOFF_FIRST", "BACKOFF_MAX"]

log = logging.getLogger("storage.postgres")

_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, asyncio.TimeoutError, ValueError)
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0


class Listener:
    """LISTEN on ``channel`` through ``dsn`` while :meth:`start`-ed, reconnecting after a loss; ``on_note(payload)``
    runs for every notification, in the order the server sends them (commit order)."""

    def __init__(self, dsn: str, channel: str, *, target: str, connect_timeout: float,
                 on_note: Callable[[str], None], on_up: Callable[[bool], None], on_down: Callable[[], None]) -> None:
        self._dsn = dsn
        self._channel = channel
        self._target = target  # the server as logs name it (never a password)
        self._connect_timeout = connect_timeout
        self._on_note = on_note
        self._on_up = on_up
        self._on_down = on_down
        self._task: asyncio.Task[None] | None = None
        self._live = asyncio.Event()
        self._conn: Any = None
        self._closing = False
        self.connects = 0  # how many times it connected (for tests and stats)

    @property
    def live(self) -> bool:
        return self._live.is_set()

    @property
    def pid(self) -> int | None:
        """The server pid of the listening connection while it is up (tests terminate it to test the recovery)."""
        conn = self._conn
        return conn.get_server_pid() if conn is not None and self.live else None

    def start(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="storage-pg-listener")

    async def wait_live(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the connection to be listening; False if it is not."""
        self.start()
        try:
            await asyncio.wait_for(self._live.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._on_note(payload)

    async def _run(self) -> None:
        pause = BACKOFF_FIRST
        again = False
        while not self._closing:
            lost = asyncio.Event()
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout, statement_cache_size=0)
                pg_conn.configure_socket(conn)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._notified)
                self._conn = conn
                self.connects += 1
                self._live.set()
                pause = BACKOFF_FIRST
                self._on_up(again)
                again = True
                await lost.wait()
                log.warning("%s: the listening connection was lost; reconnecting (watchers get resync)",
                            self._target)
            except _CONNECT_ERRORS as exc:
                again = True
                log.warning("%s: cannot listen for changes (%s: %s); retrying in %.2fs", self._target,
                            type(exc).__name__, pg_conn_message(exc, self._dsn), pause)
            finally:
                was_live = self._live.is_set()
                self._live.clear()
                self._conn = None
                if was_live:
                    self._on_down()
                if conn is not None:
                    conn.terminate()  # never waits on a server that may be gone
            if self._closing:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def pg_conn_message(exc: BaseException, dsn: str) -> str:
    """A driver's message with the DSN's secrets masked."""
    return mask_secrets(str(exc), dsn)
