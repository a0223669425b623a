"""The change feed's core, shared by both backends: what a change is, and one bounded queue per watcher.

``store.watch(collection=None, *, prefix=None)`` gives an async iterator of :class:`Change`. A backend only has to
*publish* every committed change it learns of, in commit order, to its :class:`ChangeFeed` (the JSON store from the
journal it follows and from its own commit path, PostgreSQL from its LISTEN connection), and say when it may have
missed some (:meth:`ChangeFeed.resync`); everything a consumer sees is decided here.

Why a bounded queue per watcher, and a ``resync`` marker past the bound: a watcher that stops reading (a consumer
stuck on a slow API call) must neither make writers wait (a commit never blocks on a watcher) nor make the process
grow without limit. When a watcher's queue is full its backlog is dropped and replaced by one ``resync`` change:
"changes may have been missed, reload what you track". Changes committed after that are queued behind it as usual,
so a consumer that reloads on ``resync`` and applies what follows ends up right.

Documents travel through the queue in their encoded form (bytes) and are decoded when the consumer takes them:
each consumer gets a fresh ``dict`` it may mutate, and a full queue holds compact bytes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NamedTuple

import orjson

from .errors import StoreClosedError

__all__ = ["Change", "ChangeFeed", "Watch", "Op", "QUEUE_LIMIT", "RESYNC"]

#: ``"put"`` (``doc`` is the new document), ``"delete"`` (``doc`` is None), ``"resync"`` (changes may have been
#: missed: reload what you track; ``collection`` is the watched collection or ``""``, ``key`` is ``""``).
Op = Literal["put", "delete", "resync"]
#: Changes a watcher may have waiting before its backlog is replaced by one ``resync`` (see the module doc).
QUEUE_LIMIT = 10_000
RESYNC: Op = "resync"


class Change(NamedTuple):
    """One committed change, as ``store.watch()`` yields it."""

    collection: str
    key: str
    op: Op
    doc: dict[str, Any] | None


#: A change as queued: (collection, key, op, encoded document or None).
_Queued = tuple[str, str, Op, "bytes | str | None"]


class _Subscription:
    """One watcher's filter and bounded queue. Pushed to synchronously (never awaits, never blocks a writer)."""

    __slots__ = ("__weakref__", "closed", "collection", "items", "limit", "overflows", "prefix", "waiter")

    def __init__(self, collection: str | None, prefix: str | None, limit: int) -> None:
        self.collection = collection
        self.prefix = prefix
        self.limit = limit
        self.items: deque[_Queued] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.overflows = 0  # how many times the backlog was dropped (for tests and stats)

    def wants(self, collection: str, key: str) -> bool:
        if self.collection is not None and collection != self.collection:
            return False
        return self.prefix is None or key.startswith(self.prefix)

    def push(self, item: _Queued) -> None:
        items = self.items
        if len(items) >= self.limit:
            items.clear()  # the consumer cannot keep up: it reloads instead (see the module doc)
            self.overflows += 1
            items.append((self.collection or "", "", RESYNC, None))
        items.append(item)
        self._wake()

    def resync(self) -> None:
        items = self.items
        if items and items[-1][2] == RESYNC:
            return  # one marker says it all
        items.clear()  # what is queued is superseded by the reload the marker asks for
        items.append((self.collection or "", "", RESYNC, None))
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class ChangeFeed:
    """The changes one store publishes, fanned out to its watchers.

    ``start`` (called when the first watcher subscribes) and ``ready`` (awaited before a watcher's first change)
    are the backend's hooks: the JSON store starts following its journal, PostgreSQL its listening connection.
    ``publish`` costs one attribute test when nobody watches.
    """

    def __init__(self, *, start: Callable[[], None] | None = None,
                 ready: Callable[[], Awaitable[None]] | None = None, limit: int = QUEUE_LIMIT) -> None:
        self._subs: weakref.WeakSet[_Subscription] = weakref.WeakSet()
        self._start = start
        self._ready = ready
        self.limit = limit
        self.closed = False

    @property
    def active(self) -> bool:
        """Whether anyone watches (a backend may stop following when nobody does)."""
        return bool(self._subs)

    def wants(self, collection: str, key: str) -> bool:
        """Whether any watcher would receive a change of this key (a backend may skip work for nobody)."""
        return any(sub.wants(collection, key) for sub in list(self._subs))

    def watch(self, collection: str | None, prefix: str | None) -> Watch:
        """A new watcher; changes published from now on reach it (see :class:`Watch`)."""
        if self.closed:
            raise StoreClosedError("the store is closed")
        sub = _Subscription(collection, prefix, self.limit)
        if self._start is not None:
            self._start()  # before subscribing: what the backend catches up on now happened before the watch
        self._subs.add(sub)
        return Watch(self, sub)

    def publish(self, collection: str, key: str, op: Op, doc: bytes | str | None) -> None:
        """One committed change (``doc``: the encoded document for a put)."""
        if not self._subs:
            return
        item = (collection, key, op, doc)
        for sub in list(self._subs):
            if sub.wants(collection, key):
                sub.push(item)

    def resync(self) -> None:
        """Changes may have been missed (a lost listening connection, a reload): every watcher gets ``resync``."""
        for sub in list(self._subs):
            sub.resync()

    def close(self) -> None:
        """The store closes: every watcher ends after the changes already queued for it."""
        self.closed = True
        for sub in list(self._subs):
            sub.close()
        self._subs = weakref.WeakSet()

    def _unsubscribe(self, sub: _Subscription) -> None:
        self._subs.discard(sub)
        sub.close()

    async def _wait_ready(self) -> None:
        if self._ready is not None:
            await self._ready()


class Watch:
    """What ``store.watch()`` returns: an async iterator of :class:`Change`, and an async context manager.

    It receives every change published from the moment it was created (the JSON store, and PostgreSQL when its
    listening connection is up, which it is from the store's open while the coherent cache is on); otherwise from
    when the listening connection is up, which ``await watch.ready()`` (or ``async with``) waits for.

    It ends (``StopAsyncIteration``) when the store closes, after the changes already queued, or when it is closed
    (:meth:`aclose`, leaving ``async with``, or simply dropping it after a ``break``: a watch nobody references is
    unsubscribed by the garbage collector).
    """

    __slots__ = ("_feed", "_readied", "_sub")

    def __init__(self, feed: ChangeFeed, sub: _Subscription) -> None:
        self._feed = feed
        self._sub = sub
        self._readied = False

    def __aiter__(self) -> Watch:
        return self

    async def ready(self) -> Watch:
        """Wait until the backend delivers changes (the PostgreSQL listening connection is up)."""
        if not self._readied:
            await self._feed._wait_ready()
            self._readied = True
        return self

    async def __anext__(self) -> Change:
        if not self._readied:
            await self.ready()
        sub = self._sub
        while not sub.items:
            if sub.closed:
                raise StopAsyncIteration
            waiter = sub.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                sub.waiter = None
        collection, key, op, raw = sub.items.popleft()
        return Change(collection, key, op, orjson.loads(raw) if raw is not None else None)

    def pending(self) -> int:
        """How many changes are queued for this watcher (a consumer may use it to notice it falls behind)."""
        return len(self._sub.items)

    @property
    def overflows(self) -> int:
        """How many times this watcher's backlog was replaced by a ``resync`` because it was full."""
        return self._sub.overflows

    async def aclose(self) -> None:
        """Stop watching: nothing more is queued, and iteration ends."""
        self._feed._unsubscribe(self._sub)
        self._sub.items.clear()

    async def __aenter__(self) -> Watch:
        return await self.ready()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self._sub.close()
