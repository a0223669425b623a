"""The JSON message log's query cache: each file's rows as column blocks, parsed once and extended as it grows.

The aggregate queries read column blocks (:class:`~storage.messages.columns.MessageColumns`) and count them in C
(``Counter``) instead of walking dicts, a few ms per 100k messages. Parsing a file is what costs (a few us a
line), so a file is parsed once per process and afterwards only what was appended since is read. Files only grow,
except that a prune replaces or removes them and changes ``rewrites.generation``: then the whole cache is
dropped. No lock is needed to read: a line that is still being written is left for later.

Memory: about 45 bytes per message of the files queried, plus about 100 for files that received updates (their
rows are kept by id, since the last line of an id is its current version).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...interfaces import MessageSummary
from ...messages.columns import ColumnsBuilder, MessageColumns, micros_text
from ...offload import Pacer
from .message_counts import Counted, count_records
from .message_files import (
    FileKey,
    Record,
    file_path,
    list_months,
    month_range,
    parse_block,
    read_generation,
    run_holding,
)

__all__ = ["ColumnCache"]


class _NeedIds(Exception):
    """An update line showed up in a file cached without its ids: read it again, keeping them."""


@dataclass
class _Cached:
    """One file's rows as columns, kept between queries and extended as it grows."""

    ino: int
    size: int = 0  # bytes read
    columns: ColumnsBuilder = field(default_factory=ColumnsBuilder)
    rows: dict[str, int] | None = None  # message id -> row; only for files that have update lines

    def add(self, rec: Record, update: bool) -> None:
        """A :func:`parse_block` sink: the last line of an id is its current version."""
        rows = self.rows
        if rows is None:  # no update lines so far: every line is a new message (writers deduplicate ids)
            if update:
                raise _NeedIds
            self.columns.add(rec)
            return
        mid = rec["message_id"]
        row = rows.get(mid)
        if row is None:
            rows[mid] = len(self.columns)
            self.columns.add(rec)
        else:
            self.columns.replace(row, rec)


