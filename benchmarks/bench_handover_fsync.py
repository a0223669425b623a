"""What a hand-over of a write lock between processes costs the new holder's first fsyncs, and why the process that
let go should not start CPU work at once (issue 15, the 4-writer row; json/lease.py ``HOLD``).

    .venv/bin/python benchmarks/bench_handover_fsync.py                 # 4 processes, 0 / 0.3 / 1 ms of CPU after
    .venv/bin/python benchmarks/bench_handover_fsync.py --dir /var/tmp --procs 4 --busy-us 0,300 --nap-us 0,200

No storage code: ``--procs`` processes take turns on an ``flock``; each turn writes ``--per-turn`` records of 300
bytes (one ``pwrite`` at the shared end, kept in a second file, then ``fdatasync``) into a file written full of
newlines and fsynced first (as the JSON journal's filler), lets go, ``sched_yield``s, then sleeps ``--nap-us`` and
spins ``--busy-us`` of CPU (what a writer does after letting go: its next save's way into the wait, or a deferred
commit's apply of the others' records) before it asks for the lock again. Printed: the median ``fdatasync`` by
its index in the turn (the first records after a hand-over against the rest), and the records per second; each
combination in a fresh set of processes, the combinations interleaved over ``--reps`` repetitions, medians.

Why it matters: measured in the store (``bench_peers.py --counters`` with the append timed by its index in the
hold) the first append of a hold took ~2.5x a later one and the second ~1.7x; with no CPU work after letting go
this script shows no such cost, with it the new holder's first fsync grows by about the work done (the woken task
waits for a CPU). Results: benchmarks/results/handover_fsync.json.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

RECORD = b"x" * 299 + b"\n"
FILE_BYTES = 64 << 20
SHOWN = 6  # indices 0..SHOWN-1 apart, the rest as one "later" figure


def _turns(folder: str, per_turn: int, seconds: float, nap: float, busy: float, out: Any) -> None:
    """One process: take the lock, write ``per_turn`` records with an fsync each, let go; until ``seconds``."""
    journal = os.open(os.path.join(folder, "journal"), os.O_RDWR)
    lock = os.open(os.path.join(folder, "lock"), os.O_RDWR)
    ends = os.open(os.path.join(folder, "end"), os.O_RDWR)
    by_index: dict[int, list[float]] = {}
    records = 0
    clock = time.perf_counter
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for i in range(per_turn):
            end = struct.unpack("<Q", os.pread(ends, 8, 0))[0]
            os.pwrite(journal, RECORD, end)
            began = clock()
            os.fdatasync(journal)
            by_index.setdefault(min(i, SHOWN), []).append(clock() - began)
            os.pwrite(ends, struct.pack("<Q", (end + len(RECORD)) % (FILE_BYTES - len(RECORD))), 0)
            records += 1
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.sched_yield()
        if nap:
            time.sleep(nap)
        if busy:
            until = clock() + busy
            while clock() < until:
                pass
    out.put({"records": records, "by_index": {str(k): statistics.median(v) for k, v in by_index.items()}})


def measure(folder: str, procs: int, per_turn: int, seconds: float, nap: float, busy: float) -> dict[str, float]:
    """One combination in fresh processes: records/s and the median fdatasync (us) by index in the turn."""
    with open(os.path.join(folder, "journal"), "wb") as f:
        f.write(b"\n" * FILE_BYTES)
        f.flush()
        os.fsync(f.fileno())
    Path(folder, "lock").write_bytes(b"")
    Path(folder, "end").write_bytes(struct.pack("<Q", 0))
    out: Any = mp.Queue()
    workers = [mp.Process(target=_turns, args=(folder, per_turn, seconds, nap, busy, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    got = {"records_per_s": sum(r["records"] for r in results) / seconds}
    for i in range(SHOWN + 1):
        values = [r["by_index"][str(i)] for r in results if str(i) in r["by_index"]]
        got[f"fsync_{i}_us" if i < SHOWN else "fsync_later_us"] = 1e6 * statistics.median(values) if values else 0.0
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where the file goes (default: the system temp dir)")
    parser.add_argument("--procs", type=int, default=4, help="processes taking turns (default 4)")
    parser.add_argument("--per-turn", type=int, default=40, help="records per turn (default 40)")
    parser.add_argument("--seconds", type=float, default=2.0, help="each combination's window (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--busy-us", default="0,300,1000", help="CPU spun after letting go, comma-separated")
    parser.add_argument("--nap-us", default="0", help="sleep before that CPU work, comma-separated")
    args = parser.parse_args(argv)
    combos = [(int(n), int(b)) for n in args.nap_us.split(",") for b in args.busy_us.split(",")]
    runs: dict[str, list[dict[str, float]]] = {f"nap {n} us, busy {b} us": [] for n, b in combos}
    with tempfile.TemporaryDirectory(prefix="bench-handover-", dir=args.dir) as folder:
        for rep in range(args.reps):
            for (nap, busy), name in zip(combos, runs, strict=True):
                print(f"rep {rep + 1}/{args.reps}: {name}", file=sys.stderr, flush=True)
                runs[name].append(measure(folder, args.procs, args.per_turn, args.seconds, nap / 1e6, busy / 1e6))
    keys = list(next(iter(runs.values()))[0])
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    headers = ["after letting go", *[k.removesuffix("_us").removesuffix("_per_s").replace("_", " ") for k in keys]]
    rows = [[name, *(f"{s[k]:,.0f}" for k in keys)] for name, s in summary.items()]
    print_table(headers, rows, title=f"{args.procs} processes, {args.per_turn} records a turn, fdatasync us by index "
                                     f"in the turn, medians of {args.reps} (load {os.getloadavg()[0]:.2f})")
    path = write_results("handover_fsync", {"args": vars(args), "runs": runs, "summary": summary,
                                            "load": os.getloadavg()})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
