"""``backup create|list|verify|prune``, ``restore`` and ``copy``: the operator's data-safety commands.

``backup list``, ``verify`` and ``prune`` work on the backup folder alone (no database connection needed), so they
also work when the store is down, which is exactly when someone needs them. Progress goes to stderr (a bar on a
terminal, a line every few seconds otherwise); the summary goes to stdout.

``copy --from A --to B`` and ``restore --into B``: a location that looks like a URL (``postgresql://...``) is a
PostgreSQL database, anything else a JSON data folder.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import time
from pathlib import Path
from typing import Any

from .. import open_store
from ..backup.copy import DEFAULT_BATCH_SIZE, TargetNotEmptyError, copy
from ..backup.format import BackupInfo, read_manifest, verify_backup_dir
from ..backup.operations import list_backup_entries, prune_backup_dir
from ..backup.source import describe_source, store_source
from ..cli import add_store_options, config_from_args, require_store
from ..config import StoreConfig
from ..dsn import redact_dsn
from ..errors import BackupError, ValidationError
from ..progress import TerminalProgress

__all__ = ["register", "location_config"]

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MALFORMED_URL_RE = re.compile(r"(?i)\s*postgres(?:ql)?[:/]")


def register(sub: Any) -> None:
    backup = sub.add_parser("backup", help="create, list, verify and prune backups")
    actions = backup.add_subparsers(dest="backup_command", metavar="ACTION")
    actions.required = True

    create = actions.add_parser("create", help="back up every collection and message from one snapshot")
    _store_options(create)
    _retention_options(create)
    create.add_argument("--label", help="a note stored in the manifest (shown by 'backup list')")
    create.add_argument("--extra", action="append", default=[], metavar="PATH_OR_GLOB",
                        help="also back up these files outside the data folder (repeatable; added to "
                             "$STORAGE_BACKUP_EXTRA), e.g. --extra 'message*.json' --extra 'roles*.json'")
    create.set_defaults(func=run_create)

    listing = actions.add_parser("list", help="the backups in the backup folder, oldest first")
    _store_options(listing)
    listing.set_defaults(func=run_list)

    verify = actions.add_parser("verify", help="check every file's sha256 and record count (exit 1 on a problem)")
    _store_options(verify)
    verify.add_argument("ids", nargs="*", metavar="ID", help="backups to verify (default: all)")
    verify.set_defaults(func=run_verify)

    prune = actions.add_parser("prune", help="remove the backups retention does not keep")
    _store_options(prune)
    _retention_options(prune)
    prune.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    prune.set_defaults(func=run_prune)

    restore = sub.add_parser("restore", help="replace the store's data with a backup (verified first; the "
                                            "current state is backed up before anything changes)")
    _store_options(restore)
    restore.add_argument("id", metavar="ID", help="the backup to restore (see 'backup list')")
    restore.add_argument("--dry-run", action="store_true", help="only show what would change")
    restore.add_argument("--into", metavar="TARGET",
                         help="restore into this store instead (postgresql://... URL or JSON folder)")
    restore.set_defaults(func=run_restore)

    copier = sub.add_parser("copy", help="copy every collection and message to another store, then verify")
    copier.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="postgresql://... URL or JSON data folder")
    copier.add_argument("--to", dest="target", required=True, metavar="TARGET",
                        help="postgresql://... URL or JSON data folder")
    copier.add_argument("--overwrite", action="store_true",
                        help="replace a target that already holds data (it ends as an exact copy)")
    copier.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="documents per write batch (default %(default)s)")
    copier.set_defaults(func=run_copy)


def _store_options(parser: argparse.ArgumentParser) -> None:
    add_store_options(parser)
    parser.add_argument("--backup-dir", help="where backups live (default: $STORAGE_BACKUP_DIR or ./backups)")


def _retention_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", type=int, metavar="N", help="keep the newest N backups "
                        "(default: $STORAGE_BACKUP_KEEP)")
    parser.add_argument("--keep-days", type=float, metavar="D", help="keep backups younger than D days")


def _config(args: argparse.Namespace) -> StoreConfig:
    """The store from the options/environment, with the backup settings of the environment (or --backup-dir)."""
    env = StoreConfig.from_env()
    config = config_from_args(args)
    return dataclasses.replace(config, backup_dir=getattr(args, "backup_dir", None) or env.backup_dir,
                               backup_keep=env.backup_keep,
                               backup_extra=(*env.backup_extra, *getattr(args, "extra", [])))


def location_config(location: str, *, backup_dir: str | None = None) -> StoreConfig:
    """A ``--from``/``--to``/``--into`` location as a store config: a URL is PostgreSQL, anything else a folder.
    Every other setting (pool sizes, ``STORAGE_PGBOUNCER``, timeouts...) comes from the environment."""
    if _MALFORMED_URL_RE.match(location) and not _URL_RE.match(location):  # never a folder named after a DSN
        raise ValidationError(f"malformed PostgreSQL URL {redact_dsn(location)}: it must start with postgresql:// "
                              "(or give a folder path)", field="location")
    config = StoreConfig.for_location(location)
    return config if backup_dir is None else dataclasses.replace(config, backup_dir=backup_dir)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _describe(info: BackupInfo) -> str:
    messages = f", {info.messages} messages" if info.messages is not None else ""
    files = f", {len(info.files)} files" if info.files else ""
    return (f"{sum(info.counts.values())} documents in {len(info.counts)} collections{messages}{files}, "
            f"{_size(info.size_bytes)} ({_size(info.raw_bytes)} uncompressed)")


def _print_counts(info: BackupInfo) -> None:
    for name, count in sorted(info.counts.items()):
        print(f"  {name:<32} {count:>12}")
    if info.messages is not None:
        print(f"  {'(messages)':<32} {info.messages:>12}")


def _print_files(info: BackupInfo, skipped: dict[str, str]) -> None:
    """What the backup holds besides the data (the CLI summary must say what was included, and what was not)."""
    if info.files:
        print(f"  files ({len(info.files)}, byte for byte):")
        for name, size in sorted(info.files.items()):
            print(f"    {name}  ({_size(size)})")
    else:
        print("  files: none besides the data")
    for name, why in sorted(skipped.items()):
        print(f"  not included: {name}: {why}")


async def run_create(args: argparse.Namespace) -> int:
    config = _config(args)
    require_store(config)  # a typo in --path must not back up an empty new folder (and prune real backups)
    started = time.monotonic()
    # read-only: no lock, no compaction, so a backup works on a read-only medium and never changes the store
    async with open_store(config=dataclasses.replace(config, read_only=True)) as store:
        before = {b.id for b in await store.list_backups()}  # type: ignore[attr-defined]
        info: BackupInfo = await store.create_backup(  # type: ignore[attr-defined]
            keep=args.keep, keep_days=args.keep_days, label=args.label, progress=TerminalProgress())
        after = {b.id for b in await store.list_backups()}  # type: ignore[attr-defined]
    print(f"backup {info.id} created and verified in {time.monotonic() - started:.1f}s: {info.path}")
    print(f"  from {config.describe()}; {_describe(info)}; migration version {info.migration_version or '-'}")
    _print_counts(info)
    _print_files(info, read_manifest(info.path).get("skipped_files") or {})
    pruned = sorted(before - after)
    if pruned:
        print(f"retention removed {len(pruned)} backup(s) of this store: {', '.join(pruned)}")
    if config.backend == "postgres":
        print(f"note: backups of a PostgreSQL store are written to the local folder {info.path.parent.absolute()}"
              " (STORAGE_BACKUP_DIR / --backup-dir). On Railway and other containers that folder is ephemeral: "
              "point it at a mounted volume, or copy each backup elsewhere.")
    return 0


async def run_list(args: argparse.Namespace) -> int:
    backup_dir = Path(_config(args).backup_dir)
    entries = await asyncio.to_thread(list_backup_entries, backup_dir)
    if not entries:
        print(f"no backups in {backup_dir}")
        return 0
    print(f"{'ID':<20} {'CREATED (UTC)':<20} {'DOCUMENTS':>10} {'MESSAGES':>10} {'SIZE':>10}  "
          f"{'MIGRATION':<10} SOURCE STORE / LABEL")
    for backup_id, info in entries:
        if isinstance(info, BackupError):
            print(f"{backup_id:<20} UNREADABLE: {info}")
            continue
        messages = str(info.messages) if info.messages is not None else "-"
        source = f"{info.backend} {describe_source(info.source)}"
        print(f"{backup_id:<20} {info.created_at:%Y-%m-%d %H:%M:%S}  "
              f"{sum(info.counts.values()):>10} {messages:>10} {_size(info.size_bytes):>10}  "
              f"{info.migration_version or '-':<10} {source}" + (f"  ({info.label})" if info.label else ""))
    return 0


async def run_verify(args: argparse.Namespace) -> int:
    backup_dir = Path(_config(args).backup_dir)
    ids = args.ids or [backup_id for backup_id, _ in await asyncio.to_thread(list_backup_entries, backup_dir)]
    if not ids:
        print(f"no backups in {backup_dir}")
        return 0
    failed = 0
    for backup_id in ids:
        report = await asyncio.to_thread(verify_backup_dir, backup_dir, backup_id, TerminalProgress())
        if report.ok and report.info is not None:
            print(f"{backup_id}: OK ({_describe(report.info)})")
        else:
            failed += 1
            print(f"{backup_id}: FAILED")
            for problem in report.problems:
                print(f"  - {problem}")
    print(f"{len(ids) - failed} of {len(ids)} backup(s) verified" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


async def run_prune(args: argparse.Namespace) -> int:
    config = _config(args)
    keep = args.keep if args.keep is not None else config.backup_keep
    if keep is None and args.keep_days is None:
        print("nothing to do: give --keep N and/or --keep-days D (or set STORAGE_BACKUP_KEEP)")
        return 2
    source = store_source(config)
    removed = await asyncio.to_thread(prune_backup_dir, Path(config.backup_dir), keep, args.keep_days,
                                      dry_run=args.dry_run, source=source)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} backup(s) of {describe_source(source)}"
          + (": " + ", ".join(b.id for b in removed) if removed else "")
          + " (backups of other stores in the folder are not counted nor removed)")
    return 0


async def run_restore(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.into:
        config = location_config(args.into, backup_dir=config.backup_dir)
    started = time.monotonic()
    async with open_store(config=config) as store:
        report = await store.restore_backup(args.id, dry_run=args.dry_run,  # type: ignore[attr-defined]
                                            progress=TerminalProgress())
    what = "dry run of restoring" if report.dry_run else "restored"
    print(f"{what} backup {report.backup_id} into {config.describe()} in {time.monotonic() - started:.1f}s")
    if report.safety_backup:
        print(f"  the previous state was saved first as backup {report.safety_backup}")
    print(f"  {'COLLECTION':<32} {'BACKUP':>10} {'CURRENT':>10} {'ADDED':>8} {'CHANGED':>8} {'REMOVED':>8}")
    for name, change in sorted(report.collections.items()):
        print(f"  {name:<32} {change.backup:>10} {change.current:>10} {change.added:>8} {change.changed:>8} "
              f"{change.removed:>8}")
    if report.messages is not None:
        current, backup = report.messages
        print(f"  messages: {current} now, {backup} in the backup" + (" (all replaced)" if not args.dry_run else ""))
    print(f"  {report.changed} document(s) " + ("would change" if report.dry_run else "changed"))
    for name, paths in sorted(report.indexes.items()):
        print(f"  index {'to declare' if report.dry_run else 'declared'} on {name}: {', '.join(paths)}")
    for name, what in sorted(report.files.items()):
        print(f"  file {name}: {what}")
    return 0


async def run_copy(args: argparse.Namespace) -> int:
    source_config = location_config(args.source)
    target_config = location_config(args.target)
    # A typo'd source would copy nothing, and with --overwrite empty the target: it must hold a store.
    await asyncio.to_thread(require_store, source_config)
    source_config = dataclasses.replace(source_config, read_only=True)  # copying never changes the source
    async with open_store(config=source_config) as source, open_store(config=target_config) as target:
        try:
            report = await copy(source, target, overwrite=args.overwrite, batch_size=args.batch_size,
                                progress=TerminalProgress())
        except TargetNotEmptyError as exc:  # the API's message names overwrite=True; the CLI names its flag
            raise TargetNotEmptyError(f"the target already holds data: {exc.contents}; nothing was copied (pass "
                                      "--overwrite to replace it with the source's data)",
                                      contents=exc.contents) from None
    rate = report.records / report.seconds if report.seconds > 0 else 0.0
    print(f"copied {source_config.describe()} -> {target_config.describe()}")
    print(f"  {sum(report.counts.values())} documents in {len(report.counts)} collections"
          + (f", {report.messages} messages" if report.messages is not None else "")
          + f" in {report.seconds:.1f}s ({rate:,.0f} records/s); counts and content digests verified")
    for name, count in sorted(report.counts.items()):
        print(f"  {name:<32} {count:>12}")
    if report.deleted:
        print(f"  {report.deleted} document(s) the source does not have were deleted from the target (--overwrite)")
    if report.deleted_messages:
        print(f"  {report.deleted_messages} message(s) of the target were deleted before the source's were copied "
              "(--overwrite)")
    for name, paths in sorted(report.indexes.items()):
        print(f"  indexes on {name}: {', '.join(paths)} (declared on the target and verified)")
    for name, paths in sorted(report.dropped_indexes.items()):
        print(f"  indexes on {name} the source does not have were dropped from the target (--overwrite): "
              f"{', '.join(paths)}")
    return 0
