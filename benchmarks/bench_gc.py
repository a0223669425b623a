"""What a full garbage collection costs because of what an open JSON store keeps (issue 15).

Run it from the repository root::

    .venv/bin/python benchmarks/bench_gc.py              # 100k members (3 indexes), 300k messages
    .venv/bin/python benchmarks/bench_gc.py --scale 0.1

A full collection visits every item of every GC-tracked container and holds the GIL (so the event loop) while it
runs; any call creating ~25k objects triggers one. Printed after imports, after opening a store of ``--members``
members with three indexes, and after a query of every guild has cached its messages: tracked objects, referent
visits (what a collection walks: deterministic) and ``gc.collect()`` time (median of 7; noisy on a shared host).
Results go to ``benchmarks/results/gc.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from _common import fmt, machine_info, print_table, write_results
from bench_stalls import GUILDS, Data


def measure(label: str, rows: list[list[object]]) -> None:
    gc.collect()
    gc.collect()
    objs = gc.get_objects()
    tracked, visits = len(objs), sum(len(gc.get_referents(o)) for o in objs)
    del objs
    times = []
    for _ in range(7):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    rows.append([label, f"{tracked:,}", f"{visits:,}", fmt(sorted(times)[3])])


async def run(members: int, messages: int, root: str) -> list[list[object]]:
    import storage

    rows: list[list[object]] = []
    measure("interpreter + imports", rows)
    data = Data(members, messages)
    store: Any = await storage.open_store(backend="json", path=root)
    for g in range(GUILDS):
        for start in range(0, data.per_guild, 10_000):
            await store.batch_update_members(
                [{"user_id": data.user(g, j), "guild_id": data.guild(g), "data": data.member(g, j)}
                 for j in range(start, min(data.per_guild, start + 10_000))])
    for start in range(0, messages, 10_000):
        await store.record_messages([data.message(i) for i in range(start, min(messages, start + 10_000))])
    for path in ("statistics.message_count", "roles", "guild_id"):
        await store.ensure_index("members", path)
    await store.close()
    store = await storage.open_store(backend="json", path=root)
    measure(f"JSON store open ({data.members:,} members, 3 indexes)", rows)
    for g in range(GUILDS):
        await store.top_authors(data.guild(g))
    measure(f"+ top_authors of every guild ({messages:,} messages cached)", rows)
    await store.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: 100k members + 300k messages")
    parser.add_argument("--dir", default=None, help="where the store goes (default: system temp)")
    args = parser.parse_args(argv)
    members, messages = int(100_000 * args.scale), int(300_000 * args.scale)
    root = tempfile.mkdtemp(prefix="bench_gc_", dir=args.dir)
    try:
        rows = asyncio.run(run(members, messages, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    heads = ["state", "tracked objects", "referent visits", "gc.collect() ms (median of 7)"]
    print_table(heads, rows, title="what a full garbage collection walks")
    path = write_results("gc", {"machine": machine_info(args.dir), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
