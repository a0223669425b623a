"""A batch's commit with its record's writeback started before the fsync and its apply planned meanwhile, against
the sync thread's offer (json/store.py ``_timed_sync``), batch by batch in one process (issue 15's batch row).

    .venv/bin/python benchmarks/bench_writeback.py             # 3 runs of 60 batches, 100k members
    .venv/bin/python benchmarks/bench_writeback.py --runs 5 --batches 80 --dir /some/other/disk

Why in one process, batch by batch: on the shared host the disk's fsync and the CPU's speed move from one second
to the next (bench_peers.py's batch row swung 1.2-2.9x between two identical checkouts in one run), so two
checkouts in two processes minutes apart compare moods, not code. Here each run is a fresh process on a fresh
copy of a 100k-member store (bench_peers.py's pattern first: 3,000 gets and 300 saves), and its ``put_many``
batches of 1,000 members alternate between the two ways: even batches start the writeback
(``fsutil.start_writeback``), odd ones are told it cannot be started (the sync thread's offer, as off Linux).
Both ways see the same disk within milliseconds of each other. Per way: the batch's wall and process CPU time,
``normalize_columns``, the plan (``PutRun.plan``), the commit's I/O (``Journal.write_at``: write, writeback,
plan or offer, fsync), and how many plans came after the fsync (the offer not taken). Medians per run.
Results: benchmarks/results/writeback.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, member_doc, member_ids, print_table, run_worker, write_results

WAYS = ("writeback", "offer")
PHASES = ("wall", "cpu", "normalize", "plan", "write_at")


def key_of(i: int) -> str:
    user, guild = member_ids(i)
    return f"{guild}_{user}"


async def prepare(path: Path, members: int) -> dict[str, Any]:
    import storage

    store = await storage.open_store(backend="json", path=path)
    for start in range(0, members, 10_000):
        await store.put_many("members", {key_of(i): member_doc(i) for i in range(start, min(members, start + 10_000))})
    await store.close()
    return {}


def instrument(spans: list[dict[str, list[tuple[float, float]]]], odd: list[bool]) -> None:
    """Wrap the phases (their spans go to the current batch's dict, ``spans[-1]``) and make the store's
    ``start_writeback`` answer False on odd batches."""
    from storage import documents
    from storage.backends.json import journal, put_run
    from storage.backends.json import store as json_store

    clock = time.perf_counter

    def wrap(owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = clock()
            try:
                return real(*args, **kwargs)
            finally:
                if spans:
                    spans[-1].setdefault(label, []).append((began, clock()))

        setattr(owner, name, timed)

    real_writeback: Callable[[int], bool] = json_store.start_writeback

    def start_writeback(fd: int) -> bool:
        return False if odd[0] else real_writeback(fd)

    json_store.start_writeback = start_writeback  # type: ignore[assignment]
    wrap(documents, "normalize_columns", "normalize")
    wrap(put_run.PutRun, "plan", "plan")
    wrap(journal.Journal, "write_at", "write_at")
    wrap(json_store, "sync_fd", "fsync")
    wrap(json_store.SyncThread, "sync_during", "fsync")


async def measure(path: Path, members: int, batches: int) -> dict[str, Any]:
    import storage

    spans: list[dict[str, list[tuple[float, float]]]] = []
    odd = [False]
    instrument(spans, odd)
    store = await storage.open_store(backend="json", path=path)
    rng = random.Random(7)
    picks = [rng.randrange(members) for _ in range(4096)]
    for n in range(3000):
        await store.get_member_data(*member_ids(picks[n & 4095]))
    docs = [member_doc(i) for i in picks]
    for n in range(300):
        doc = docs[n & 4095]
        doc["statistics"]["message_count"] = n + 1
        await store.save_member_data(*member_ids(picks[n & 4095]), doc)
    rows: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    late = dict.fromkeys(WAYS, 0)
    for b in range(batches):
        base = (b * 7000) % members
        items = {}
        for j in range(1000):
            i = (base + j) % members
            doc = member_doc(i)
            doc["statistics"]["message_count"] = b + 1
            items[key_of(i)] = doc
        odd[0] = bool(b % 2)
        spans.append({})
        cpu, began = time.process_time(), time.perf_counter()
        await store.put_many("members", items)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu
        got = spans.pop()
        if b < 4:  # the first batches build the snapshot's sizes and warm up
            continue
        way = WAYS[b % 2]
        row = {"wall": wall, "cpu": cpu}
        for label in ("normalize", "plan", "write_at"):
            if label in got:
                row[label] = sum(end - start for start, end in got[label])
        if "plan" in got and "fsync" in got and got["plan"][0][0] >= got["fsync"][-1][1]:
            late[way] += 1
        rows[way].append(row)
    await store.close()
    out: dict[str, Any] = {}
    for way in WAYS:
        out[way] = {phase: 1000 * statistics.median([row[phase] for row in rows[way] if phase in row])
                    for phase in PHASES if any(phase in row for row in rows[way])}
        out[way]["plans_after_fsync"] = late[way]
        out[way]["batches"] = len(rows[way])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=60, help="batches of 1,000 per run, half each way")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes, each on a fresh copy of the store")
    parser.add_argument("--dir", help="where to put the data (default: the system temp dir); the disk matters")
    parser.add_argument("--worker", nargs=3, metavar=("STEP", "PATH", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        step, path, extra = args.worker
        params = json.loads(extra)
        work = prepare(Path(path), *params) if step == "prepare" else measure(Path(path), *params)
        print(json.dumps(asyncio.run(work)))
        return 0

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_writeback-", dir=args.dir) as tmp:
        info = machine_info(tmp)
        template = Path(tmp) / "template"
        template.mkdir()
        run_worker(__file__, ["prepare", str(template), json.dumps([args.members])])
        for run in range(args.runs):
            place = Path(tmp) / f"run-{run}"
            shutil.copytree(template, place)
            got = run_worker(__file__, ["measure", str(place), json.dumps([args.members, args.batches])])
            got["load"] = os.getloadavg()[0]
            runs.append(got)
            shutil.rmtree(place)
            print(f"run {run + 1}/{args.runs}: " + ", ".join(
                f"{way} wall {got[way]['wall']:.3f} ms" for way in WAYS), file=sys.stderr)
    rows = []
    for index, got in enumerate(runs, 1):
        for way in WAYS:
            rows.append([index, way, *(f"{got[way].get(phase, float('nan')):.3f}" for phase in PHASES),
                         got[way]["plans_after_fsync"], got[way]["batches"], f"{got['load']:.1f}"])
    print_table(["run", "way", *(f"{phase} ms" for phase in PHASES), "plans after fsync", "batches", "load"], rows,
                title=f"put_many of 1,000 members at {args.members:,}, medians per run (batches alternating)")
    path = write_results("writeback", {"machine": info, "members": args.members, "batches": args.batches,
                                       "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
