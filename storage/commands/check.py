"""``storage check``: read everything the store owns and report every kind of damage (exit 1), changing nothing.

What is read, and where damage is reported:

* the collections and the journal: opening the store loads and replays them (a corrupt file or journal line is a
  :class:`CorruptDataError` with file and byte position), then every document is read back through the store;
* the migration ledger (``_migrations``, ``_migration_log``, ``_migration_state``): each entry is parsed as the
  migrator would, so a damaged entry is found by ``check`` and not by the next ``migrate up``;
* JSON: every message log file (``messages/<guild>/<YYYY-MM>.jsonl``), line by line, straight from the files: a
  store opens without reading them (they are read when a query needs them), so a corrupt line in the middle of a
  month would otherwise pass ``check`` and fail every analytics call. A torn *last* line (a crash mid-append, never
  acknowledged) is not damage: it is noted, and the next writer drops it;
* PostgreSQL: every document and every message row, decoded.
* documents a collection's rule refuses (storage/rules.py: a member with a negative ``message_count`` or a key that
  is not ``{guild}_{user}``, stored by an older version that did not check) are *noted*, not counted as damage:
  they read, back up and restore as they are, but the next write of such a document must correct it.

Every problem is listed (not only the first), each with its file and byte position when it has one. The store is
opened with ``read_only=True``: ``check`` takes no lock, cuts no torn line and compacts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

from .. import open_store
from ..backends.json.message_files import MESSAGES_DIR, iter_lines, list_files, parse_line
from ..backup.messages import MessageOps
from ..cli import add_store_options, existing_store_config
from ..config import StoreConfig
from ..errors import CorruptDataError, DatabaseError, ValidationError
from ..migrations.ledger import LEDGER, LOG, STATE, read_applied, read_in_progress, read_log
from ..rules import RULES, encode_for

__all__ = ["register", "run_check", "scan_message_files"]

#: Lines reported per damaged message file (the rest are counted).
MAX_REPORTED_LINES = 5


def register(sub: Any) -> None:
    check = sub.add_parser(
        "check", help="read every file/table the store owns and report any damage (exit 1), changing nothing",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_store_options(check)
    check.set_defaults(func=run_check)


def scan_message_files(root: Path) -> tuple[int, list[str], list[str]]:
    """Read every message log file under ``root``: ``(records, problems, notes)``, a problem naming the file and
    the byte position of each corrupt line. Reads only (``O_RDONLY``): a torn last line is noted, not cut."""
    records, problems, notes = 0, [], []
    for _key, path, st in list_files(root.absolute() / MESSAGES_DIR):
        fd = os.open(path, os.O_RDONLY)
        try:
            bad: list[tuple[int, str]] = []
            last = complete = 0  # where the last complete line starts, and where the complete lines end
            for offset, line in iter_lines(fd, 0, st.st_size):
                last, complete = offset, offset + len(line) + 1
                try:
                    parse_line(line)
                except ValueError as exc:
                    bad.append((offset, str(exc)))
                else:
                    records += 1
        finally:
            os.close(fd)
        if complete < st.st_size:
            notes.append(f"{path}: incomplete last line at byte {complete} (never acknowledged; the next write "
                         "drops it)")
        elif bad and bad[-1][0] == last:
            # The final line does not parse: a torn append (the backend treats it so, and cuts it on next write).
            notes.append(f"{path}: torn last line at byte {bad.pop()[0]} (never acknowledged; the next write "
                         "drops it)")
        for offset, why in bad[:MAX_REPORTED_LINES]:
            problems.append(f"{path}: corrupt message line at byte {offset} ({why})")
        if len(bad) > MAX_REPORTED_LINES:
            problems.append(f"{path}: {len(bad) - MAX_REPORTED_LINES} more corrupt line(s)")
    return records, problems, notes


def _where(exc: CorruptDataError) -> str:
    if exc.path is None:
        return ""
    return f" (file {exc.path}" + (f", byte {exc.position}" if exc.position is not None else "") + ")"


async def _check_documents(store: Any, config: StoreConfig, problems: list[str], notes: list[str]) -> int:
    total = 0
    for name in await store.collections():
        refused: list[str] = []
        async for key, doc in store.items(name):
            total += 1
            if name in RULES:
                try:
                    encode_for(name, key, doc)
                except ValidationError as exc:
                    refused.append(f"{key!r}: {exc}")
        if refused:
            shown = "; ".join(refused[:MAX_REPORTED_LINES]) + (f" (and {len(refused) - MAX_REPORTED_LINES} more)"
                                                               if len(refused) > MAX_REPORTED_LINES else "")
            notes.append(f"{len(refused)} document(s) of {name!r} would be refused by its rule if written now "
                         f"(stored by an older version; they read as they are): {shown}")
    stats = getattr(store, "stats", None)
    if callable(stats):
        for name, why in stats()["foreign_files"].items():
            notes.append(f"{name}.json is not a collection ({why}); left alone")
    for what, read in ((LEDGER, read_applied), (LOG, read_log), (STATE, read_in_progress)):
        try:
            await read(store)
        except CorruptDataError as exc:
            file = f" (file {Path(config.path) / (what + '.json')} or its journal lines)" \
                if config.backend == "json" else f" (table of collection {what})"
            problems.append(f"migration ledger: {exc}{file}")
    return total


async def _check_messages(store: Any) -> int:
    return sum([1 async for _record in MessageOps(store).scan()])


async def run_check(args: argparse.Namespace) -> int:
    # Read-only: no lock taken, no torn tail cut, no compaction at close; check never changes what it inspects.
    config = dataclasses.replace(existing_store_config(args), read_only=True)
    problems: list[str] = []
    notes: list[str] = []
    documents = messages = 0
    try:
        async with open_store(config=config) as store:
            documents = await _check_documents(store, config, problems, notes)
            if config.backend != "json":
                messages = await _check_messages(store)
    except CorruptDataError as exc:
        problems.append(f"{exc}{_where(exc)}")
    except DatabaseError as exc:
        print(f"FAILED: {exc}")
        return 1
    if config.backend == "json":
        messages, found, noted = await asyncio.to_thread(scan_message_files, Path(config.path))
        problems += found
        notes += noted
    for note in notes:
        print(f"note: {note}")
    if problems:
        for problem in problems:
            print(f"CORRUPT: {problem}")
        print(f"{len(problems)} problem(s) in {config.describe()}; nothing was changed")
        return 1
    print(f"ok: {config.describe()}: {documents} documents and {messages} messages readable")
    return 0
