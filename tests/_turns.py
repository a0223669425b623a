"""Counting the event loop's turns while a call runs: what the tests of "this long call gives the loop turns"
share (a task that yields at every turn, as the bot's other handlers would)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["turns_during"]

T = TypeVar("T")


async def turns_during(call: Awaitable[T]) -> tuple[T, int]:
    """Await ``call`` while a task counts the loop's turns; returns ``call``'s result and the turns counted."""
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())  # first runs when the call first yields: nothing runs before the call
    try:
        result = await call
    finally:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
    return result, turns
