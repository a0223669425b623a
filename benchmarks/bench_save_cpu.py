"""The Python CPU of a lone durable ``save_member_data`` and of a ``get_member_data`` on the JSON backend, with the
fsync made free (issue 15: the save's Python work must fit under the fsync for the store to beat SQLite FULL).

    .venv/bin/python benchmarks/bench_save_cpu.py                          # this checkout
    .venv/bin/python benchmarks/bench_save_cpu.py --baseline /path/to/old  # before/after, interleaved, same run
    .venv/bin/python benchmarks/bench_save_cpu.py --profile                # cProfile of the saves (top functions)

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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkouts, member_doc, member_ids, print_table, run_worker, write_results

MEMBERS = 100_000
SAVES = 20_000
GETS = 20_000


def _no_sync(fd: int) -> None:
    """The fsync made free: only the Python work of a commit is left to time."""


async def measure(members: int, profile: bool) -> dict[str, float]:
    import storage

    real = os.environ.get("BENCH_REAL_SYNC") == "1"  # the fsync kept, on the system temp dir's disk
    if not real:
        os.fdatasync = _no_sync  # this benchmark process only
        os.fsync = _no_sync
    where = None if real else "/dev/shm" if os.path.ismount("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench-save-cpu-", dir=where) as folder:
        store = await storage.open_store(backend="json", path=folder)
        try:
            for start in range(0, members, 1000):
                await store.put_many("members", {f"{g}_{u}": member_doc(i)
                                                 for i in range(start, min(members, start + 1000))
                                                 for u, g in [member_ids(i)]})
            await store.compact()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--members", type=int, default=MEMBERS, help=f"members in the store (default {MEMBERS})")
    parser.add_argument("--baseline", help="another checkout of this repository, run interleaved (before/after)")
    parser.add_argument("--profile", action="store_true", help="one run of this checkout under cProfile")
    parser.add_argument("--worker", nargs=3, metavar=("CHECKOUT", "MEMBERS", "PROFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, args.worker[0])
        print(json.dumps(asyncio.run(measure(int(args.worker[1]), args.worker[2] == "1"))))
        return 0
    here = str(Path(__file__).resolve().parent.parent)
    if args.profile:
        sys.path.insert(0, here)
        print(json.dumps(asyncio.run(measure(args.members, True))))
        return 0
    systems = checkouts(parser, __file__, args.baseline)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, path in systems.items():
            print(f"rep {rep + 1}/{args.reps}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_worker(__file__, [path, str(args.members), "0"]))
    keys = list(runs["this"][0])
    summary = {name: {k: statistics.median([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    headers = ["figure (us per call)", *systems] + (["this / base"] if "base" in systems else [])
    rows: list[list[object]] = []
    for k in keys:
        row: list[object] = [k, *(f"{summary[n][k]:.2f}" for n in systems)]
        if "base" in systems:
            row.append(f"{summary['this'][k] / summary['base'][k]:.2f}x")
        rows.append(row)
    print_table(headers, rows, title=f"JSON backend, fsync made free, {args.members:,} members, medians of "
                                     f"{args.reps} interleaved repetitions (load {os.getloadavg()[0]:.2f})")
    path = write_results("save_cpu", {"reps": args.reps, "members": args.members, "systems": systems,
                                      "summary": summary, "runs": runs, "load": os.getloadavg()})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
