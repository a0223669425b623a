"""Versioned, reversible data migrations that run unchanged on the JSON and PostgreSQL backends.

>>> from storage.migrations import Migration, Migrator
>>> class AddUserPreferences(Migration):
...     def __init__(self):
...         super().__init__("1.1.0", "Add user preferences to member data")
...     async def up(self, store):
...         await store.transform("members", lambda m: {"preferences": {}, **m})
...     async def down(self, store): ...
>>> m = Migrator(store, [AddUserPreferences()])
>>> await m.status(); await m.plan(); await m.upgrade(); await m.downgrade(target="1.0.0"); await m.validate()

What it guarantees, on both backends:

* **All or nothing per migration.** ``up()`` and its ledger entry commit in one store transaction.
* **Crash detection.** A step interrupted mid-way leaves the store *dirty*; nothing runs until ``repair()``.
* **One migrator at a time.** A lock (file lock / advisory lock) serializes concurrent deploys.
* **Drift detection.** ``validate()`` reports edited, missing and out-of-order migrations (checksums of the code).
* **Backups.** ``upgrade``/``downgrade`` take one first when the store can (``backup=False`` to skip).

Modules: :mod:`.version` (ordering), :mod:`.migration` (the base class and checksums), :mod:`.context` (what
``up``/``down`` receive), :mod:`.ledger` (the collections), :mod:`.locking`, :mod:`.migrator`, :mod:`.results` (the
returned records), :mod:`.errors`, :mod:`.loader` (for the command line).
"""

from ..errors import MigrationError
from .context import MigrationContext
from .errors import DirtyMigrationError, MigrationFailedError, MigrationValidationError
from .ledger import LEDGER, LOG, NOTES, STATE
from .loader import load_migrations
from .migration import Migration
from .migrator import Migrator
from .results import (
    AppliedMigration,
    InProgress,
    LogEntry,
    MigrationProblem,
    MigrationRun,
    MigrationStatus,
    PendingMigration,
    RepairResult,
    StepResult,
)
from .version import Version, parse_version

__all__ = [
    "AppliedMigration",
    "DirtyMigrationError",
    "InProgress",
    "LEDGER",
    "LOG",
    "LogEntry",
    "Migration",
    "MigrationContext",
    "MigrationError",
    "MigrationFailedError",
    "MigrationProblem",
    "MigrationRun",
    "MigrationStatus",
    "MigrationValidationError",
    "Migrator",
    "NOTES",
    "PendingMigration",
    "RepairResult",
    "STATE",
    "StepResult",
    "Version",
    "load_migrations",
    "parse_version",
]
