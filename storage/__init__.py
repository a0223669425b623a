"""storage: one async interface over a Discord bot's data, in durable JSON files or PostgreSQL.

>>> async with storage.open_store() as store:              # backend chosen from the environment
...     await store.save_member_data(user_id, guild_id, {"roles": []})
"""

from typing import TYPE_CHECKING, Any

from .api import StoreOpener, open_store
from .backup.copy import CopyReport, TargetNotEmptyError, copy
from .backup.format import BackupInfo, BackupReport
from .backup.operations import RestoreReport
from .cache import DatabaseCache
from .config import StoreConfig
from .errors import (
    BackupError,
    ConnectionError,
    CorruptDataError,
    DatabaseError,
    EventLoopError,
    ExternalChangeError,
    FeedUnavailableError,
    LockTimeoutError,
    MigrationError,
    ReadOnlyError,
    StorageIOError,
    StoreClosedError,
    TransactionError,
    ValidationError,
)
from .feed import Change, Watch
from .protocol import Store, Transaction
from .retry import safe_database_operation
from .stores import JsonStore
from .types import Member, MemberStatistics, MessageAnalysis, MessageRecord
from .version import __version__

if TYPE_CHECKING:
    from .stores.postgres import PostgresStore

__all__ = [
    "__version__",
    "BackupError",
    "BackupInfo",
    "BackupReport",
    "Change",
    "CopyReport",
    "ConnectionError",
    "CorruptDataError",
    "DatabaseCache",
    "DatabaseError",
    "EventLoopError",
    "ExternalChangeError",
    "FeedUnavailableError",
    "JsonStore",
    "LockTimeoutError",
    "Member",
    "MemberStatistics",
    "MessageAnalysis",
    "MessageRecord",
    "RestoreReport",
    "MigrationError",
    "PostgresStore",
    "Store",
    "ReadOnlyError",
    "StorageIOError",
    "StoreClosedError",
    "StoreConfig",
    "StoreOpener",
    "TargetNotEmptyError",
    "Transaction",
    "TransactionError",
    "ValidationError",
    "Watch",
    "copy",
    "open_store",
    "safe_database_operation",
]


def __getattr__(name: str) -> Any:
    """``PostgresStore`` on first use: importing it loads asyncpg, which a bot on the JSON default never needs."""
    if name == "PostgresStore":
        from .stores.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
