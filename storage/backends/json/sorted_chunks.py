"""A sorted sequence kept as tuples of at most :data:`CHUNK` items: what the JSON indexes keep their order in.

Why not a plain sorted list: a list is always tracked by the garbage collector, and every full collection visits
each of its items, holding the GIL (so the event loop) whichever thread triggered it. 100k members under three
indexes kept ~300k such items alive for the process's life, and any call creating ~25k objects (a put_many, a
record_messages batch) triggers a full collection (issue 15). A tuple of atoms (str, numbers, tuples of those) is
untracked by the first collection that sees it, so here only the chunk list and the list of chunk maxima (one item
per chunk) are visited. An insert or delete rebuilds one chunk (O(CHUNK)), where a list moved O(n) pointers.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["SortedChunks", "CHUNK"]

#: Items per chunk (a chunk is split in two above twice this).
CHUNK = 512


class SortedChunks:
    """Sorted items (any mutually comparable atoms or tuples of atoms), in chunks (see the module doc)."""

    __slots__ = ("_chunks", "_maxes", "_size")

    def __init__(self, items: Iterable[Any] = ()) -> None:
        """``items`` must already be sorted."""
        self._chunks: list[tuple[Any, ...]] = []
        self._maxes: list[Any] = []
        self._size = 0
        self.rebuild(items)

    def rebuild(self, items: Iterable[Any]) -> None:
        """Replace every item by ``items`` (sorted)."""
        every = items if isinstance(items, list) else list(items)
        self._chunks = [tuple(every[i:i + CHUNK]) for i in range(0, len(every), CHUNK)]
        self._maxes = [chunk[-1] for chunk in self._chunks]
        self._size = len(every)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Any]:
        for chunk in self._chunks:
            yield from chunk

    def __reversed__(self) -> Iterator[Any]:
        for chunk in reversed(self._chunks):
            yield from reversed(chunk)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SortedChunks):
            return self._size == other._size and list(self) == list(other)
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SortedChunks({list(self)!r})"

    def __contains__(self, item: object) -> bool:
        k = bisect.bisect_left(self._maxes, item)
        if k == len(self._chunks):
            return False
        chunk = self._chunks[k]
        i = bisect.bisect_left(chunk, item)
        return i < len(chunk) and chunk[i] == item

    def add(self, item: Any) -> None:
        """Insert ``item`` at its place (after equal items)."""
        chunks, maxes = self._chunks, self._maxes
        self._size += 1
        if not chunks:
            chunks.append((item,))
            maxes.append(item)
            return
        k = bisect.bisect_right(maxes, item)
        if k == len(chunks):
            k -= 1
        chunk = chunks[k]
        i = bisect.bisect_right(chunk, item)
        new = (*chunk[:i], item, *chunk[i:])
        if len(new) > 2 * CHUNK:
            half = len(new) // 2
            chunks[k:k + 1] = [new[:half], new[half:]]
            maxes[k:k + 1] = [new[half - 1], new[-1]]
        else:
            chunks[k] = new
            maxes[k] = new[-1]

    def discard(self, item: Any) -> bool:
        """Remove one item equal to ``item``; whether there was one."""
        chunks, maxes = self._chunks, self._maxes
        k = bisect.bisect_left(maxes, item)
        if k == len(chunks):
            return False
        chunk = chunks[k]
        i = bisect.bisect_left(chunk, item)
        if i == len(chunk) or chunk[i] != item:
            return False
        self._size -= 1
        if len(chunk) == 1:
            del chunks[k], maxes[k]
            return True
        new = chunk[:i] + chunk[i + 1:]
        chunks[k] = new
        maxes[k] = new[-1]
        return True

    def position(self, value: Any, *, right: bool = False, key: Callable[[Any], Any] | None = None) -> int:
        """Where ``value`` would go (``bisect_left`` or, if ``right``, ``bisect_right``; compared with ``key`` of
        the items as bisect does), as an index into the whole sequence."""
        find = bisect.bisect_right if right else bisect.bisect_left
        k = find(self._maxes, value, key=key)
        before = sum(map(len, self._chunks[:k]))
        if k == len(self._chunks):
            return before
        return before + find(self._chunks[k], value, key=key)

    def iter_from(self, start: int) -> Iterator[Any]:
        """The items from index ``start`` on."""
        for chunk in self._chunks:
            if start >= len(chunk):
                start -= len(chunk)
                continue
            yield from chunk[start:] if start else chunk
            start = 0

    def slice(self, start: int, end: int) -> list[Any]:
        """The items of indexes ``[start, end)``."""
        if start >= end:
            return []
        return list(itertools.islice(self.iter_from(start), end - start))
