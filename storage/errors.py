"""The exception hierarchy every backend speaks.

Every error the library raises is a :class:`DatabaseError`, so a bot can catch one type around any storage call.
Where a builtin already means the same thing (``ConnectionError``, ``ValueError``) our class subclasses it too, so
code written against the builtins keeps working. Backend errors (asyncpg, ``OSError``, orjson) are translated at the
backend boundary and chained, so the original is always in ``__cause__`` for debugging.
"""

from __future__ import annotations

import builtins

__all__ = [
    "DatabaseError",
    "ConnectionError",
    "ValidationError",
    "MigrationError",
    "CorruptDataError",
    "BackupError",
    "LockTimeoutError",
    "StoreClosedError",
    "TransactionError",
    "ReadOnlyError",
    "StorageIOError",
    "ExternalChangeError",
    "EventLoopError",
    "FeedUnavailableError",
]


class DatabaseError(Exception):
    """Base of every error raised by :mod:`storage`."""


class ConnectionError(DatabaseError, builtins.ConnectionError):
    """The backend cannot be reached right now; retrying later may succeed.

    This is the only error :func:`storage.safe_database_operation` retries.
    """


class ValidationError(DatabaseError, ValueError):
    """Input data is not acceptable; nothing was written.

    ``field`` names the offending field (dotted path) when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class MigrationError(DatabaseError):
    """A migration could not be planned, applied or rolled back."""


class CorruptDataError(DatabaseError):
    """A stored file or record cannot be read. The file is left untouched for a human to inspect.

    ``path`` and ``position`` (byte offset, when known) say where.
    """

    def __init__(self, message: str, *, path: str | None = None, position: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.position = position


class BackupError(DatabaseError):
    """A backup is missing, invalid, or failed verification; restore changed nothing."""


class LockTimeoutError(DatabaseError, TimeoutError):
    """Another process held the store's lock for longer than the configured timeout."""


class StoreClosedError(DatabaseError):
    """The store was closed; open a new one."""


class TransactionError(DatabaseError):
    """A transaction was misused (e.g. the store itself was written to from inside its own transaction)."""


class ReadOnlyError(DatabaseError):
    """The store was opened with ``read_only=True``: it serves reads and refuses every write."""


class StorageIOError(DatabaseError):
    """The operating system refused a file operation (disk full, I/O error, permission, ...).

    The ``OSError`` is chained as ``__cause__``; ``errno`` and ``path`` repeat what it says. What the call was
    writing was not committed, and the store's files are still valid.
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.path = path


class ExternalChangeError(CorruptDataError):
    """A file the store owns was changed behind its back (a person or another program wrote it while the store
    had it open, or over a journal that still holds newer changes). The store refuses to overwrite it.

    Stop the bot before editing the files by hand; a closed store picks the edit up when it is next opened.
    """


class FeedUnavailableError(DatabaseError):
    """``store.watch()`` cannot follow other processes' changes here: PostgreSQL behind a transaction pooler
    (``STORAGE_PGBOUNCER=1``, where LISTEN does not work) without ``STORAGE_LISTEN_DSN`` naming a direct connection,
    or a read-only store. The coherent cache is off there too."""



class EventLoopError(DatabaseError):
    """The store was used from an event loop other than the one that opened it.

    A store's connections, locks and futures belong to the loop that opened it: a PostgreSQL pool opened under
    ``asyncio.run(...)`` cannot serve calls made later under ``bot.run()`` (asyncpg would fail with a bare
    ``RuntimeError``), so every backend refuses such a call up front with this error. Open the store in the loop
    that uses it: in a discord.py bot, in ``setup_hook`` (and close it in ``close()``); in a script, inside the
    ``async def main()`` given to ``asyncio.run``.
    """
