"""Member writes on the JSON backend, phase by phase: put_many and batch_update_members of 1,000 members, and a
lone durable save_member_data (issue 15: a batch of 1,000 at most SQLite's time).

    .venv/bin/python benchmarks/bench_batch.py                          # this checkout, 5 repetitions
    .venv/bin/python benchmarks/bench_batch.py --baseline /path/to/old  # before/after, interleaved, same run
    .venv/bin/python benchmarks/bench_batch.py --cold                   # the store reopened before the batches

Each repetition runs each checkout in a fresh process on a fresh 10k-member store: 30 batches of each kind (the
first 5 not counted) and 2,000 saves, every one writing different bytes: wall time, and the process's CPU time
(steadier on a shared, loaded machine: waiting for a CPU or for the disk is not counted). A second pass in a fresh
process times the phases of a commit by wrapping them (perf_counter_ns; the wrappers add a little): the rule and
encoding (``normalize_items``), the journal record, the append + fdatasync, publish and apply (or, where the
checkout plans a batch's apply during its fsync, plan + apply_plan; the plan then inside the fsync's time). Medians over
repetitions. ``--cold``: the store is closed and opened again after it is seeded, as after a bot's restart, so the
batches write members never read since the open (a lazily opened snapshot, json/lazy.py, where the checkout has it).
Results: benchmarks/results/batch.json (``batch-cold.json`` with ``--cold``).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DIR_ENV,
    FSYNC_SLEEP_ENV,
    apply_worker_env,
    checkouts,
    member_doc,
    member_ids,
    print_table,
    run_worker,
    write_results,
)

MEMBERS = 10_000
BATCH = 1000
ROUNDS = 30
SAVES = 2000


def key_of(i: int) -> str:
    user, guild = member_ids(i)
    return f"{guild}_{user}"


def batch_items(b: int) -> dict[str, dict[str, Any]]:
    out = {}
    for j in range(BATCH):
        i = (b * 7000 + j) % MEMBERS
        doc = member_doc(i)
        doc["statistics"]["message_count"] = b + 1  # every batch writes different bytes
        out[key_of(i)] = doc
    return out


def batch_updates(b: int) -> list[dict[str, Any]]:
    out = []
    for j in range(BATCH):
        i = (b * 7000 + j) % MEMBERS
        user, guild = member_ids(i)
        doc = member_doc(i)
        doc["statistics"]["message_count"] = b + 1
        out.append({"user_id": user, "guild_id": guild, "data": doc})
    return out


def wrap_phases(acc: dict[str, int], current: list[str]) -> None:
    """Time the commit's phases (module functions and methods looked up at call time) into ``acc``."""
    from storage import documents
    from storage.backends.json import journal, store, tables

    def wrap(owner: Any, name: str, label: str) -> None:
        fn: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                key = f"{current[0]}:{label}"
                acc[key] = acc.get(key, 0) + time.perf_counter_ns() - began

        setattr(owner, name, timed)

    wrap(documents, "normalize_items", "rule+encode")
    wrap(store, "encode_record", "journal record")
    wrap(journal.Journal, "append", "append+fdatasync")
    wrap(tables.Tables, "publish", "publish")
    wrap(tables.Tables, "apply", "apply")
    # A batch's inline commit may have its apply planned by a worker thread during the fsync (json/sync_thread.py):
    # then "plan" runs inside "append+fdatasync", and "apply_plan" replaces "apply".
    wrap(tables.Tables, "plan", "plan")
    wrap(tables.Tables, "apply_plan", "apply_plan")


