"""The JSON store's migration lock: a :mod:`filelock` on ``<folder>/storage.migrate.lock``.

A sidecar file (never a data file: those are replaced by ``os.replace``), separate from the store's own write lock,
so the bot keeps working while a migrator waits. Acquired in a worker thread so the event loop keeps running while
it waits.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import filelock

from ...errors import MigrationError
from ...interfaces import MigrationLock

__all__ = ["FileMigrationLock", "LOCK_FILE"]

LOCK_FILE = "storage.migrate.lock"
_POLL = 0.05


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
