"""Heavy work off the event loop: a bot's gateway heartbeat and command replies share the loop with its storage.

Backups, restores and copies walk every record (encode, hash, compress); done inline, a large collection held the
loop for long enough to miss a heartbeat. They instead hand the work to a worker thread in chunks: the loop only
collects a chunk and awaits the thread, and a thread running Python code gives the GIL back every switch interval,
so the loop keeps ticking (the stalls are measured by benchmarks/bench_backup.py).
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from .cancellation import run_in_thread

__all__ = ["off_loop", "chunks", "sorted_in_pieces", "CHUNK_RECORDS", "SORT_PIECE"]

T = TypeVar("T")
#: Records handed to a worker thread at a time: collecting them on the loop costs a few ms at most.
CHUNK_RECORDS = 2000
#: Items one ``sorted`` call of :func:`sorted_in_pieces` takes (4096 keys: about half a ms).
SORT_PIECE = 4096


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread. If the caller is cancelled, this waits for the thread to finish before
    re-raising: whatever the thread writes to (a backup file, a digest) is never closed or released under it."""
    return await run_in_thread(fn, *args)


async def chunks(items: AsyncIterable[T], size: int = CHUNK_RECORDS) -> AsyncIterator[list[T]]:
    """The items of ``items`` in lists of ``size`` (the last one shorter)."""
    chunk: list[T] = []
    async for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def sorted_in_pieces(items: Sequence[Any], piece: int = SORT_PIECE) -> list[Any]:
    """``sorted(items)``, for a worker thread: pieces of ``piece`` items sorted, then merged.

    A thread running Python gives the GIL back every switch interval, but one ``sorted`` is a single C call that
    keeps it to the end, and the event loop waits for all of it: 100k member keys took 30-60 ms. Each piece's sort
    is short, and the merge (``heapq.merge``, a Python generator) lets the loop in between. Stable like ``sorted``:
    equal items keep their order (``heapq.merge`` takes equal items from the earlier piece first).
    """
    if len(items) <= piece:
        return sorted(items)
    runs = [sorted(items[start:start + piece]) for start in range(0, len(items), piece)]
    return list(heapq.merge(*runs))
