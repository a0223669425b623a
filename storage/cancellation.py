"""Work that must not be abandoned half-way: cancellation waits for it, then is delivered.

Every ``await`` is a cancellation point. When the awaited thing is a worker thread writing files under a lock (a
compaction, a journal fsync, a message-file rewrite), cancelling the awaiting task does not stop the thread: if the
task then released its lock or changed its in-memory state, another writer would get in while the thread still
writes, and the process's view would no longer equal the disk (acknowledged writes were lost this way). So the
helpers here shield the work, keep waiting for it when cancelled, and only then let the cancellation propagate.
The caller still sees :class:`asyncio.CancelledError` (``asyncio.wait_for`` still times out); it just sees it once
the work it started has finished and its ``finally`` blocks run on a settled state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["run_to_completion", "run_in_thread"]

T = TypeVar("T")


async def run_to_completion(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile; then re-raise the cancellation.

    If ``work`` itself failed after a cancellation, the cancellation wins (it is what the caller asked for) and the
    work's error is chained as its context.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
            except BaseException:  # the work's own error: task.exception() below reports it
                break
        if not task.cancelled() and task.exception() is not None:
            raise asyncio.CancelledError() from task.exception()
        raise


async def run_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread(fn, *args)`` that a cancellation does not abandon (see the module doc)."""
    return await run_to_completion(asyncio.to_thread(fn, *args))
