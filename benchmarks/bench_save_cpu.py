"""The Python CPU of a lone durable ``save_member_data`` and of a ``get_member_data`` on the JSON backend, with the
fsync made free (issue 15: the save's Python work must fit under the fsync for the store to beat SQLite FULL).

    .venv/bin/python benchmarks/bench_save_cpu.py                          # this checkout
    .venv/bin/python benchmarks/bench_save_cpu.py --baseline /path/to/old  # before/after, interleaved, same run
    .venv/bin/python benchmarks/bench_save_cpu.py --profile                # cProfile of the saves (top functions)
    .venv/bin/python benchmarks/bench_save_cpu.py --batch --baseline PATH  # put_many batches of 1,000 instead

``--batch`` (issue 15's batch row): the store's members written 10,000 at a time, closed and opened again (lazy,
as ``bench_peers.py``'s copy), 3,000 gets and 300 saves, then ``--batches`` ``put_many`` batches of 1,000 members
spread as ``bench_peers.py`` spreads them (mostly never read), each batch built fresh and timed alone: its wall
(``perf_counter_ns``) and process CPU (``process_time_ns``, worker threads included), medians and p10; beside it,
in the same process, the same batches through ``sqlite3`` (WAL, ``synchronous=FULL`` with the fsync made free the
same way is not possible from here: ``synchronous=OFF``, the CPU of its ``executemany`` + commit).

Each repetition runs each checkout in a fresh process on a fresh store of ``--members`` members in a tmpfs
(``/dev/shm`` when it is one): ``os.fdatasync`` and ``os.fsync`` are replaced by no-ops *in that process only*
(never in the library), so what is timed is the Python work of a save (the ``pwrite`` stays); with
``BENCH_REAL_SYNC=1`` the fsync stays, on the system temp dir's disk. Per call the
``perf_counter_ns`` of one await, every save writing different bytes; medians of the per-call times, then the
median over repetitions. Why not cProfile alone: its per-call overhead (~0.1-0.3 us) is as large as the tiny
functions it times. Results: benchmarks/results/save_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkouts, member_doc, member_ids, print_table, run_worker, write_results

MEMBERS = 100_000
SAVES = 20_000
GETS = 20_000
BATCH = 1000
BATCHES = 200


def _no_sync(fd: int) -> None:
    """The fsync made free: only the Python work of a commit is left to time."""


async def _fill(store: Any, members: int, step: int) -> None:
    """``members`` members in the seed's shape, ``step`` to a ``put_many``."""
    for start in range(0, members, step):
        await store.put_many("members", {f"{g}_{u}": member_doc(i) for i in range(start, min(members, start + step))
                                         for u, g in [member_ids(i)]})


_OWNER = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import storage

async def main():
    store = await storage.open_store(backend="json", path=sys.argv[2])
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await store.close()

