"""Child-process workloads for the crash and multi-process tests (run as ``python tests/_child.py MODE CONFIG``).

A real separate process is the only honest way to test ``kill -9`` and cross-process locking: it has its own
memory, its own file descriptors and its own locks.
"""

from __future__ import annotations

import asyncio
import json
import sys

import storage
from storage import StoreConfig


def _config(raw: str) -> StoreConfig:
    return StoreConfig(**json.loads(raw))


async def crash_writer(config: StoreConfig, start: int, compact_bytes: int = 16 * 1024) -> None:
    """Write forever, printing ``ACK n`` after each write returns; the parent kills us at a random moment.
    ``compact_bytes`` 0: the store's own compaction threshold (kills then land mostly inside preallocated filler)."""
    store = await storage.open_store(config=config)
    if hasattr(store, "min_compact_bytes") and compact_bytes:
        store.min_compact_bytes = compact_bytes  # compact often, so kills also land mid-compaction
    i = start

    async def one(n: int) -> None:
        if n % 7 == 0:
            await store.put_many("crash", {f"k{n}": {"n": n, "pad": "x" * 200}, f"m{n}": {"n": -n}})
        elif n % 11 == 0:
            await store.update("crash", "counter", lambda d: {"n": max(d.get("n", 0), n)})
        else:
            await store.put("crash", f"k{n}", {"n": n, "pad": "y" * (n % 300)})
        print(f"ACK {n}", flush=True)

    while True:
        # a few concurrent writers per round, so group commits (several writes per journal line) get killed too
        await asyncio.gather(*(one(i + j) for j in range(4)))
        i += 4


async def incrementer(config: StoreConfig, count: int, keys: int) -> None:
    store = await storage.open_store(config=config)
    try:
        for i in range(count):
            await store.update("counters", f"c{i % keys}", lambda d: {"n": d.get("n", 0) + 1})
    finally:
        await store.close()
    print("DONE", flush=True)


async def watch_counter(config: StoreConfig, target: int) -> None:
    """Read ``counters/c`` in a tight loop (following another process's journal without its lock), printing
    ``SEEN n`` at each new value, until it reaches ``target``; any error ends the process non-zero."""
    store = await storage.open_store(config=config)
    last = -1
    try:
        print("READY", flush=True)
        while last < target:
            doc = await store.get("counters", "c", {"n": -1})
            if doc["n"] != last:
                last = doc["n"]
                print(f"SEEN {last}", flush=True)
            await asyncio.sleep(0)
    finally:
        await store.close()


async def lease_writer(config: StoreConfig, start: int, budget: float, acks: int) -> None:
    """Save one document after another, forever (the parent kills us): the lone writer in a tight loop that keeps
    the store lock leased between its saves (json/lease.py). ``budget`` > 0 replaces the lease's budget and the
    lone writer's loop-turn budget (so that a lease lasts that long while nobody waits); ``acks`` 1 prints
    ``ACK n`` after each save returns."""
    if budget > 0:
        from storage.backends.json import group_commit, lease

        lease.BUDGET = budget
        lease.HOLD = budget
        group_commit.SOLO_TURN_BUDGET = budget
    store = await storage.open_store(config=config)
    print("READY", flush=True)
    n = start
    while True:
        await store.put("lease", f"k{n}", {"n": n})
        if acks:
            print(f"ACK {n}", flush=True)
        n += 1


def main() -> None:
    mode, raw = sys.argv[1], sys.argv[2]
    config = _config(raw)
    if mode == "crash-writer":
        asyncio.run(crash_writer(config, *map(int, sys.argv[3:5])))
    elif mode == "incrementer":
        asyncio.run(incrementer(config, int(sys.argv[3]), int(sys.argv[4])))
    elif mode == "watch-counter":
        asyncio.run(watch_counter(config, int(sys.argv[3])))
    elif mode == "lease-writer":
        asyncio.run(lease_writer(config, int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
