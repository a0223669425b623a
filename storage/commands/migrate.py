"""``storage migrate status|plan|up|down|validate|repair|history``: data migrations from the command line.

Migrations come from a module (``--migrations mybot.migrations`` or ``$STORAGE_MIGRATIONS``) exposing a list
``MIGRATIONS`` or defining :class:`storage.migrations.Migration` subclasses. Exit codes: 0 ok, 1 error (including a
migration that failed: nothing of it was kept), 2 a state a human must look at (``validate`` found problems, or
``up``/``down`` refused because of them or because an earlier migration was interrupted).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from .. import open_store
from ..cli import add_store_options, config_from_args, require_store
from ..migrations import (
    DirtyMigrationError,
    Migration,
    MigrationFailedError,
    MigrationRun,
    MigrationValidationError,
    Migrator,
    load_migrations,
)
from ..migrations.loader import ENV_VAR

__all__ = ["register"]

EXIT_OK, EXIT_ERROR, EXIT_PROBLEMS = 0, 1, 2


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_store_options(common)
    common.add_argument("--migrations", metavar="MODULE",
                        help=f"module with the migrations: a MIGRATIONS list or Migration subclasses "
                             f"(default: ${ENV_VAR})")
    common.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long to wait for another migrator (default: the store's lock timeout)")

    parser = sub.add_parser(
        "migrate", help="apply, roll back and inspect data migrations",
        description="Apply, roll back and inspect data migrations (storage.migrations) on the configured store.",
        epilog=f"Migrations: --migrations MODULE or ${ENV_VAR} (a MIGRATIONS list or Migration subclasses). "
               "Exit codes: 0 ok, 1 error, 2 problems a human must look at (validate, dirty store).")
    actions = parser.add_subparsers(dest="migrate_action", metavar="ACTION")
    actions.required = True

    status = actions.add_parser("status", parents=[common], help="current version, applied and pending migrations "
                                                                 "(exit 2 if an interrupted migration left it dirty)")
    status.set_defaults(func=_runner(_status))

    plan = actions.add_parser("plan", parents=[common], help="what up (or down, with --down/--steps) would run, "
                                                             "in order, without running it")
    plan.add_argument("--target", help="stop at this version")
    plan.add_argument("--down", action="store_true", help="plan a rollback (default: one step)")
    plan.add_argument("--steps", type=int, help="plan rolling back this many applied migrations")
    plan.set_defaults(func=_runner(_plan))

    up = actions.add_parser("up", parents=[common], help="apply pending migrations (each all-or-nothing)")
    up.add_argument("--target", help="apply up to and including this version (default: all)")
    _run_options(up)
    up.set_defaults(func=_runner(_up))

    down = actions.add_parser("down", parents=[common], help="roll back, newest applied first (default: one step)")
    down.add_argument("--target", help="roll back every migration above this version ('0': all)")
    down.add_argument("--steps", type=int, help="roll back this many applied migrations")
    _run_options(down)
    down.set_defaults(func=_runner(_down))

    validate = actions.add_parser("validate", parents=[common], help="compare the ledger with the code: edited, "
                                                                     "missing, out-of-order (exit 2 on problems)")
    validate.set_defaults(func=_runner(_validate))

    repair = actions.add_parser("repair", parents=[common], help="after checking the data: clear an interrupted "
                                                                 "migration's mark, accept edited migrations")
    repair.set_defaults(func=_runner(_repair))

    history = actions.add_parser("history", parents=[common], help="the log of every apply, rollback and repair")
    history.set_defaults(func=_runner(_history))


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-backup", dest="backup", action="store_false",
                        help="do not take a backup first (default: take one)")
    parser.add_argument("--force", action="store_true",
                        help="run even though validate reports problems (never past an interrupted migration)")


Action = Callable[[Migrator, argparse.Namespace], Awaitable[int]]


def _runner(action: Action) -> Callable[[argparse.Namespace], Awaitable[int]]:
    async def run(args: argparse.Namespace) -> int:
        config = config_from_args(args)
        if action is not _up:  # "up" may create the store (a first deploy); the rest need an existing one
            require_store(config)
        migrations = load_migrations(args.migrations)
        print(f"store: {config.describe()}")
        try:
            async with open_store(config=config) as store:
                return await action(Migrator(store, migrations, lock_timeout=args.lock_timeout), args)
        except (MigrationValidationError, DirtyMigrationError) as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return EXIT_PROBLEMS
        except MigrationFailedError as exc:
            _print_run(exc.completed)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _when(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC")


def _line(migration: Migration) -> str:
    return f"  {migration.version:<10} {migration.description}"


async def _status(migrator: Migrator, args: argparse.Namespace) -> int:
    status = await migrator.status()
    print(f"current version: {status.current or '(none applied)'}")
    print(f"applied ({len(status.applied)}):")
    for a in status.applied:
        print(f"  {a.version:<10} {_when(a.applied_at)}  {a.duration:8.3f}s  {a.description}")
    print(f"pending ({len(status.pending)}):")
    for p in status.pending:
        print(f"  {p.version:<10} {p.description}")
    if status.running and status.in_progress is not None:
        ip = status.in_progress
        print(f"state: a migration is running now ({ip.version} {ip.direction}, {ip.host} pid {ip.pid})")
    elif status.dirty and status.in_progress is not None:
        print(f"state: DIRTY: {status.in_progress.explain()}")
        return EXIT_PROBLEMS
    else:
        print("state: clean" + ("" if status.pending else ", up to date"))
    return EXIT_OK


async def _plan(migrator: Migrator, args: argparse.Namespace) -> int:
    if args.down or args.steps is not None:
        steps = await migrator.plan_downgrade(args.target, steps=args.steps)
        print("down would roll back, in order:" if steps else "nothing to roll back")
    else:
        steps = await migrator.plan(args.target)
        print("up would apply, in order:" if steps else "up to date: nothing to apply")
    for migration in steps:
        print(_line(migration))
    status = await migrator.status()
    if status.dirty:
        print("note: the store is dirty (an interrupted migration): up/down will refuse until `migrate repair`")
    return EXIT_OK


def _print_run(run: MigrationRun) -> None:
    if run.backup:
        print(f"backup taken first: {run.backup}")
    verb = "applied" if run.direction == "up" else "rolled back"
    for step in run.steps:
        print(f"  {verb} {step.version:<10} in {step.duration:.3f}s  {step.description}")


async def _up(migrator: Migrator, args: argparse.Namespace) -> int:
    run = await migrator.upgrade(args.target, backup=args.backup, force=args.force)
    _print_run(run)
    status = await migrator.status()
    print(f"{len(run.steps)} migration(s) applied; current version: {status.current or '(none)'}" if run.steps
          else f"up to date: nothing to apply (current version: {status.current or '(none)'})")
    return EXIT_OK


async def _down(migrator: Migrator, args: argparse.Namespace) -> int:
    before = await migrator.status()
    if not before.applied and not before.dirty:  # nothing to do is success (a dirty store still refuses below)
        print("nothing to roll back: no migration is applied")
        return EXIT_OK
    run = await migrator.downgrade(args.target, steps=args.steps, backup=args.backup, force=args.force)
    _print_run(run)
    status = await migrator.status()
    print(f"{len(run.steps)} migration(s) rolled back; current version: {status.current or '(none)'}" if run.steps
          else "nothing to roll back")
    return EXIT_OK


async def _validate(migrator: Migrator, args: argparse.Namespace) -> int:
    problems = await migrator.validate()
    if not problems:
        status = await migrator.status()
        print(f"ok: the ledger and the {len(migrator.migrations)} migrations agree "
              f"({len(status.applied)} applied, {len(status.pending)} pending)")
        return EXIT_OK
    print(f"{len(problems)} problem(s):")
    for problem in problems:
        print(f"  [{problem.kind}] {problem}")
    return EXIT_PROBLEMS


async def _repair(migrator: Migrator, args: argparse.Namespace) -> int:
    result = await migrator.repair()
    if not result.changed:
        print("nothing to repair")
    if result.cleared is not None:
        print(f"cleared the mark of the interrupted migration {result.cleared.version} ({result.cleared.direction}, "
              f"started {_when(result.cleared.started_at)} by {result.cleared.host} pid {result.cleared.pid})")
    for version in result.realigned:
        print(f"accepted the current code of {version} (checksum realigned)")
    return EXIT_OK


async def _history(migrator: Migrator, args: argparse.Namespace) -> int:
    entries = await migrator.history()
    if not entries:
        print("no migration has run on this store")
    for e in entries:
        took = f"{e.duration:.3f}s" if e.duration is not None else ""
        detail = f"  ({e.detail})" if e.detail else ""
        print(f"  #{e.seq:<4} {_when(e.at)}  {e.event:<8} {e.version or '':<10} {took:>9}  {e.host}:{e.pid}  "
              f"{e.description}{detail}")
    return EXIT_OK