asyncio.run(main())
"""


def _open_owners(folder: str, count: int) -> list[subprocess.Popen[str]]:
    """``--owners N``: N other processes with the store open for writing and idle, as the 4-writer row's other
    writers are while one holds the lock (each owns a slot of ``storage.slots``: the holder's commits then look
    at the slots, json/slots.py)."""
    procs = [subprocess.Popen([sys.executable, "-c", _OWNER, sys.path[0], folder], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(count)]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("an owner process did not open the store")
    return procs


async def measure(members: int, profile: bool) -> dict[str, float]:
    import storage

    real = os.environ.get("BENCH_REAL_SYNC") == "1"  # the fsync kept, on the system temp dir's disk
    if not real:
        os.fdatasync = _no_sync  # this benchmark process only
        os.fsync = _no_sync
    where = None if real else "/dev/shm" if os.path.ismount("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench-save-cpu-", dir=where) as folder:
        store = await storage.open_store(backend="json", path=folder)
        owners: list[subprocess.Popen[str]] = []
        try:
            await _fill(store, members, 1000)
            await store.compact()
            owners = _open_owners(folder, int(os.environ.get("BENCH_OWNERS") or 0))
            spread = [i * max(1, members // 1000) for i in range(1000)]  # members across the store
            docs = [member_doc(i) for i in spread]
            ids = [member_ids(i) for i in spread]
            save = store.save_member_data
            get = store.get_member_data
            for n in range(2000):  # warm-up (the lease, the inline estimate, caches)
                doc = docs[n % 1000]
                doc["statistics"]["message_count"] = n + 1
                await save(*ids[n % 1000], doc)
            prof = None
            if profile:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            clock = time.perf_counter_ns
            saves = []
            cpu_began = time.process_time_ns()
            for n in range(SAVES):
                doc = docs[n % 1000]
                doc["statistics"]["message_count"] = n + 3000
                user, guild = ids[n % 1000]
                began = clock()
                await save(user, guild, doc)
                saves.append(clock() - began)
            cpu = (time.process_time_ns() - cpu_began) / SAVES
            if prof is not None:
                prof.disable()
                import pstats

                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            gets = []
            for n in range(GETS):
                user, guild = ids[n % 1000]
                began = clock()
                await get(user, guild)
                gets.append(clock() - began)
        finally:
            await store.close()
            for proc in owners:
                proc.communicate(timeout=60)  # (stdin closed: the owner closes its store and exits)
    if os.environ.get("BENCH_HIST"):
        total = sum(saves)
        for lo, hi in ((0, 20e3), (20e3, 50e3), (50e3, 100e3), (100e3, 300e3), (300e3, 1e9)):
            part = [t for t in saves if lo <= t < hi]
            print(f"{lo/1e3:.0f}-{hi/1e3:.0f} us: {len(part)} saves, {sum(part)/total:.1%} of the time",
                  file=sys.stderr)
    return {"save_member_data_us": statistics.median(saves) / 1e3,
            "save mean_us": statistics.fmean(saves) / 1e3,
            "save process CPU_us": cpu / 1e3,
            "save p90_us": sorted(saves)[len(saves) * 9 // 10] / 1e3,
            "save p99_us": sorted(saves)[len(saves) * 99 // 100] / 1e3,
            "get_member_data_us": statistics.median(gets) / 1e3,
            "get mean_us": statistics.fmean(gets) / 1e3}


def _batch_items(b: int, members: int) -> dict[str, dict[str, Any]]:
    """bench_peers.py's batch number ``b``: 1,000 members from ``(b * 7,000) % members`` on, new counters."""
    base = (b * BATCH * 7) % members
    items = {}
    for j in range(BATCH):
        i = (base + j) % members
        user, guild = member_ids(i)
        doc = member_doc(i)
        doc["statistics"]["message_count"] = b + 1
        items[f"{guild}_{user}"] = doc
    return items


