"""The PostgreSQL store's migration lock: an advisory lock on one dedicated connection of the store's pool.

Advisory locks belong to a
session, so taking and releasing on whatever pooled connection comes along would not work). It is polled with
``pg_try_advisory_lock`` so a timeout is possible, and keyed by a stable hash of a fixed name and the schema the
store lives in (Python's ``hash()`` differs between processes; two stores in two schemas of one database are two
stores). Behind PgBouncer in transaction mode (``STORAGE_PGBOUNCER=1``) a session
lock could stay on a server connection other clients then use, so the transaction-scoped variant is taken inside a
transaction held open on the dedicated connection instead. If that connection drops, the server releases the
lock: a migrator that loses its connection must stop. So before each step commits, :meth:`MigrationLock.verify`
checks, on the step's own transaction, that the lock's session still holds it (``pg_locks``; a session that is
merely slow or frozen still holds it, a terminated one does not), and the step rolls back with
:class:`MigrationError` if not. Waits for the lock's connection are bounded by the store's command timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from ...errors import DatabaseError, MigrationError
from ...interfaces import MigrationLock
from ...protocol import Transaction

__all__ = ["AdvisoryMigrationLock", "advisory_key"]

log = logging.getLogger("storage.migrations")

_POLL = 0.05


def advisory_key(schema: str) -> int:
    """A signed 64-bit key from a fixed name and the schema: identical in every process and on every host."""
    return int.from_bytes(hashlib.sha256(f"storage.migrations/v1/{schema}".encode()).digest()[:8], "big", signed=True)


class AdvisoryMigrationLock(MigrationLock):
    def __init__(self, pool: Any, *, transaction_scoped: bool = False, command_timeout: float | None = None) -> None:
        self._pool = pool
        self._scoped = transaction_scoped
        self._timeout = command_timeout
        self._conn: Any = None
        self._tx: Any = None
        self._key = 0
        self._pid = 0  # the server process of the lock's session (pg_backend_pid(): right behind PgBouncer too)
        self._lost = False

    def _connection_lost(self, conn: Any) -> None:
        self._lost = True

    async def verify(self, tx: Transaction) -> None:
        if self._conn is None:
            return
        held = False
        if not self._lost:
            try:
                held = bool(await tx.connection.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted)",
                    self._pid))
            except Exception as exc:
                raise MigrationError(f"cannot check that the migration lock is still held: {exc}") from exc
        if not held:
            raise MigrationError("the migration lock was lost (its connection to PostgreSQL ended), so another "
                                 "migrator may be running: this step was rolled back and the run stopped")

    async def acquire(self, timeout: float) -> bool:
        try:
            conn = await self._pool.acquire(timeout=self._timeout)
        except DatabaseError:
            raise
        except Exception as exc:
            raise MigrationError(f"cannot get a connection for the migration lock: {exc}") from exc
        try:
            tx = None
            if self._scoped:
                tx = conn.transaction()
                await tx.start()
            key = advisory_key(await conn.fetchval("SELECT current_schema()") or "")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            query = "SELECT pg_try_advisory_xact_lock($1)" if self._scoped else "SELECT pg_try_advisory_lock($1)"
            deadline = time.monotonic() + timeout
            while not await conn.fetchval(query, key):
                if time.monotonic() >= deadline:
                    if tx is not None:
                        await tx.rollback()
                    await self._pool.release(conn)
                    return False
                await asyncio.sleep(_POLL)
        except BaseException as exc:
            await self._discard(conn)
            if isinstance(exc, Exception) and not isinstance(exc, DatabaseError):
                raise MigrationError(f"cannot take the migration lock: {exc}") from exc
            raise
        self._conn, self._tx, self._key, self._pid, self._lost = conn, tx, key, pid, False
        conn.add_termination_listener(self._connection_lost)
        return True

    async def _discard(self, conn: Any) -> None:
        """Give back a connection in an unknown state: closing it is the one sure way to drop its locks."""
        try:
            await self._pool.release(conn)
        except Exception:  # best effort: the server frees the lock when the session ends
            conn.terminate()

    async def release(self) -> None:
        conn, tx, self._conn, self._tx = self._conn, self._tx, None, None
        if conn is None:
            return
        if self._lost:  # the session ended, and asyncpg has given the connection back to the pool already
            return
        conn.remove_termination_listener(self._connection_lost)
        try:
            if tx is not None:
                await tx.rollback()
            else:
                await conn.fetchval("SELECT pg_advisory_unlock($1)", self._key)
        except Exception as exc:  # the lock dies with the session: make sure the session does
            log.warning("releasing the migration lock failed (%s): closing its connection", exc)
            conn.terminate()
            return
        await self._pool.release(conn)
