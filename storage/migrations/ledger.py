"""The migration ledger, kept in the store itself so it travels with the data (backups, ``storage copy``).

Collections (ordinary documents, so both backends hold them the same way)::

    _migrations        key = version     one document per applied migration (removed when rolled back)
    _migration_log     key = 000000000001  append-only history: apply / rollback / repair, with host and pid
    _migration_notes   key = version     what up() left for down() in ``ctx.notes`` (only when it left something)
    _migration_state   key = in_progress the marker of a step that started and has not committed yet

Everything here reads and writes through a :class:`~storage.protocol.DocumentOps`, i.e. the store or, for the
writes that must commit with a migration's own changes, its transaction.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from ..errors import CorruptDataError
from ..protocol import Document, DocumentOps
from .results import AppliedMigration, InProgress, LogEntry

__all__ = [
    "LEDGER",
    "LOG",
    "NOTES",
    "STATE",
    "IN_PROGRESS",
    "RESERVED",
    "utcnow",
    "iso",
    "whoami",
    "read_applied",
    "read_in_progress",
    "in_progress_doc",
    "read_log",
    "append_log",
    "applied_doc",
]

LEDGER = "_migrations"
LOG = "_migration_log"
NOTES = "_migration_notes"
STATE = "_migration_state"
IN_PROGRESS = "in_progress"
#: Collections a migration may read but not write: the migrator owns them.
RESERVED = frozenset({LEDGER, LOG, NOTES, STATE})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise CorruptDataError(f"{where}: expected an ISO 8601 time, got {value!r}")
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        return datetime.fromisoformat(text).astimezone(timezone.utc)
    except ValueError:
        raise CorruptDataError(f"{where}: expected an ISO 8601 time, got {value!r}") from None


def whoami() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def applied_doc(*, version: str, description: str, name: str, checksum: str, applied_at: datetime,
                duration: float, seq: int) -> Document:
    return {"version": version, "description": description, "name": name, "checksum": checksum,
            "applied_at": iso(applied_at), "duration": round(duration, 6), "seq": seq, **whoami()}


def _applied(key: str, doc: Document) -> AppliedMigration:
    where = f"{LEDGER}/{key}"
    try:
        return AppliedMigration(
            version=str(doc.get("version", key)), description=str(doc.get("description", "")),
            name=str(doc.get("name", "")), checksum=str(doc.get("checksum", "")),
            applied_at=_parse_time(doc.get("applied_at"), where), duration=float(doc.get("duration", 0.0)),
            seq=int(doc["seq"]), host=str(doc.get("host", "")), pid=int(doc.get("pid", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptDataError(f"{where}: not a ledger entry ({exc!r}): {doc!r}") from exc


async def read_applied(ops: DocumentOps) -> list[AppliedMigration]:
    """Applied migrations in the order they were applied."""
    rows = [_applied(key, doc) async for key, doc in ops.items(LEDGER)]
    return sorted(rows, key=lambda a: a.seq)


async def read_in_progress(ops: DocumentOps) -> InProgress | None:
    # get_many, not get: a store may serve get() from a per-process cache, and this marker is written and cleared
    # by other processes; a stale copy would make a clean store look dirty.
    doc = (await ops.get_many(STATE, [IN_PROGRESS])).get(IN_PROGRESS)
    if doc is None:
        return None
    where = f"{STATE}/{IN_PROGRESS}"
    try:
        direction = doc["direction"]
        if direction not in ("up", "down"):
            raise ValueError(f"direction {direction!r}")
        return InProgress(version=str(doc["version"]), direction=direction, name=str(doc.get("name", "")),
                          started_at=_parse_time(doc.get("started_at"), where), host=str(doc.get("host", "")),
                          pid=int(doc.get("pid", 0)), backup=doc.get("backup"),
                          touched_files=bool(doc.get("touched_files", False)), error=doc.get("error"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptDataError(f"{where}: not a migration marker ({exc!r}): {doc!r}") from exc


def in_progress_doc(*, version: str, direction: str, name: str, backup: str | None) -> Document:
    return {"version": version, "direction": direction, "name": name, "started_at": iso(utcnow()),
            "backup": backup, **whoami()}


async def read_log(ops: DocumentOps) -> list[LogEntry]:
    out: list[LogEntry] = []
    async for key, doc in ops.items(LOG):
        where = f"{LOG}/{key}"
        try:
            duration = doc.get("duration")
            out.append(LogEntry(
                seq=int(key), event=str(doc["event"]), version=doc.get("version"),
                description=str(doc.get("description", "")), checksum=doc.get("checksum"),
                at=_parse_time(doc.get("at"), where), duration=None if duration is None else float(duration),
                host=str(doc.get("host", "")), pid=int(doc.get("pid", 0)), detail=doc.get("detail")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptDataError(f"{where}: not a log entry ({exc!r}): {doc!r}") from exc
    return sorted(out, key=lambda e: e.seq)


async def append_log(ops: DocumentOps, entries: Iterable[Document]) -> None:
    """Append entries after the last one. Called with the migration lock held, so the numbering cannot race."""
    last = 0
    async for key, _doc in ops.items(LOG):
        if key.isdigit():
            last = max(last, int(key))
    stamped = [(f"{last + i:012d}", {"at": iso(utcnow()), **whoami(), **entry}) for i, entry in
               enumerate(entries, start=1)]
    if stamped:
        await ops.put_many(LOG, stamped)
