"""What the migrator returns: small frozen records with reprs that read well in a REPL or a log line.

Times are aware UTC datetimes; durations are seconds (float). Versions are the strings the migrations declare.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

__all__ = [
    "AppliedMigration",
    "PendingMigration",
    "InProgress",
    "MigrationStatus",
    "MigrationProblem",
    "ProblemKind",
    "StepResult",
    "MigrationRun",
    "RepairResult",
    "LogEntry",
    "Direction",
]

Direction = Literal["up", "down"]
ProblemKind = Literal["changed", "missing", "out_of_order", "interrupted"]


def _when(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, repr=False)
class AppliedMigration:
    """A row of the ledger: a migration that is applied now.

    ``seq`` orders migrations by when they were applied (``downgrade`` undoes them in reverse ``seq`` order, which
    differs from version order when an older migration was applied late).
    """

    version: str
    description: str
    name: str
    checksum: str
    applied_at: datetime
    duration: float
    seq: int
    host: str
    pid: int

    def __repr__(self) -> str:
        return (f"AppliedMigration({self.version!r}, {self.description!r}, applied_at={_when(self.applied_at)}, "
                f"duration={self.duration:.3f}s)")


@dataclass(frozen=True, repr=False)
class PendingMigration:
    """A migration in the code that the ledger does not list as applied."""

    version: str
    description: str
    name: str

    def __repr__(self) -> str:
        return f"PendingMigration({self.version!r}, {self.description!r})"


@dataclass(frozen=True, repr=False)
class InProgress:
    """The marker a migration step commits before its transaction starts and clears in the same commit as its work.

    Found while no migrator holds the lock, it means a step was interrupted (crash, kill, power loss) or failed
    after touching files outside its transaction: the store is *dirty* until someone checks and runs ``repair``.
    """

    version: str
    direction: Direction
    name: str
    started_at: datetime
    host: str
    pid: int
    backup: str | None = None
    touched_files: bool = False
    error: str | None = None

    def explain(self) -> str:
        """A paragraph for humans: what happened, what state the data is in, and the ways out."""
        what = (f"migration {self.version} ({self.name}, {self.direction}) started at {_when(self.started_at)} by "
                f"{self.host} pid {self.pid} did not finish")
        if self.error:
            what += f": it failed with {self.error}"
        if self.touched_files:
            state = ("It used the data folder directly (ctx.path), which its transaction cannot undo, so files "
                     "there may be half-changed; the documents themselves are as they were before it.")
        else:
            state = ("Its transaction was never committed, so the documents and the ledger are as they were before "
                     "it (unless it changed something outside the store).")
        backup = f" A backup taken just before is '{self.backup}' (storage restore {self.backup})." if self.backup \
            else ""
        return (f"{what}. {state}{backup} Check the data, then run `python -m storage migrate repair` "
                "(Migrator.repair()) to clear the mark, and migrate again.")

    def __repr__(self) -> str:
        return (f"InProgress({self.version!r}, {self.direction!r}, started_at={_when(self.started_at)}, "
                f"host={self.host!r}, pid={self.pid})")


@dataclass(frozen=True, repr=False)
class MigrationStatus:
    """Where the store stands.

    ``current`` is the highest applied version (None before any). ``applied`` is in applied order, ``pending`` in
    version order. ``in_progress`` is the marker of a step that is running or was interrupted; ``running`` says
    another migrator holds the lock right now. ``dirty`` (marker present, nobody running) blocks ``upgrade`` and
    ``downgrade`` until ``repair``.
    """

    current: str | None
    applied: tuple[AppliedMigration, ...]
    pending: tuple[PendingMigration, ...]
    in_progress: InProgress | None = None
    running: bool = False

    @property
    def dirty(self) -> bool:
        return self.in_progress is not None and not self.running

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.dirty

    def __repr__(self) -> str:
        state = "dirty" if self.dirty else "running" if self.running else "clean"
        return (f"MigrationStatus(current={self.current!r}, applied={[a.version for a in self.applied]}, "
                f"pending={[p.version for p in self.pending]}, {state})")


@dataclass(frozen=True, repr=False)
class MigrationProblem:
    """One disagreement between the ledger and the code, found by ``validate()``.

    ``kind``: ``changed`` (applied, code edited since), ``missing`` (applied, no longer in the list),
    ``out_of_order`` (not applied, older than the newest applied one), ``interrupted`` (a step did not finish).
    """

    kind: ProblemKind
    version: str
    message: str

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"MigrationProblem({self.kind!r}, {self.version!r}: {self.message!r})"


@dataclass(frozen=True, repr=False)
class StepResult:
    """One migration applied (``up``) or rolled back (``down``)."""

    version: str
    description: str
    direction: Direction
    duration: float

    def __repr__(self) -> str:
        return f"StepResult({self.direction} {self.version!r}, {self.duration:.3f}s)"


@dataclass(frozen=True, repr=False)
class MigrationRun:
    """What ``upgrade``/``downgrade`` did, in the order it did it, and the backup taken before (if any)."""

    direction: Direction
    steps: tuple[StepResult, ...] = ()
    backup: str | None = None

    @property
    def versions(self) -> list[str]:
        return [s.version for s in self.steps]

    def __repr__(self) -> str:
        return f"MigrationRun({self.direction}: {self.versions}, backup={self.backup!r})"


@dataclass(frozen=True, repr=False)
class RepairResult:
    """What ``repair()`` changed: the interrupted marker it cleared, the versions whose checksum it realigned."""

    cleared: InProgress | None
    realigned: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.cleared is not None or bool(self.realigned)

    def __repr__(self) -> str:
        return f"RepairResult(cleared={self.cleared!r}, realigned={list(self.realigned)})"


@dataclass(frozen=True, repr=False)
class LogEntry:
    """A line of the append-only migration log: ``event`` is ``apply``, ``rollback`` or ``repair``."""

    seq: int
    event: str
    version: str | None
    description: str
    checksum: str | None
    at: datetime
    duration: float | None
    host: str
    pid: int
    detail: str | None = None

    def __repr__(self) -> str:
        return f"LogEntry(#{self.seq} {self.event} {self.version!r} at {_when(self.at)} by {self.host}:{self.pid})"
