"""The message log's id index (``message_id -> slot of the file holding it``), as many small dicts instead of one.

JSON backend layer, used by :mod:`.messages` only. Why not one dict: a dict grows by copying every entry into a
table twice as large, inside one ``__setitem__`` (one C call, which keeps the GIL: the event loop waits for all
of it, whichever thread inserts). At 1M messages one such copy held the loop 25-125 ms (``record_messages`` and
the index built by a prune, issue 15). Spread over :data:`SHARDS` dicts, a copy moves a 256th of the ids (about
4k entries at 1M messages: well under a ms). Keys and values are ints: no dict here is tracked by the garbage
collector. A shard is picked by the id's low bits mixed with its millisecond part (``id >> 22`` for a Discord
snowflake), so that ids spread over the shards whatever their low bits hold (a snowflake's increment is often 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["IdIndex", "SHARDS"]

#: Dicts the ids are spread over (a power of two).
SHARDS = 256
_MASK = SHARDS - 1


class IdIndex:
    """A ``dict[int, int]`` of message ids to file slots, kept in :data:`SHARDS` dicts (see the module doc)."""

    __slots__ = ("_shards",)

    def __init__(self) -> None:
        self._shards: list[dict[int, int]] = [{} for _ in range(SHARDS)]

    def _shard(self, mid: int) -> dict[int, int]:
        return self._shards[(mid ^ (mid >> 22)) & _MASK]

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __contains__(self, mid: int) -> bool:
        return mid in self._shards[(mid ^ (mid >> 22)) & _MASK]

    def get(self, mid: int) -> int | None:
        return self._shards[(mid ^ (mid >> 22)) & _MASK].get(mid)

    def __setitem__(self, mid: int, slot: int) -> None:
        self._shards[(mid ^ (mid >> 22)) & _MASK][mid] = slot

    def pop(self, mid: int) -> int | None:
        return self._shards[(mid ^ (mid >> 22)) & _MASK].pop(mid, None)

    def __iter__(self) -> Iterator[int]:
        for shard in self._shards:
            yield from shard

    def items(self) -> Iterator[tuple[int, int]]:
        for shard in self._shards:
            yield from shard.items()

    def add_all(self, ids: Iterable[int], slot: int) -> None:
        """Map every id of ``ids`` to ``slot``."""
        shards = self._shards
        for mid in ids:
            shards[(mid ^ (mid >> 22)) & _MASK][mid] = slot

    def remove_all(self, ids: Iterable[int], slot: int) -> None:
        """Forget the ids of ``ids`` that map to ``slot`` (an id since stored in another file stays)."""
        shards = self._shards
        for mid in ids:
            shard = shards[(mid ^ (mid >> 22)) & _MASK]
            if shard.get(mid) == slot:
                del shard[mid]

    def remove_slot(self, slot: int) -> None:
        """Forget every id that maps to ``slot``."""
        for shard in self._shards:
            for mid in [m for m, s in shard.items() if s == slot]:
                del shard[mid]

    def free(self) -> None:
        """Drop every entry, a shard at a time (in a worker thread, which gives the GIL back between two: dropping
        a 1M-entry dict at once, one C call, held the event loop 25-40 ms). The index is empty and unusable after."""
        shards = self._shards
        while shards:
            shards.pop()
