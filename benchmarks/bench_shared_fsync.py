"""What sharing fsyncs between writer processes could gain on a disk (issue 15, the 4-writer row).

Each of ``--writers`` processes appends small records to one file (preallocated with newlines and fsynced, as
the JSON journal's filler is), taking an ``flock`` to learn where the records end (a counter in a second file)
and to write its record there. Two ways, interleaved repetitions, medians:

* ``inside``: the ``fdatasync`` runs under the lock (what the JSON backend and SQLite WAL ``synchronous=FULL``
  do: one fsync per commit, one commit at a time): the disk's floor, whatever the number of writers;
* ``outside``: the lock is let go right after the ``pwrite``; the ``fdatasync`` runs after it, so several
  writers' fsyncs overlap, and the file system may commit them together (ext4's journal batches concurrent
  fsyncs): the most a cross-process group commit could reach on this disk, with none of what it must pay to
  keep every guarantee (see benchmarks/README.md, "Design measurements", issue 15);
* ``single``: one process, ``inside`` (the floor of bench_peers.py, for scale).

Run: ``python benchmarks/bench_shared_fsync.py [--dir DIR] [--writers 4] [--seconds 2] [--reps 5]``; the disk
matters (the default is the system temp dir). Results go to ``benchmarks/results/shared_fsync.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt, machine_info, print_table, write_results

RECORD = b'[["p","members","42_%08d",{"user_id":"1","guild_id":"42","statistics":{"message_count":7}}]]\n'
ROOM = 64 << 20  # preallocated newlines: no size change to commit, as in the journal's filler
MODES = ("single", "inside", "outside")


def prepare(folder: Path) -> None:
    with open(folder / "journal", "wb") as f:
        chunk = b"\n" * (1 << 20)
        for _ in range(ROOM >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    (folder / "end").write_bytes((0).to_bytes(8, "little"))


def writer(folder: Path, index: int, mode: str, start_at: float, seconds: float) -> dict[str, float]:
    """One writer process: records until the window ends; how many, and the window's length."""
    fd = os.open(folder / "journal", os.O_RDWR)
    lock = os.open(folder / "end", os.O_RDWR)
    time.sleep(max(0.0, start_at - time.time()))
    deadline = start_at + seconds
    n = 0
    while time.time() < deadline:
        line = RECORD % (index * 10_000_000 + n)
        fcntl.flock(lock, fcntl.LOCK_EX)
        end = int.from_bytes(os.pread(lock, 8, 0), "little")
        if end + len(line) > ROOM:
            fcntl.flock(lock, fcntl.LOCK_UN)
            break
        os.pwrite(fd, line, end)
        if mode == "outside":
            os.pwrite(lock, (end + len(line)).to_bytes(8, "little"), 0)
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.fdatasync(fd)
        else:
            os.fdatasync(fd)
            os.pwrite(lock, (end + len(line)).to_bytes(8, "little"), 0)
            fcntl.flock(lock, fcntl.LOCK_UN)
        n += 1
    return {"records": n, "seconds": time.time() - start_at}


def run(folder: Path, mode: str, writers: int, seconds: float) -> float:
    prepare(folder)
    count = 1 if mode == "single" else writers
    start_at = time.time() + 0.3
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(folder), str(i), mode, str(start_at),
                               str(seconds)], stdout=subprocess.PIPE, text=True) for i in range(count)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode:
            raise RuntimeError(f"writer exited with {proc.returncode}")
        results.append(json.loads(out))
    return sum(r["records"] for r in results) / max(r["seconds"] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write (default: the system temp dir); the disk matters")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, index, mode, start_at, seconds = args.worker
        print(json.dumps(writer(Path(folder), int(index), mode, float(start_at), float(seconds))))
        return 0
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench_shared_fsync-", dir=args.dir) as tmp:
        info = machine_info(tmp)
        for rep in range(args.reps):
            order = MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]
            for mode in order:
                runs[mode].append(run(Path(tmp), mode, args.writers, args.seconds))
                print(f"rep {rep + 1}/{args.reps} {mode}: {runs[mode][-1]:,.0f} records/s", file=sys.stderr)
    medians = {mode: statistics.median(values) for mode, values in runs.items()}
    print_table(["way", "records/s (median)", "per repetition", "/ single"],
                [[mode, fmt(medians[mode]), " ".join(f"{v:,.0f}" for v in runs[mode]),
                  f"{medians[mode] / medians['single']:.2f}x"] for mode in MODES])
    path = write_results("shared_fsync", {"machine": info, "writers": args.writers, "seconds": args.seconds,
                                          "runs": runs, "medians": medians})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
