"""The migration lock: at most one migrator works on a store at a time, across processes and hosts.

Two deploys starting at once is the classic way a migration runs twice (alembic #633, dbmate #101). The lock is
separate from the store's own write lock, so the bot keeps working while a migrator waits for it.

* JSON: a :mod:`filelock` on ``<path>/storage.migrate.lock``, a sidecar file (never a data file: those are
  replaced by ``os.replace``). Acquired in a worker thread so the event loop keeps running while it waits.
* PostgreSQL: an advisory lock taken on one dedicated connection from the store's pool (advisory locks belong to a
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
import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import filelock

from ..errors import DatabaseError, LockTimeoutError, MigrationError

__all__ = ["MigrationLock", "FileMigrationLock", "AdvisoryMigrationLock", "lock_for", "LOCK_FILE", "advisory_key"]

log = logging.getLogger("storage.migrations")

LOCK_FILE = "storage.migrate.lock"
_POLL = 0.05


def advisory_key(schema: str) -> int:
    """A signed 64-bit key from a fixed name and the schema: identical in every process and on every host."""
    return int.from_bytes(hashlib.sha256(f"storage.migrations/v1/{schema}".encode()).digest()[:8], "big", signed=True)


class MigrationLock:
    """``await lock.acquire(timeout)`` -> bool (``timeout=0`` tries once); ``await lock.release()``."""

    async def acquire(self, timeout: float) -> bool:
        raise NotImplementedError

    async def release(self) -> None:
        raise NotImplementedError

    async def verify(self, tx: Any) -> None:
        """Raise :class:`MigrationError` if the lock was lost since :meth:`acquire` (checked inside ``tx``, the
        step's transaction, just before it commits). A file lock cannot be lost while its process lives."""

    async def hold(self, timeout: float, what: str) -> None:
        """Acquire or raise :class:`LockTimeoutError` naming what was waited for."""
        if not await self.acquire(timeout):
            raise LockTimeoutError(f"{what}: another migrator held the migration lock for over {timeout}s "
                                   "(is another deploy migrating? see `python -m storage migrate status`)")


class FileMigrationLock(MigrationLock):
    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._lock = filelock.FileLock(str(self.path), thread_local=False)

    async def acquire(self, timeout: float) -> bool:
        try:
            self._lock.acquire(timeout=0)  # uncontended: no thread hop
            return True
        except filelock.Timeout:
            if timeout <= 0:
                return False
        except OSError as exc:
            raise MigrationError(f"cannot take the migration lock {self.path}: {exc}") from exc
        loop = asyncio.get_running_loop()
        waiter = loop.run_in_executor(None, functools.partial(self._lock.acquire, timeout=timeout,
                                                              poll_interval=_POLL))
        try:
            await asyncio.shield(waiter)
        except filelock.Timeout:
            return False
        except OSError as exc:
            raise MigrationError(f"cannot take the migration lock {self.path}: {exc}") from exc
        except asyncio.CancelledError:
            # The thread may still get the lock after we stopped waiting: give it back then.
            waiter.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._lock.release())
            raise
        return True

    async def release(self) -> None:
        self._lock.release()


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

    async def verify(self, tx: Any) -> None:
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


def lock_for(store: Any) -> MigrationLock:
    """The right lock for ``store``'s backend, found by what the store exposes (``pool`` or ``path``)."""
    pool = getattr(store, "pool", None)
    if pool is not None:
        max_size = getattr(pool, "get_max_size", lambda: None)()
        if max_size is not None and max_size < 2:
            raise MigrationError("migrations need a pool of at least 2 connections (one holds the migration "
                                 "lock while another runs the migration): set STORAGE_POOL_MAX >= 2")
        config = getattr(store, "config", None)
        return AdvisoryMigrationLock(pool, transaction_scoped=bool(getattr(config, "pgbouncer", False)),
                                     command_timeout=getattr(config, "command_timeout", None))
    path = getattr(store, "path", None)
    if path is not None:
        return FileMigrationLock(Path(path))
    raise MigrationError(f"do not know how to lock {type(store).__name__} against concurrent migrations "
                         "(it has neither a connection pool nor a data folder)")
