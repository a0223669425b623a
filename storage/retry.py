"""Retry with exponential backoff, for transient connection failures only.

The seed's ``safe_database_operation`` retried on ``ConnectionError`` and re-raised everything else; we keep exactly
that contract. Retrying a validation error or a bug would only repeat it, and retrying a write that failed for a
non-transient reason could hide data problems.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .errors import ConnectionError

__all__ = ["safe_database_operation"]

log = logging.getLogger("storage.retry")
T = TypeVar("T")


async def safe_database_operation(
    operation: Callable[..., Awaitable[T]],
    *args: Any,
    max_retries: int = 3,
    retry_delay: float = 1,
    **kwargs: Any,
) -> T:
    """Await ``operation(*args, **kwargs)``, retrying :class:`storage.ConnectionError` up to ``max_retries`` attempts.

    The delay doubles after each failed attempt (1 s, 2 s, 4 s... by default). Any other exception propagates at
    once, unchanged. After the last attempt the final ``ConnectionError`` propagates.
    """
    if max_retries < 1:
        raise ValueError("max_retries must be >= 1")
    delay = retry_delay
    for attempt in range(1, max_retries + 1):
        try:
            return await operation(*args, **kwargs)
        except ConnectionError as exc:
            if attempt == max_retries:
                log.error("database operation failed after %d attempts: %s", max_retries, exc)
                raise
            log.warning("database connection failed (attempt %d/%d), retrying in %gs: %s",
                        attempt, max_retries, delay, exc)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover
