"""storage: one async interface over a Discord bot's data, in durable JSON files or PostgreSQL.

>>> async with storage.open_store() as store:              # backend chosen from the environment
...     await store.save_member_data(user_id, guild_id, {"roles": []})
"""

from .api import StoreOpener, open_store
from .backup import RestoreReport
from .backup_format import BackupInfo, BackupReport
from .cache import DatabaseCache
from .config import StoreConfig
from .copy import CopyReport, TargetNotEmptyError, copy
from .errors import (
    BackupError,
    ConnectionError,
    CorruptDataError,
    DatabaseError,
    LockTimeoutError,
    MigrationError,
    StoreClosedError,
    TransactionError,
    ValidationError,
)
from .protocol import Store, Transaction
from .retry import safe_database_operation

__version__ = "0.1.0"

__all__ = [
    "BackupError",
    "BackupInfo",
    "BackupReport",
    "CopyReport",
    "ConnectionError",
    "CorruptDataError",
    "DatabaseCache",
    "DatabaseError",
    "LockTimeoutError",
    "RestoreReport",
    "MigrationError",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "StoreOpener",
    "TargetNotEmptyError",
    "Transaction",
    "TransactionError",
    "ValidationError",
    "copy",
    "open_store",
    "safe_database_operation",
]
