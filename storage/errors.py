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
