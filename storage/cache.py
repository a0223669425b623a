"""A small TTL cache with the seed's ``DatabaseCache`` interface.

Why not ``functools.lru_cache``: entries must expire (another process may change the data) and must be dropped
explicitly when this process writes. Values are stored as given; callers that hand out mutable values should store
an immutable form (the Postgres backend stores serialized bytes) so a caller's mutation never leaks into the cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["DatabaseCache"]

_MISSING: Any = object()


class DatabaseCache:
    """Time-to-live cache, bounded in size (least recently used entries go first).

    ``ttl`` is in seconds; ``ttl=0`` disables caching (every ``get`` misses), which is how a store turns it off.
    """

    def __init__(
        self, ttl: float = 300, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get_nowait(self, key: Hashable, default: Any = None) -> Any:
        """Synchronous ``get`` for hot paths that must not yield to the event loop."""
        entry = self._entries.get(key, _MISSING)
        if entry is _MISSING:
            return default
        value, expires = entry
        if self._clock() >= expires:
            del self._entries[key]
            return default
        self._entries.move_to_end(key)
        return value

    def set_nowait(self, key: Hashable, value: Any) -> None:
        if self.ttl == 0:
            return
        self._entries[key] = (value, self._clock() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def invalidate_nowait(self, key: Hashable) -> bool:
        return self._entries.pop(key, _MISSING) is not _MISSING

    async def get(self, key: Hashable, default: Any = None) -> Any:
        """The cached value, or ``default`` (``None``, like the seed) when absent or expired."""
        return self.get_nowait(key, default)

    async def set(self, key: Hashable, value: Any) -> None:
        self.set_nowait(key, value)

    async def invalidate(self, key: Hashable) -> bool:
        """Drop one entry; True if it was there."""
        return self.invalidate_nowait(key)

    async def clear(self) -> None:
        self._entries.clear()
