"""The JSON store's change feed: every record this process applies to its memory, in journal order, is a change.

The journal *is* the store's commit order (one line per commit, appended under the lock), and every process applies
it in that order: its own commits from its commit path (append, fsync, publish the committed end, apply), other
processes' by following the journal up to the committed end they published in ``storage.lock`` (tables.py). So
the feed needs no log of its own: :class:`~storage.backends.json.tables.Tables` publishes each operation it applies
to the store's :class:`~storage.feed.ChangeFeed`, which gives every watcher each committed change exactly once, in
commit order, across compactions (a compaction's new journal names where the old one's committed records end,
``previous_end``, so a follower reads the old file to its end and goes on in the new one). Where the journal
cannot say what was missed (two compactions went by unseen, or a restore replaced the documents) the snapshots are
reloaded and every watcher gets ``resync``.

What this module adds is *when to look*, for a process that watches but neither reads nor writes: a task that,
while anyone watches, checks the journal every :data:`POLL_INTERVAL` seconds. The check is one ``pread`` of one byte
past what this process has applied (the store's read fast path, about 1 us): bytes there mean another process
appended a record or marked the journal for a compaction. Measured (benchmarks/bench_feed.py): a change reaches a
watcher in another process in a few milliseconds; the idle check costs about 0.5% of one core while someone
watches, nothing when nobody does. inotify would save the idle checks but is Linux-only (not in the standard
library) and does not fire for writes through some network and FUSE file systems, so the poll stays the one path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from ...errors import DatabaseError
from ...feed import ChangeFeed

__all__ = ["JsonFeed", "POLL_INTERVAL"]

log = logging.getLogger("storage.json")

#: Seconds between two looks at the journal while someone watches.
POLL_INTERVAL = 0.005


class JsonFeed:
    """The store's :class:`ChangeFeed` plus the task that follows the journal while anyone watches.

    ``refresh`` is the store's read-path catch-up (async: it may take the lock when the committed end is unknown),
    ``catch_up_now`` its synchronous half (one ``pread``, then whatever other processes appended), run when a watch
    begins so that changes committed before it are applied, and not delivered to it.
    """

    def __init__(self, refresh: Callable[[], Awaitable[None]], catch_up_now: Callable[[], None]) -> None:
        self.feed = ChangeFeed(start=self._start)
        self._refresh = refresh
        self._catch_up_now = catch_up_now
        self._task: asyncio.Task[None] | None = None
        self.interval = POLL_INTERVAL

    def _start(self) -> None:
        try:
            self._catch_up_now()
        except (DatabaseError, OSError) as exc:  # the poll below will report it again if it lasts
            log.debug("catching up before a watch failed: %s", exc)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="storage-json-feed")

    async def _follow(self) -> None:
        feed = self.feed
        failing = False
        while feed.active and not feed.closed:
            try:
                await self._refresh()
                failing = False
            except DatabaseError as exc:
                if not failing:
                    log.warning("following the journal for watchers failed (retrying): %s", exc)
                failing = True
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """End every watcher and the following task (awaited: nothing is left running)."""
        self.feed.close()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