def _figures(prefix: str, walls: list[int], cpus: list[int]) -> dict[str, float]:
    return {f"{prefix} wall_ms": statistics.median(walls) / 1e6,
            f"{prefix} wall p10_ms": sorted(walls)[len(walls) // 10] / 1e6,
            f"{prefix} CPU_ms": statistics.median(cpus) / 1e6,
            f"{prefix} CPU p10_ms": sorted(cpus)[len(cpus) // 10] / 1e6}


async def measure_batch(members: int, batches: int, profile: bool) -> dict[str, float]:
    """``--batch``: see the module's doc."""
    import random
    import sqlite3

    import orjson

    import storage

    os.fdatasync = _no_sync  # this benchmark process only
    os.fsync = _no_sync
    where = "/dev/shm" if os.path.ismount("/dev/shm") else None
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-cpu-", dir=where) as folder:
        store = await storage.open_store(backend="json", path=folder)
        try:
            await _fill(store, members, 10_000)
        finally:
            await store.close()
        store = await storage.open_store(backend="json", path=folder)
        try:
            rng = random.Random(7)
            picks = [rng.randrange(members) for _ in range(4096)]
            for n in range(3000):
                await store.get_member_data(*member_ids(picks[n & 4095]))
            for n in range(300):
                doc = member_doc(picks[n])
                doc["statistics"]["message_count"] = n + 1
                await store.save_member_data(*member_ids(picks[n]), doc)
            prof = None
            if profile:
                import cProfile

                prof = cProfile.Profile()
            clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
            walls: list[int] = []
            cpus: list[int] = []
            put_many = store.put_many
            for b in range(batches):
                items = _batch_items(b, members)
                if prof is not None:
                    prof.enable()
                began, cpu_began = clock(), cpu_clock()
                await put_many("members", items)
                cpus.append(cpu_clock() - cpu_began)
                walls.append(clock() - began)
                if prof is not None:
                    prof.disable()
            if prof is not None:
                import pstats

                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
            out.update(_figures("json batch", walls, cpus))
        finally:
            await store.close()
        conn = sqlite3.connect(Path(folder) / "members.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")  # the fsync made free (the CPU of FULL but for its syscalls)
        conn.execute("CREATE TABLE members (key TEXT PRIMARY KEY, doc TEXT NOT NULL)")
        upsert = "INSERT INTO members (key, doc) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET doc = excluded.doc"
        for start in range(0, members, 10_000):
            conn.execute("BEGIN")
            conn.executemany(upsert, [(f"{g}_{u}", orjson.dumps(member_doc(i)).decode())
                                      for i in range(start, min(members, start + 10_000))
                                      for u, g in [member_ids(i)]])
            conn.execute("COMMIT")
        walls, cpus = [], []
        for b in range(batches):
            items = _batch_items(b, members)
            began, cpu_began = clock(), cpu_clock()
            conn.execute("BEGIN")
            conn.executemany(upsert, [(k, orjson.dumps(d).decode()) for k, d in items.items()])
            conn.execute("COMMIT")
            cpus.append(cpu_clock() - cpu_began)
            walls.append(clock() - began)
        conn.close()
        out.update(_figures("sqlite OFF batch", walls, cpus))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--members", type=int, default=MEMBERS, help=f"members in the store (default {MEMBERS})")
    parser.add_argument("--baseline", help="another checkout of this repository, run interleaved (before/after)")
    parser.add_argument("--profile", action="store_true", help="one run of this checkout under cProfile")
    parser.add_argument("--batch", action="store_true", help="put_many batches of 1,000 members (module doc)")
    parser.add_argument("--batches", type=int, default=BATCHES, help=f"--batch: batches per run (default {BATCHES})")
    parser.add_argument("--owners", type=int, default=0,
                        help="other processes holding the store open for writing, idle (the 4-writer row's others)")
    parser.add_argument("--worker", nargs=4, metavar=("CHECKOUT", "MEMBERS", "PROFILE", "BATCHES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, args.worker[0])
        members, profile, batches = int(args.worker[1]), args.worker[2] == "1", int(args.worker[3])
        print(json.dumps(asyncio.run(measure_batch(members, batches, profile) if batches
                                     else measure(members, profile))))
        return 0
    here = str(Path(__file__).resolve().parent.parent)
    if args.profile:
        sys.path.insert(0, here)
        print(json.dumps(asyncio.run(measure_batch(args.members, args.batches, True) if args.batch
                                     else measure(args.members, True))))
        return 0
    if args.owners:
        os.environ["BENCH_OWNERS"] = str(args.owners)  # to the workers
    systems = checkouts(parser, __file__, args.baseline)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, path in systems.items():
            print(f"rep {rep + 1}/{args.reps}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_worker(__file__, [path, str(args.members), "0",
                                                    str(args.batches if args.batch else 0)]))
    keys = list(runs["this"][0])
    summary = {name: {k: statistics.median([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    unit = "ms per batch" if args.batch else "us per call"
    headers = [f"figure ({unit})", *systems] + (["this / base"] if "base" in systems else [])
    rows: list[list[object]] = []
    for k in keys:
        row: list[object] = [k, *(f"{summary[n][k]:.2f}" for n in systems)]
        if "base" in systems:
            row.append(f"{summary['this'][k] / summary['base'][k]:.2f}x")
        rows.append(row)
    for k in keys:
        rows.append([f"  {k} per rep", *(" ".join(f"{r[k]:.2f}" for r in runs[n]) for n in systems)])
    print_table(headers, rows, title=f"JSON backend, fsync made free, {args.members:,} members, medians of "
                                     f"{args.reps} interleaved repetitions (load {os.getloadavg()[0]:.2f})")
    path = write_results("batch_cpu" if args.batch else "save_cpu", {
        "batch": args.batch, "reps": args.reps, "members": args.members, "systems": systems, "summary": summary,
        "runs": runs, "load": os.getloadavg()})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
