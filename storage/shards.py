"""A set and a dict that never rehash more than a sliver of themselves at once (:class:`ShardedKeys`,
:class:`ShardedDict`).

Why: a ``dict`` or ``set`` grows by rehashing every entry into a table twice the size, in one C call that holds
the GIL throughout. In a worker thread that is a pause of the event loop like any other: the ids of a 1M-message
backup, checked for repeats, were one ``dict`` whose growth past 699k entries took 25-27 ms (55 ms past 1.4M) on
these hosts, far over the loop's 20 ms budget (benchmarks/README.md, Design measurements). Spread over SHARDS
dicts, the largest single growth is 1/SHARDS of that, for one extra hash and list index per key (and a Python
method call per operation for :class:`ShardedDict`: ~0.1-0.2 us).

The shard is the key's hash, its bits above 22 folded onto the low ones: an int hashes to itself, and a Discord id
(a snowflake) keeps a per-process counter in its low bits, often the same for every id of a small bot.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar, overload

__all__ = ["ShardedKeys", "ShardedDict", "SHARDS"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Dicts the keys are spread over (a power of two: the shard is the hash's low bits). At 1M keys, 64 shards of
#: ~16k grow at most ~0.6 ms at a time.
SHARDS = 64


def _spread(key: object) -> int:
    h = hash(key)
    return h ^ (h >> 22)


class ShardedKeys:
    """A set of hashable keys kept in :data:`SHARDS` dicts (dicts of atoms are not tracked by the garbage collector,
    sets are): ``add_new`` tells whether a key was new; ``in``, ``len``, ``update`` as for a set."""

    __slots__ = ("_mask", "_shards")

    def __init__(self, keys: Iterable[Hashable] = (), shards: int = SHARDS) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, got {shards}")
        self._shards: list[dict[Hashable, None]] = [{} for _ in range(shards)]
        self._mask = shards - 1
        self.update(keys)

    def add_new(self, key: Hashable) -> bool:
        """Add ``key``; False if it was there already."""
        shard = self._shards[_spread(key) & self._mask]
        if key in shard:
            return False
        shard[key] = None
        return True

    def update(self, keys: Iterable[Hashable]) -> None:
        shards, mask = self._shards, self._mask
        for key in keys:
            shards[_spread(key) & mask][key] = None

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._shards[_spread(key) & self._mask]
        except TypeError:  # unhashable: never in the set
            return False

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def clear(self) -> None:
        """Empty it a shard at a time: dropping the last reference frees every key in one C call (a check's 1M ids:
        ~50 ms holding the GIL), a shard's ``clear`` frees 1/SHARDS of them."""
        for shard in self._shards:
            shard.clear()


class ShardedDict(Generic[K, V]):
    """A dict kept in :data:`SHARDS` dicts, with the methods a message id index uses (``in``, ``[]``, ``get``,
    ``pop``, ``del``, ``update``, iteration, ``items``, ``popitem``, ``len``). Iterated by shard, not insertion
    order."""

    __slots__ = ("_mask", "_shards")

    def __init__(self, shards: int = SHARDS) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, got {shards}")
        self._shards: list[dict[K, V]] = [{} for _ in range(shards)]
        self._mask = shards - 1

    def _shard(self, key: object) -> dict[K, V]:
        h = hash(key)
        return self._shards[(h ^ (h >> 22)) & self._mask]

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._shard(key)
        except TypeError:
            return False

    def __getitem__(self, key: K) -> V:
        return self._shard(key)[key]

    def __setitem__(self, key: K, value: V) -> None:
        self._shard(key)[key] = value

    def __delitem__(self, key: K) -> None:
        del self._shard(key)[key]

    @overload
    def get(self, key: K) -> V | None: ...

    @overload
    def get(self, key: K, default: V) -> V: ...

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._shard(key).get(key, default)

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._shard(key).pop(key, default)

    def update(self, items: Mapping[K, V]) -> None:
        shards, mask = self._shards, self._mask
        for key, value in items.items():
            h = hash(key)
            shards[(h ^ (h >> 22)) & mask][key] = value

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def items(self) -> Iterator[tuple[K, V]]:
        for shard in self._shards:
            yield from shard.items()

    def popitem(self) -> tuple[K, V]:
        for shard in self._shards:
            if shard:
                return shard.popitem()
        raise KeyError("popitem(): the dict is empty")

    def clear(self) -> None:
        """Empty it a shard at a time (see :meth:`ShardedKeys.clear`)."""
        for shard in self._shards:
            shard.clear()

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __bool__(self) -> bool:
        return any(self._shards)
