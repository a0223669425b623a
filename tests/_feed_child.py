"""A writer process for tests/test_feed.py: random puts, deletes, updates and batches on keys ``PREFIX0..9``,
then ``PREFIXdone``. Its committed sequence is computed again by the test from the same seed (:func:`plan`)."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from typing import Any

import storage
from storage import StoreConfig

Step = tuple[str, list[tuple[str, dict[str, Any] | None]]]  # (how, [(key, doc or None for a delete)])


def plan(prefix: str, seed: int, count: int) -> list[Step]:
    """The writer's operations; every one changes something (a delete only of a key that exists)."""
    rng = random.Random(seed)
    present: set[str] = set()
    steps: list[Step] = []
    for i in range(count):
        key = f"{prefix}{rng.randrange(10)}"
        roll = rng.random()
        if roll < 0.25 and present:
            victim = sorted(present)[rng.randrange(len(present))]
            present.discard(victim)
            steps.append(("delete", [(victim, None)]))
        elif roll < 0.35:
            keys = sorted({key, f"{prefix}{rng.randrange(10)}"})
            steps.append(("put_many", [(k, {"w": prefix, "i": i, "pad": "x" * rng.randrange(50)}) for k in keys]))
            present.update(keys)
        elif roll < 0.45:
            steps.append(("update", [(key, {"w": prefix, "i": i})]))
            present.add(key)
        elif roll < 0.5:
            steps.append(("put", [(key, {"w": prefix, "i": i, "big": "y" * 5000})]))  # over NOTIFY's inline size
            present.add(key)
        else:
            steps.append(("put", [(key, {"w": prefix, "i": i})]))
            present.add(key)
    steps.append(("put", [(f"{prefix}done", {"w": prefix, "done": True})]))
    return steps


def expected(steps: list[Step]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """The changes a watcher must see, in order: (key, op, doc)."""
    return [(key, "put" if doc is not None else "delete", doc) for _how, pairs in steps for key, doc in pairs]


async def write(config: StoreConfig, prefix: str, seed: int, count: int, compact: int) -> None:
    store = await storage.open_store(config=config)
    if compact and hasattr(store, "min_compact_bytes"):
        store.min_compact_bytes = compact  # compact often: the watcher must follow across compactions
    try:
        for how, pairs in plan(prefix, seed, count):
            if how == "delete":
                assert await store.delete("feed", pairs[0][0])
            elif how == "put_many":
                await store.put_many("feed", [(k, d) for k, d in pairs])
            elif how == "update":
                key, doc = pairs[0]
                await store.update("feed", key, lambda _old, doc=doc: dict(doc or {}))
            else:
                await store.put("feed", pairs[0][0], pairs[0][1] or {})
    finally:
        await store.close()
    print("DONE", flush=True)


def main() -> None:
    config = StoreConfig(**json.loads(sys.argv[1]))
    asyncio.run(write(config, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))


if __name__ == "__main__":
    main()
