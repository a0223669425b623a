"""Heavy work off the event loop: a bot's gateway heartbeat and command replies share the loop with its storage.

Backups, restores and copies walk every record (encode, hash, compress); done inline, a large collection held the
loop for long enough to miss a heartbeat. They instead hand the work to a worker thread in chunks: the loop only
collects a chunk and awaits the thread, and a thread running Python code gives the GIL back every switch interval,
so the loop keeps ticking (the stalls are measured by benchmarks/bench_backup.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

from .cancellation import run_in_thread

__all__ = ["off_loop", "chunks", "CHUNK_RECORDS"]

T = TypeVar("T")
#: Records handed to a worker thread at a time: collecting them on the loop costs a few ms at most.
CHUNK_RECORDS = 2000


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
