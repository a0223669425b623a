"""A read cache that stays correct with several processes: every entry is dropped when any process commits a change
to its key (the change feed's notifications, postgres/notify.py and postgres/listener.py).

The race it must not lose: a ``get`` reads version 1 from the server, another process commits version 2, the
notification arrives and finds nothing to drop, *then* the ``get`` stores version 1: stale until the next change,
which may never come. So a read takes a ticket before it asks the server (:meth:`begin`): the key's count of
invalidations so far, and the cache's epoch. It stores its result (:meth:`end`) only if no invalidation of that
key, and no wholesale drop, happened since. A notification that arrives after the read stored its value drops it
then: a process may serve a value older than the latest commit only until that commit's notification arrives (the
feed's delivery delay, a few milliseconds).

The cache trusts itself only while the listening connection is up (:attr:`live`): while it is down notifications
are lost, so nothing is served or stored, and when it is back the cache starts empty (a new epoch).

Entries are JSON text (immutable: every ``get`` decodes a fresh ``dict`` the caller may mutate), ``""`` for a key
known to be absent (an insert notifies too, so absence can be cached as well); least recently used go first past
``max_entries``. Duck-compatible with :class:`storage.DatabaseCache` where the store uses one (``get_nowait``,
``invalidate_nowait``, ``clear``, ``len``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["CoherentCache", "Ticket"]

#: What :meth:`CoherentCache.begin` returns: (epoch, the key's in-flight record, its invalidations then).
Ticket = tuple[int, list[int], int]


class CoherentCache:
    """See the module doc. Not thread-safe: used from the event loop only (the listener's callbacks run there)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, str] = OrderedDict()
        #: keys with reads in flight: [readers, invalidations since the first of them began]
        self._flights: dict[Hashable, list[int]] = {}
        self.epoch = 0
        self.live = False
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._flights)

    def get_nowait(self, key: Hashable) -> str | None:
        """The cached text (``""``: known absent), or None on a miss."""
        text = self._entries.get(key)
        if text is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return text

    def begin(self, key: Hashable) -> Ticket:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = [0, 0]
        flight[0] += 1
        return self.epoch, flight, flight[1]

    def end(self, key: Hashable, ticket: Ticket, text: str | None) -> None:
        """The read of ``ticket`` finished with ``text`` (``""``: absent; None: it failed, store nothing)."""
        epoch, flight, invalidations = ticket
        flight[0] -= 1
        if flight[0] == 0 and self._flights.get(key) is flight:
            del self._flights[key]
        if text is None or not self.live or epoch != self.epoch or flight[1] != invalidations:
            return
        entries = self._entries
        entries[key] = text
        entries.move_to_end(key)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def invalidate_nowait(self, key: Hashable) -> bool:
        flight = self._flights.get(key)
        if flight is not None:
            flight[1] += 1
        return self._entries.pop(key, None) is not None

    def drop_all(self) -> None:
        """Forget everything, and every read in flight (a resync, the listener lost or back)."""
        self._entries.clear()
        self.epoch += 1

    def set_live(self, live: bool) -> None:
        self.live = live
        self.drop_all()

    async def clear(self) -> None:
        self.drop_all()
