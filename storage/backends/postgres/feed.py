"""The PostgreSQL store's change feed and coherent cache, fed by its listening connection.

Every notification (postgres/notify.py: what a committed write changed) first invalidates the coherent cache's
entries for its keys, synchronously, as it arrives, then becomes changes for the watchers, in the order the server
sent them (commit order). A large document arrives in pieces before the notification that names it, and is
exactly the version committed. Only a put whose document the writer did not have (``"f"``:
``refresh_member_statistics`` writes documents in SQL) is read from the table before it is published, so
notifications behind it wait in a backlog until it is (order is kept); that document is read after the commit, so
it is that version *or a later one*, and if the key was deleted meanwhile the put is skipped (its delete follows).
A trailing ``["n", serial]`` only makes a payload unlike the others of its transaction (which PostgreSQL would
otherwise deliver once, see postgres/notify.py): it is dropped before anything else looks at the operations.

Resync: when the listening connection comes back after a loss (whatever was committed meanwhile is unknown), when
a writer could not list what it changed (SQL through ``tx.connection``), and when reading a large document fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ...errors import ConnectionError, DatabaseError
from ...feed import ChangeFeed
from .coherent_cache import CoherentCache
from .listener import Listener

__all__ = ["PgFeed"]

log = logging.getLogger("storage.postgres")

#: ``fetch(collection, keys)``: the current documents, encoded (absent keys left out).
Fetch = Callable[[str, list[str]], Awaitable[dict[str, bytes]]]


class PgFeed:
    """The listener, the feed watchers subscribe to and the coherent cache (None when it is not used) together."""

    def __init__(self, dsn: str, channel: str, *, target: str, connect_timeout: float, cache: CoherentCache | None,
                 fetch: Fetch) -> None:
        self.feed = ChangeFeed(start=self._start, ready=self._ready)
        self.cache = cache
        self._fetch = fetch
        self._timeout = connect_timeout
        self._target = target
        self.listener = Listener(dsn, channel, target=target, connect_timeout=connect_timeout,
                                 on_note=self._note, on_up=self._up, on_down=self._down)
        self._backlog: deque[list[Any]] = deque()
        self._dispatcher: asyncio.Task[None] | None = None
        self._pieces: list[bytes] = []  # of the large document being received (notify.py)
        self._markers: dict[str, asyncio.Future[None]] = {}  # sync() tokens sent, not yet received

    # -- the listener's edges ---------------------------------------------------------------------------------------
    def _start(self) -> None:
        self.listener.start()

    async def _ready(self) -> None:
        if not await self.listener.wait_live(self._timeout):
            raise ConnectionError(f"{self._target}: the listening connection for store.watch() did not come up "
                                  f"within {self._timeout:g}s (it keeps retrying)")

    def _up(self, again: bool) -> None:
        self._pieces = []
        if self.cache is not None:
            self.cache.set_live(True)
        if again:
            self._backlog.clear()
            self.feed.resync()

    def _down(self) -> None:
        if self.cache is not None:
            self.cache.set_live(False)

    # -- notifications ----------------------------------------------------------------------------------------------
    def _note(self, payload: str) -> None:
        try:
            ops: list[Any] = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.error("%s: an unreadable change notification (%d bytes): watchers resync", self._target, len(payload))
            ops = [["r"]]
        if ops and ops[-1][0] == "n":  # a serial that only makes the payload distinct (postgres/notify.py)
            ops.pop()
        if ops and ops[0][0] in "cs":
            for op in ops:
                if op[0] == "c":
                    self._pieces.append(base64.b64decode(op[1]))
                else:
                    marker = self._markers.pop(op[1], None)
                    if marker is not None and not marker.done():
                        marker.set_result(None)
            return
        cache = self.cache
        if cache is not None:
            for op in ops:
                if op[0] == "r":
                    cache.drop_all()
                else:
                    cache.invalidate_nowait((op[1], op[2]))
        if any(op[0] == "q" for op in ops):
            for index, op in enumerate(ops):
                if op[0] == "q":
                    ops[index] = ["p", op[1], op[2], b"".join(self._pieces)]
                    self._pieces = []
                    break
        if not self.feed.active:
            return
        if self._backlog or any(op[0] == "f" for op in ops):
            self._backlog.append(ops)
            if self._dispatcher is None or self._dispatcher.done():
                self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(),
                                                                          name="storage-pg-feed-fetch")
        else:
            self._publish(ops, {})

    def _publish(self, ops: list[Any], fetched: dict[tuple[str, str], bytes]) -> None:
        feed = self.feed
        for op in ops:
            kind = op[0]
            if kind == "p":
                doc = op[3]
                feed.publish(op[1], op[2], "put", doc if isinstance(doc, bytes) else orjson.dumps(doc))
            elif kind == "d":
                feed.publish(op[1], op[2], "delete", None)
            elif kind == "f":
                raw = fetched.get((op[1], op[2]))
                if raw is not None:
                    feed.publish(op[1], op[2], "put", raw)
            else:
                feed.resync()

    async def _dispatch(self) -> None:
        """Publish the backlog in order, reading the large documents it names."""
        backlog, feed = self._backlog, self.feed
        while backlog:
            ops = backlog[0]
            wanted: dict[str, list[str]] = {}
            for op in ops:
                if op[0] == "f" and feed.wants(op[1], op[2]):
                    wanted.setdefault(op[1], []).append(op[2])
            fetched: dict[tuple[str, str], bytes] = {}
            try:
                for collection, keys in wanted.items():
                    for key, raw in (await self._fetch(collection, keys)).items():
                        fetched[(collection, key)] = raw
            except DatabaseError as exc:
                log.warning("%s: reading changed documents for watchers failed (%s): watchers resync",
                            self._target, exc)
                backlog.clear()
                feed.resync()
                return
            if backlog and backlog[0] is ops:  # not cleared by a resync meanwhile
                backlog.popleft()
                self._publish(ops, fetched)

    async def sync(self, send: Callable[[str], Awaitable[None]], timeout: float) -> bool:
        """Wait until every change this process committed so far has been received: ``send(payload)`` notifies a
        marker (a commit after ours), and notifications arrive in commit order. What ``close()`` does, so that
        watchers get this process's last changes before they end. False when the marker did not come in time."""
        if not self.listener.live:
            return False
        token = uuid.uuid4().hex
        marker = self._markers[token] = asyncio.get_running_loop().create_future()
        try:
            await send(orjson.dumps([["s", token]]).decode())
            await asyncio.wait_for(marker, timeout)
        except (DatabaseError, asyncio.TimeoutError):
            return False
        finally:
            self._markers.pop(token, None)
        dispatcher = self._dispatcher
        if dispatcher is not None and not dispatcher.done():  # large documents still being read for watchers
            await asyncio.wait({dispatcher}, timeout=timeout)
        return True

    async def start_cache(self) -> bool:
        """At open, with the coherent cache on: listen now, so the cache works from the first ``get``."""
        return await self.listener.wait_live(self._timeout)

    async def close(self) -> None:
        self.feed.close()
        if self.cache is not None:
            self.cache.set_live(False)
        task, self._dispatcher = self._dispatcher, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.listener.close()
