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
while anyone watches, looks at the journal when the folder's files change (inotify, json/dirwatch.py) and in any
case every :data:`SLOW_POLL` seconds (writes from another host through a network file system raise no inotify
event); where inotify cannot be used it looks every :data:`POLL_INTERVAL` seconds. A look is the store's read
fast path: one ``pread`` of one byte past what this process has applied (bytes there mean another process
appended a record or marked the journal for a compaction), then whatever was committed. Measured
(benchmarks/bench_feed.py, /tmp/cpu check in the report): polling every 5 ms cost an idle watching process about
2% of a core on this machine; with inotify an idle watcher costs nearly nothing, and a change reaches a watcher in
another process within a few milliseconds either way (p50 about 1-5 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from ...errors import DatabaseError
from ...feed import ChangeFeed
from .dirwatch import DirWatch, open_dirwatch

__all__ = ["JsonFeed", "POLL_INTERVAL"]

log = logging.getLogger("storage.json")

#: Seconds between two looks at the journal while someone watches, where inotify cannot be used.
POLL_INTERVAL = 0.005
#: Seconds between two looks even when inotify wakes the task (another host's writes raise no event).
SLOW_POLL = 0.1


class JsonFeed:
    """The store's :class:`ChangeFeed` plus the task that follows the journal while anyone watches.

    ``refresh`` is the store's read-path catch-up (async: it may take the lock when the committed end is unknown),
    ``catch_up_now`` its synchronous half (one ``pread``, then whatever other processes appended), run when a watch
    begins so that changes committed before it are applied, and not delivered to it.
    """

    def __init__(self, refresh: Callable[[], Awaitable[None]], catch_up_now: Callable[[], None],
                 folder: Path | None = None) -> None:
        self.feed = ChangeFeed(start=self._start)
        self._folder = folder
        self._refresh = refresh
        self._catch_up_now = catch_up_now
        self._task: asyncio.Task[None] | None = None
        self.interval = POLL_INTERVAL
        self.notified = False  # inotify wakes the following task (else it polls every `interval`)

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
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        dirwatch = open_dirwatch(self._folder) if self._folder is not None else None
        if dirwatch is not None:
            try:
                loop.add_reader(dirwatch.fd, _woken, dirwatch, woken)
            except (NotImplementedError, OSError):  # an event loop without add_reader (Windows' proactor)
                dirwatch.close()
                dirwatch = None
        self.notified = dirwatch is not None
        try:
            while feed.active and not feed.closed:
                woken.clear()
                try:
                    await self._refresh()
                    failing = False
                except DatabaseError as exc:
                    if not failing:
                        log.warning("following the journal for watchers failed (retrying): %s", exc)
                    failing = True
                if dirwatch is None:
                    await asyncio.sleep(self.interval)
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(woken.wait(), min(self.interval * 20, SLOW_POLL))
        finally:
            if dirwatch is not None:
                loop.remove_reader(dirwatch.fd)
                dirwatch.close()

    async def close(self) -> None:
        """End every watcher and the following task (awaited: nothing is left running)."""
        self.feed.close()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _woken(dirwatch: DirWatch, woken: asyncio.Event) -> None:
    """The folder changed (an inotify event): look at the journal now."""
    dirwatch.drain()
    woken.set()
