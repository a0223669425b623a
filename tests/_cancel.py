"""Cancelling a call part-way, at a chosen point: what the all-or-nothing tests under cancellation share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

__all__ = ["cancel_after", "all_or_nothing_at_every_turn"]


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


async def all_or_nothing_at_every_turn(call: Callable[[], Awaitable[Any]], state: Callable[[], Awaitable[Any]],
                                       before: Any, after: Any, *, limit: int = 600, spin: int = 40,
                                       check: Callable[[], None] | None = None) -> int:
    """Cancel ``call()`` after 0, 1, 2... loop turns (:func:`cancel_after`) until a run completes; after every run
    ``await state()`` must equal ``before`` (the cancellation undid everything) or ``after`` (it all happened),
    never a mix, and ``check()`` (leftover files, say) must pass. A run that left ``before`` must have been
    cancelled (it did not just fail quietly). Returns the turns the completing run took; fails past ``limit``."""
    for turns in range(limit):
        cancelled = await cancel_after(call, turns, spin=spin)
        now = await state()
        assert now in (before, after), f"a partial result after {turns} loop turns"
        if check is not None:
            check()
        if now == after:
            return turns
        assert cancelled, f"not cancelled after {turns} loop turns, yet nothing changed"
    pytest.fail(f"the call never finished within {limit} runs")
