"""Cancelling a call part-way, at a chosen point: what the all-or-nothing tests under cancellation share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["cancel_after"]


async def cancel_after(call: Callable[[], Awaitable[Any]], turns: int, *, spin: int = 40) -> bool:
    """Start ``call()``, let it run for ``turns`` event-loop turns, cancel it and wait until it has ended.

    Past ``spin`` turns the wait grows by 0.5 ms a turn instead (a call's worker threads take time, which loop turns
    alone would not give them), so a loop over ``turns`` reaches every await point and, in the end, completion.
    True when the cancellation landed (the call had not finished); the call's own errors propagate."""
    task = asyncio.ensure_future(call())
    for _ in range(min(turns, spin)):
        await asyncio.sleep(0)
    if turns > spin:
        await asyncio.sleep((turns - spin) * 0.0005)
    cancelled = task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return cancelled