class ColumnCache:
    """The column blocks of the message files under ``root``, for the queries of one process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[FileKey, _Cached] = {}
        #: files :meth:`summary` counted without parsing them (message_counts.py), so that it reads only their tails
        self._counted: dict[FileKey, Counted] = {}
        self._generation = b""
        self._lock = asyncio.Lock()  # one cache update at a time (they run in a thread)

    def clear(self) -> None:
        self._files, self._counted = {}, {}

    def take(self) -> dict[FileKey, Any]:
        """Empty the cache and return what it held (for the caller to free off the loop)."""
        files, self._files, self._counted = self._files, {}, {}
        return files

    async def blocks(self, guild_id: str | None, lo_key: str | None, hi_key: str | None, lo: int | None,
                     hi: int | None) -> list[MessageColumns]:
        """The rows with time in ``[lo, hi)`` (as ``timestamp_key`` texts and as micros), one block per file."""
        return await run_holding(self._lock, self._blocks_sync, guild_id, lo_key, hi_key, lo, hi)

    def _blocks_sync(self, guild_id: str | None, lo_key: str | None, hi_key: str | None, lo: int | None,
                     hi: int | None) -> list[MessageColumns]:
        generation = read_generation(self.root)
        if generation != self._generation:  # files were rewritten: nothing cached can be trusted
            self._files, self._counted, self._generation = {}, {}, generation
        blocks = []
        for month, guilds in list_months(self.root, guild_id, lo_key, hi_key):
            start, end = month_range(month)
            whole = (lo_key is None or lo_key <= start) and (hi_key is None or hi_key >= end)
            for guild in guilds:
                cached = self._cached((guild, month))
                if cached is not None and len(cached.columns):
                    blocks.append(cached.columns.snapshot() if whole else cached.columns.snapshot(lo, hi))
        return blocks

    async def summary(self, shortcut: bool = True) -> MessageSummary:
        """Count, guilds, oldest and newest of every file, in a thread.

        With ``shortcut`` (see :mod:`.message_counts`), a file not cached yet is counted without parsing its lines
        when every complete line has the strict shape of one record of its month, and only the files of the
        earliest and latest such months are parsed (cached) for the oldest and newest; any other file is brought
        up to date in the cache as without it, which gives the same answer and the same errors.
        """
        return await run_holding(self._lock, self._summary_sync, shortcut)

    def _summary_sync(self, shortcut: bool = True) -> MessageSummary:
        generation = read_generation(self.root)
        if generation != self._generation:
            self._files, self._counted, self._generation = {}, {}, generation
        count, guilds = 0, set()
        low: list[int] = []
        high: list[int] = []
        counted: list[tuple[str, str, int]] = []  # (month, guild, records) of the files counted by the shortcut
        shapes: dict[tuple[tuple[str, ...], str], Any] = {}
        pacer = Pacer()
        for month, in_month in list_months(self.root, None, None, None):
            for guild in in_month:
                key = (guild, month)
                if shortcut and key not in self._files:
                    found = count_records(file_path(self.root, key), month, shapes, self._counted.get(key), pacer)
                    if found is not None:
                        self._counted[key] = found
                        if found.records:
                            counted.append((month, guild, found.records))
                        continue
                    self._counted.pop(key, None)
                cached = self._cached(key)
                if cached is None or not len(cached.columns):
                    continue
                times = cached.columns.micros
                count += len(times)
                guilds.add(guild)
                low.append(min(times))
                high.append(max(times))
        # A counted file's records all lie in its month: the oldest of them are in the earliest month's files,
        # the newest in the latest month's, which are parsed (and cached) as without the shortcut.
        ends: set[tuple[str, str]] = set()
        for ordered in (counted, counted[::-1]):
            for month in dict.fromkeys(m for m, _, _ in ordered):
                parsed = False
                for m, guild, _ in ordered:
                    if m != month:
                        continue
                    ends.add((m, guild))
                    cached = self._cached((guild, m))
                    if cached is not None and len(cached.columns):
                        parsed = True
                        low.append(min(cached.columns.micros))
                        high.append(max(cached.columns.micros))
                if parsed:
                    break
        for month, guild, quick in counted:
            if (month, guild) in ends:
                cached = self._files.get((guild, month))
                quick = 0 if cached is None else len(cached.columns)  # as parsed: it may have grown meanwhile
            if quick:
                count += quick
                guilds.add(guild)
        return MessageSummary(count, len(guilds), micros_text(min(low)) if low else None,
                              micros_text(max(high)) if high else None)

    def _cached(self, key: FileKey) -> _Cached | None:
        """The file's cache entry, brought up to date (None when the file is gone)."""
        path = file_path(self.root, key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._files.pop(key, None)
            return None
        try:
            st = os.fstat(fd)  # size and inode of the file we read, even if a prune replaces the path meanwhile
            cached = self._files.get(key)
            if cached is None or cached.ino != st.st_ino or st.st_size < cached.size:
                cached = self._files[key] = _Cached(st.st_ino)
            if st.st_size > cached.size:
                try:
                    self._extend(path, fd, cached, st.st_size)
                except BaseException:
                    del self._files[key]  # half extended: not to be trusted
                    raise
                cached.columns.freeze()  # kept for the process's life: as tuples the GC stops visiting
            return cached
        finally:
            os.close(fd)

    @staticmethod
    def _extend(path: Path, fd: int, cached: _Cached, size: int) -> None:
        try:
            cached.size += parse_block(path, os.pread(fd, size - cached.size, cached.size), cached.size, cached.add)
        except _NeedIds:  # start over, keeping ids this time
            cached.columns, cached.rows = ColumnsBuilder(), {}
            cached.size = parse_block(path, os.pread(fd, size, 0), 0, cached.add)
