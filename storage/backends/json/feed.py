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

What this module adds is *when to look*, for a process that watches but neither reads nor writes. While anyone
watches, it looks when ``storage.lock`` is written (every commit and compaction ends by publishing its committed
end there: inotify, json/dirwatch.py), right in the event's callback, and a task looks every :data:`SLOW_POLL`
seconds anyway (writes from another host through a network file system raise no inotify event); where inotify
cannot be used the task looks every :data:`POLL_INTERVAL` seconds. A look is the store's read fast path: one
``pread`` of one byte past what this process has applied (bytes there mean another process appended a record or
marked the journal for a compaction), then whatever was committed (at most the journal's committed end).
Measured on this 2-core machine under load (see the report of issue 16): polling every 5 ms cost an idle watching
process 2.2% of a core, inotify 0.2%; a change reaches a watcher in another process in about 1-2 ms (p50) with
inotify, 5 ms polling.
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
    ``catch_up_now`` its synchronous half (one ``pread``, then whatever other processes appended; True when only
    the async one can finish), run when a watch begins so that changes committed before it are applied, and not
    delivered to it, and on every inotify event, right in the event's callback (most events are this process's
    own commits, which need nothing more than that ``pread``: no task wakes for them).
    """

    def __init__(self, refresh: Callable[[], Awaitable[None]], catch_up_now: Callable[[], bool],
                 lock_path: Path | None = None) -> None:
        self.feed = ChangeFeed(start=self._start)
        self._folder = lock_path  # the file whose writes say there is something to read (None: poll)
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
        woken: list[asyncio.Future[None]] = []  # the current wait, set by an inotify event or a timer
        dirwatch = open_dirwatch(self._folder) if self._folder is not None else None
        if dirwatch is not None:
            try:
                loop.add_reader(dirwatch.fd, self._woken, dirwatch, woken)
            except (NotImplementedError, OSError):  # an event loop without add_reader (Windows' proactor)
                dirwatch.close()
                dirwatch = None
        self.notified = dirwatch is not None
        try:
            while feed.active and not feed.closed:
                wait = loop.create_future()
                woken[:] = [wait]  # events from here on wake the next wait (cheaper than an Event and wait_for)
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
                    timer = loop.call_later(min(self.interval * 20, SLOW_POLL), _wake, wait)
                    try:
                        await wait
                    finally:
                        timer.cancel()
        finally:
            if dirwatch is not None:
                loop.remove_reader(dirwatch.fd)
                dirwatch.close()

    def _woken(self, dirwatch: DirWatch, woken: list[asyncio.Future[None]]) -> None:
        """``storage.lock`` was written (an inotify event): catch up now, waking the task only when that needs the
        lock (or failed: the task retries and reports)."""
        dirwatch.drain()
        try:
            if not self._catch_up_now():
                return
        except (DatabaseError, OSError):
            pass
        for wait in woken:
            _wake(wait)

    async def close(self) -> None:
        """End every watcher and the following task (awaited: nothing is left running)."""
        self.feed.close()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task




def _wake(wait: asyncio.Future[None]) -> None:
    if not wait.done():
        wait.set_result(None)
