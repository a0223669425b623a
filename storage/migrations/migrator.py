"""``Migrator``: plans, applies and rolls back migrations on any store, with a ledger, a lock and a dirty flag.

How a step runs (``upgrade`` and ``downgrade`` alike), with the migration lock held for the whole run:

1. re-read the ledger (another migrator may have run between our plan and now; the lock makes it current);
2. commit an *in-progress* marker (``_migration_state/in_progress``);
3. in **one** ``store.transaction()``: ``up()`` (or ``down()``), the ledger row, the log line, and the removal of
   the marker. On JSON that is one journal line written with the store's lock held throughout (so the bot's writers
   wait for the step); on PostgreSQL one real transaction (writers wait only on the rows it changed; readers see
   the old rows until it commits).

An exception in ``up()`` rolls the transaction back, so documents and ledger are exactly as before, and the marker is
removed. A crash or ``kill -9`` between 2 and the commit leaves the marker: the next migrator finds it with nobody
holding the lock, reports the store *dirty* and refuses to run until a human checks and calls :meth:`repair`. The
same happens when a failed step had used the JSON escape hatch ``ctx.path`` (file changes are not transactional).

Problems ``validate()`` reports (edited, missing or out-of-order migrations) also make ``upgrade`` refuse, unless
``force=True``; ``downgrade`` refuses only for the migrations it would roll back. Before running anything, both take
a backup when the store can make one (``backup=True``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import DatabaseError, MigrationError
from ..interfaces import MigrationLock
from ..protocol import Store, Transaction
from .context import MigrationContext
from .errors import DirtyMigrationError, MigrationFailedError, MigrationValidationError
from .ledger import (
    IN_PROGRESS,
    LEDGER,
    NOTES,
    STATE,
    append_log,
    applied_doc,
    in_progress_doc,
    read_applied,
    read_in_progress,
    read_log,
    utcnow,
)
from .migration import Migration
from .results import (
    AppliedMigration,
    Direction,
    InProgress,
    LogEntry,
    MigrationProblem,
    MigrationRun,
    MigrationStatus,
    PendingMigration,
    RepairResult,
    StepResult,
)
from .version import BASE_VERSION, Version, parse_version

__all__ = ["Migrator", "check_migrations"]

log = logging.getLogger("storage.migrations")


def check_migrations(migrations: Iterable[Migration | type[Migration]]) -> list[Migration]:
    """The migrations sorted by version; a class is instantiated. Malformed or duplicate versions raise."""
    if isinstance(migrations, (str, bytes, Migration)):
        raise MigrationError("migrations must be a list of Migration objects")
    seen: dict[Version, Migration] = {}
    for index, item in enumerate(migrations):
        migration = _instantiate(item) if isinstance(item, type) and issubclass(item, Migration) else item
        if not isinstance(migration, Migration):
            raise MigrationError(f"migrations[{index}] is {item!r}, not a Migration (or Migration subclass)")
        version = parse_version(getattr(migration, "version", None), what=f"the version of {migration.name}")
        if version == BASE_VERSION:
            raise MigrationError(f"{migration.name}: version {version} is reserved for 'before any migration'")
        if version in seen:
            other = seen[version]
            raise MigrationError(f"duplicate migration version {version}: {other.name} ({other.version!r}) and "
                                 f"{migration.name} ({migration.version!r})")
        seen[version] = migration
    return [seen[v] for v in sorted(seen)]


def _instantiate(cls: type[Migration]) -> Migration:
    try:
        return cls()
    except TypeError as exc:
        raise MigrationError(f"cannot create {cls.__module__}.{cls.__qualname__} without arguments ({exc}): list "
                             "instances instead (MIGRATIONS = [MyMigration(...)])") from exc


@dataclass
class _State:
    """The ledger as read at one moment."""

    applied: list[AppliedMigration]
    in_progress: InProgress | None
    by_version: dict[Version, AppliedMigration] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_version = {parse_version(a.version, what=f"ledger entry {a.version!r}"): a for a in self.applied}


class Migrator:
    """Runs ``migrations`` (Migration objects or classes, any order) against ``store``.

    ``lock_timeout`` (seconds, default the store's ``lock_timeout``) bounds the wait for another migrator.
    """

    def __init__(self, store: Store, migrations: Iterable[Migration | type[Migration]], *,
                 lock_timeout: float | None = None) -> None:
        self.store = store
        self.migrations: tuple[Migration, ...] = tuple(check_migrations(migrations))
        self._by_version = {parse_version(m.version): m for m in self.migrations}
        self._checksums = {v: m.checksum() for v, m in self._by_version.items()}
        self.lock_timeout = float(lock_timeout if lock_timeout is not None else store.config.lock_timeout)
        self._lock: MigrationLock | None = None  # while a run holds it
        self.backend = store.backend_name

    def __repr__(self) -> str:
        return f"<Migrator {len(self.migrations)} migrations on {self.store!r}>"

    # -- reading -------------------------------------------------------------------------------------------------------
    async def _read(self) -> _State:
        return _State(await read_applied(self.store), await read_in_progress(self.store))

    async def _running_elsewhere(self, state: _State) -> bool:
        """A marker with the lock held means a migration is running now; with the lock free, an interrupted one."""
        if state.in_progress is None:
            return False
        lock = self.store.migration_lock()
        if await lock.acquire(0):
            await lock.release()
            return False
        return True

    def _problems(self, state: _State, *, running: bool) -> list[MigrationProblem]:
        problems: list[MigrationProblem] = []
        if state.in_progress is not None and not running:
            ip = state.in_progress
            problems.append(MigrationProblem("interrupted", ip.version, ip.explain()))
        for applied in state.applied:
            version = parse_version(applied.version)
            migration = self._by_version.get(version)
            when = applied.applied_at.strftime("%Y-%m-%d %H:%M:%SZ")
            if migration is None:
                problems.append(MigrationProblem(
                    "missing", applied.version,
                    f"{applied.version} ({applied.name or applied.description}) was applied on {when} but is not in "
                    "the migration list: restore its code (needed to roll it back), or keep it knowingly"))
            elif self._checksums[version] != applied.checksum:
                problems.append(MigrationProblem(
                    "changed", applied.version,
                    f"{applied.version} ({migration.name}) changed since it was applied on {when}: the code that ran "
                    "is not the code you have. Revert the edit (write a new migration instead), or accept it with "
                    "`migrate repair`"))
        if state.by_version:
            newest = max(state.by_version)
            for version, migration in self._by_version.items():
                if version not in state.by_version and version < newest:
                    problems.append(MigrationProblem(
                        "out_of_order", migration.version,
                        f"{migration.version} ({migration.name}) is not applied but is older than the newest applied "
                        f"migration {newest}: it was probably merged late. Give it a newer version, or run it out of "
                        "order with force"))
        return problems

    def _status(self, state: _State, running: bool) -> MigrationStatus:
        pending = tuple(PendingMigration(m.version, m.description, m.name)
                        for v, m in self._by_version.items() if v not in state.by_version)
        current = max(state.by_version).text if state.by_version else None
        return MigrationStatus(current=current, applied=tuple(state.applied), pending=pending,
                               in_progress=state.in_progress, running=running)

    async def status(self) -> MigrationStatus:
        """Current version, applied (with times and durations), pending, and whether the store is dirty."""
        state = await self._read()
        return self._status(state, await self._running_elsewhere(state))

    async def validate(self) -> list[MigrationProblem]:
        """Every disagreement between the ledger and the code (empty when they agree). Changes nothing."""
        state = await self._read()
        return self._problems(state, running=await self._running_elsewhere(state))

    async def history(self) -> list[LogEntry]:
        """The append-only log: every apply, rollback and repair, oldest first."""
        return await read_log(self.store)

    # -- planning ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _upgrade_target(target: str | None) -> Version | None:
        """A target is a boundary, not necessarily a migration's version: ``upgrade("2")`` applies up to 1.x."""
        return None if target is None else parse_version(target, what="target")

    def _pending(self, state: _State, target: Version | None) -> list[Migration]:
        return [m for v, m in self._by_version.items()
                if v not in state.by_version and (target is None or v <= target)]

    def _rollbacks(self, state: _State, target: str | None, steps: int | None) -> list[Migration]:
        if target is not None and steps is not None:
            raise MigrationError("give a target or a number of steps to roll back, not both")
        newest_first = list(reversed(state.applied))
        if target is not None:
            version = parse_version(target, what="target")
            chosen = [a for a in newest_first if parse_version(a.version) > version]
        else:
            count = 1 if steps is None else steps
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise MigrationError(f"steps must be a positive integer, got {steps!r}")
            if count > len(newest_first):
                raise MigrationError(f"cannot roll back {count} step(s): only {len(newest_first)} applied")
            chosen = newest_first[:count]
        out: list[Migration] = []
        for applied in chosen:
            migration = self._by_version.get(parse_version(applied.version))
            if migration is None:
                raise MigrationError(f"cannot roll back {applied.version} ({applied.name}): its code is not in the "
                                     "migration list")
            if not migration.reversible:
                raise MigrationError(f"cannot roll back {applied.version} ({migration.name}): it has no down()")
            out.append(migration)
        return out

    async def plan(self, target: str | None = None) -> list[Migration]:
        """What :meth:`upgrade` (with the same target) would apply, in order. A dry run: changes nothing."""
        version = self._upgrade_target(target)
        return self._pending(await self._read(), version)

    async def plan_downgrade(self, target: str | None = None, *, steps: int | None = None) -> list[Migration]:
        """What :meth:`downgrade` would roll back, in the order it would (newest applied first). Changes nothing."""
        return self._rollbacks(await self._read(), target, steps)

    # -- running -------------------------------------------------------------------------------------------------------
    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        lock = self.store.migration_lock()
        await lock.hold(self.lock_timeout, what=f"migrating {self.store!r}")
        self._lock = lock
        try:
            yield
        finally:
            self._lock = None
            await lock.release()

    @staticmethod
    def _refuse_dirty(state: _State) -> None:
        if state.in_progress is not None:  # we hold the lock: nobody is running it, it was interrupted
            raise DirtyMigrationError(state.in_progress)

    @staticmethod
    def _refuse_problems(problems: Sequence[MigrationProblem], action: str) -> None:
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise MigrationValidationError(
                f"refusing to {action}: the ledger and the migrations disagree (nothing was changed):\n{listed}\n"
                "Fix the code or run `migrate repair`; or pass force=True (--force) to go ahead anyway.", problems)

    async def upgrade(self, target: str | None = None, *, backup: bool = True, force: bool = False) -> MigrationRun:
        """Apply pending migrations up to ``target`` (default: all), in version order, each all-or-nothing."""
        version = self._upgrade_target(target)
        async with self._locked():
            state = await self._read()
            self._refuse_dirty(state)
            todo = self._pending(state, version)
            if not todo:
                return MigrationRun("up")
            if not force:
                self._refuse_problems(self._problems(state, running=False), "upgrade")
            backup_id = await self._backup("up", todo) if backup else None
            return await self._run("up", todo, backup_id)

    async def downgrade(self, target: str | None = None, *, steps: int | None = None, backup: bool = True,
                        force: bool = False) -> MigrationRun:
        """Roll back, newest *applied* first: everything above ``target`` (``"0"``: all), or the last ``steps``
        (default: one). Refuses to cross a migration whose code is missing or has no ``down()``."""
        async with self._locked():
            state = await self._read()
            self._refuse_dirty(state)
            todo = self._rollbacks(state, target, steps)
            if not todo:
                return MigrationRun("down")
            if not force:
                versions = {m.version for m in todo}
                self._refuse_problems([p for p in self._problems(state, running=False) if p.version in versions],
                                      "downgrade")
            backup_id = await self._backup("down", todo) if backup else None
            return await self._run("down", todo, backup_id)

    async def repair(self) -> RepairResult:
        """Clear an interrupted step's marker and accept edited migrations' current code (realign checksums).

        Call it after checking the data (or restoring the backup named in the marker). Logged in the history.
        """
        async with self._locked():
            state = await self._read()
            realign = [a for a in state.applied if (v := parse_version(a.version)) in self._by_version
                       and self._checksums[v] != a.checksum]
            if state.in_progress is None and not realign:
                return RepairResult(None, ())
            entries: list[dict[str, Any]] = []
            async with self.store.transaction() as tx:
                if state.in_progress is not None:
                    ip = state.in_progress
                    await tx.delete(STATE, IN_PROGRESS)
                    entries.append({"event": "repair", "version": ip.version, "description": "",
                                    "detail": f"cleared the mark of an interrupted {ip.direction} started at "
                                              f"{ip.started_at.isoformat()} by {ip.host} pid {ip.pid}"})
                for applied in realign:
                    new = self._checksums[parse_version(applied.version)]
                    doc = await tx.get(LEDGER, applied.version)
                    await tx.put(LEDGER, applied.version, {**(doc or {}), "checksum": new,
                                                           "previous_checksum": applied.checksum})
                    entries.append({"event": "repair", "version": applied.version,
                                    "description": applied.description, "checksum": new,
                                    "detail": f"checksum realigned to the current code (was {applied.checksum})"})
                await append_log(tx, entries)
            return RepairResult(state.in_progress, tuple(a.version for a in realign))

    async def _backup(self, direction: Direction, todo: list[Migration]) -> str | None:
        label = f"automatic: before migrate {direction} ({', '.join(m.version for m in todo)})"
        try:
            info = await self.store.create_backup(label=label)
        except Exception as exc:
            raise MigrationError(f"the backup before migrating failed, so nothing was migrated: {exc} (pass "
                                 "backup=False / --no-backup to migrate without a backup)") from exc
        return info.id

    async def _run(self, direction: Direction, todo: list[Migration], backup_id: str | None) -> MigrationRun:
        done: list[StepResult] = []
        for migration in todo:
            state = await self._read()  # current under the lock: what an earlier holder did is visible
            self._refuse_dirty(state)
            applied = state.by_version.get(parse_version(migration.version))
            if (applied is None) == (direction == "down"):
                log.info("%s is already %s: skipped", migration.version,
                         "applied" if direction == "up" else "rolled back")
                continue
            done.append(await self._step(migration, direction, state, applied, backup_id, done))
        return MigrationRun(direction, tuple(done), backup_id)

    def _context(self, tx: Transaction, migration: Migration, direction: Direction,
                 notes: dict[str, Any] | None) -> MigrationContext:
        return MigrationContext(
            tx, version=migration.version, name=migration.name, direction=direction, backend=self.backend,
            config=self.store.config, connection=tx.connection, path=self.store.data_folder(), notes=notes)

    async def _step(self, migration: Migration, direction: Direction, state: _State, applied: AppliedMigration | None,
                    backup_id: str | None, done: list[StepResult]) -> StepResult:
        key = applied.version if applied is not None else migration.version  # the ledger's own spelling
        checksum = self._checksums[parse_version(migration.version)]
        marker = in_progress_doc(version=key, direction=direction, name=migration.name, backup=backup_id)
        await self.store.put(STATE, IN_PROGRESS, marker)
        log.info("migration %s (%s) %s: starting", migration.version, migration.name, direction)
        ctx: MigrationContext | None = None
        started, t0 = utcnow(), time.perf_counter()
        try:
            async with self.store.transaction() as tx:
                notes = await tx.get(NOTES, key) if direction == "down" else None
                ctx = self._context(tx, migration, direction, notes)
                await (migration.up(ctx) if direction == "up" else migration.down(ctx))
                ctx._close()
                duration = time.perf_counter() - t0
                if direction == "up":
                    seq = max((a.seq for a in state.applied), default=0) + 1
                    await tx.put(LEDGER, key, applied_doc(
                        version=key, description=migration.description, name=migration.name, checksum=checksum,
                        applied_at=started, duration=duration, seq=seq))
                    if ctx.notes:
                        await tx.put(NOTES, key, ctx.notes)
                else:
                    await tx.delete(LEDGER, key)
                    await tx.delete(NOTES, key)
                await append_log(tx, [{"event": "apply" if direction == "up" else "rollback", "version": key,
                                       "description": migration.description, "name": migration.name,
                                       "checksum": checksum, "duration": round(duration, 6), "backup": backup_id}])
                await tx.delete(STATE, IN_PROGRESS)
                if self._lock is not None:
                    await self._lock.verify(tx)  # still ours? else roll back: another migrator may be running
        except BaseException as exc:
            touched = ctx is not None and ctx.touched_files
            if ctx is not None:
                ctx._close()
            await self._after_failure(marker, exc, touched)
            if not isinstance(exc, Exception):
                raise
            message = f"migration {migration.version} ({migration.name}) failed in {direction}(): {exc!r}. "
            message += ("It used the data folder (ctx.path), whose changes a transaction cannot undo, so the store "
                        "is marked dirty: check the files, then `migrate repair`." if touched else
                        "Nothing it did was kept; the ledger is unchanged.")
            if done:
                message += f" Earlier steps of this run ({', '.join(s.version for s in done)}) stay {direction}."
            raise MigrationFailedError(message, version=migration.version,
                                       completed=MigrationRun(direction, tuple(done), backup_id)) from exc
        log.info("migration %s %s: done in %.3fs", migration.version, direction, duration)
        return StepResult(migration.version, migration.description, direction, duration)

    async def _after_failure(self, marker: dict[str, Any], exc: BaseException, touched: bool) -> None:
        """Leave the ledger as it was, or, if files outside the transaction may have changed, marked dirty."""
        try:
            if touched:
                await self.store.put(STATE, IN_PROGRESS, {**marker, "touched_files": True, "error": repr(exc)[:500]})
            else:
                await self.store.delete(STATE, IN_PROGRESS)
        except DatabaseError as cleanup:
            log.error("could not update the in-progress mark after a failed migration (%s): the store stays "
                      "marked dirty; run `migrate repair` once it is reachable", cleanup)
