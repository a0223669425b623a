"""Work for child processes of tests/test_postgres.py, started with multiprocessing's ``spawn`` (a fresh interpreter:
its own event loop, pool and connections, like a second bot process)."""

from __future__ import annotations

import asyncio
from typing import Any

import storage
from storage import StoreConfig


async def _increment(config: StoreConfig, key: str, times: int, how: str) -> int:
    store = await storage.open_store(config=config)
    try:
        for _ in range(times):
            if how == "update":
                await store.update("counters", key, lambda d: {"n": d.get("n", 0) + 1})
            else:  # a read-modify-write transaction: its read must lock the document
                async with store.transaction() as tx:
                    doc = await tx.get("counters", key, {"n": 0})
                    await asyncio.sleep(0)
                    await tx.put("counters", key, {"n": doc["n"] + 1})
    finally:
        await store.close()
    return times


def increment(config_fields: dict[str, Any], key: str, times: int, how: str) -> int:
    """Open a store from the same config as the parent and increment ``key`` ``times`` times."""
    return asyncio.run(_increment(StoreConfig(**config_fields), key, times, how))