async def measure(phases: bool, cold: bool = False) -> dict[str, float]:
    import storage

    acc: dict[str, int] = {}
    current = ["warm-up"]
    if phases:
        wrap_phases(acc, current)
    with tempfile.TemporaryDirectory(prefix="bench-batch-", dir=apply_worker_env()) as folder:
        store = await storage.JsonStore.open(folder)
        try:
            for start in range(0, MEMBERS, BATCH):
                await store.put_many("members", {key_of(i): member_doc(i) for i in range(start, start + BATCH)})
            await store.compact()
            if cold:
                await store.close()
                store = await storage.JsonStore.open(folder)
            times: dict[str, list[int]] = {"put_many_ms": [], "batch_update_members_ms": []}
            cpu: dict[str, list[int]] = {"put_many_ms": [], "batch_update_members_ms": []}
            for b in range(ROUNDS):
                for name in times:
                    data: Any = batch_items(b) if name == "put_many_ms" else batch_updates(b)
                    current[0] = name if b >= 5 else "warm-up"
                    began, began_cpu = time.perf_counter_ns(), time.process_time_ns()
                    if name == "put_many_ms":
                        await store.put_many("members", data)
                    else:
                        await store.batch_update_members(data)
                    if b >= 5:
                        times[name].append(time.perf_counter_ns() - began)
                        cpu[name].append(time.process_time_ns() - began_cpu)
            docs = [member_doc(i) for i in range(1000)]
            saves, saves_cpu = [], []
            current[0] = "save_member_data_us"
            for n in range(SAVES):
                doc = docs[n % 1000]
                doc["statistics"]["message_count"] = n + 1
                user, guild = member_ids(n % 1000)
                began, began_cpu = time.perf_counter_ns(), time.process_time_ns()
                await store.save_member_data(user, guild, doc)
                saves.append(time.perf_counter_ns() - began)
                saves_cpu.append(time.process_time_ns() - began_cpu)
        finally:
            await store.close()
    out = {name: statistics.median(v) / 1e6 for name, v in times.items()}
    out.update({f"{name} (CPU)": statistics.median(v) / 1e6 for name, v in cpu.items()})
    out["save_member_data_us"] = statistics.median(saves) / 1e3
    out["save_member_data_us (CPU)"] = statistics.median(saves_cpu) / 1e3
    counts = {"put_many_ms": (ROUNDS - 5, 1e6), "batch_update_members_ms": (ROUNDS - 5, 1e6),
              "save_member_data_us": (SAVES, 1e3)}
    for key, total in acc.items():
        call, _, phase = key.partition(":")
        if call in counts:
            n, unit = counts[call]
            out[f"{call} | {phase}"] = total / n / unit
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--baseline", help="another checkout of this repository, run interleaved (before/after)")
    parser.add_argument("--cold", action="store_true", help="reopen the store after seeding it (writes of members "
                        "not read since the open)")
    parser.add_argument("--dir", help="where to put the data (default: the system temp dir); a tmpfs such as /dev/shm "
                        "leaves out the disk")
    parser.add_argument("--fsync-sleep-us", type=float, help="model every fsync as a sleep of this many microseconds "
                        "(GIL-free, like the real one), in both checkouts: with --dir on a tmpfs, a fixed fsync")
    parser.add_argument("--worker", nargs=3, metavar=("CHECKOUT", "PHASES", "COLD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, args.worker[0])
        print(json.dumps(asyncio.run(measure(args.worker[1] == "1", args.worker[2] == "1"))))
        return 0
    systems = checkouts(parser, __file__, args.baseline)
    if args.dir:
        os.environ[DIR_ENV] = str(Path(args.dir).resolve())  # the workers inherit it
    if args.fsync_sleep_us is not None:
        os.environ[FSYNC_SLEEP_ENV] = str(args.fsync_sleep_us)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, path in systems.items():
            for phases in ("0", "1"):
                print(f"rep {rep + 1}/{args.reps}: {name} {'phases' if phases == '1' else 'totals'}",
                      file=sys.stderr, flush=True)
                got = run_worker(__file__, [path, phases, "1" if args.cold else "0"])
                runs[name].append({k: v for k, v in got.items() if (" | " in k) == (phases == "1")})
    keys = sorted({k for rs in runs.values() for r in rs for k in r}, key=lambda k: (" | " in k, k))
    # a phase only one checkout has (plan / apply_plan) is left out of the other's summary
    summary = {name: {k: statistics.median(v) for k in keys if (v := [r[k] for r in rs if k in r])}
               for name, rs in runs.items()}
    headers = ["figure", *systems] + (["this / base"] if "base" in systems else [])
    rows = []
    for k in keys:
        row: list[object] = [k, *(f"{summary[n].get(k, float('nan')):.3f}" for n in systems)]
        if "base" in systems:
            row.append(f"{summary['this'][k] / summary['base'][k]:.2f}x"
                       if summary["base"].get(k) and k in summary["this"] else "")
        rows.append(row)
    modelled = f", fsync modelled as {args.fsync_sleep_us:g} us" if args.fsync_sleep_us is not None else ""
    print_table(headers, rows, title=f"member writes, JSON backend, {MEMBERS:,} members"
                                     f"{' (reopened: cold)' if args.cold else ''}"
                                     f"{f', in {args.dir}' if args.dir else ''}{modelled}"
                                     f", medians of {args.reps} "
                                     f"interleaved repetitions (ms; save in us; phases wrapped, per call)")
    path = write_results("batch-cold" if args.cold else "batch",
                         {"reps": args.reps, "systems": systems, "summary": summary, "runs": runs, "cold": args.cold,
                          "dir": args.dir, "fsync_sleep_us": args.fsync_sleep_us,
                          "cpu_count": os.cpu_count()})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
