"""What an fdatasync costs after each way of putting a journal record on disk (issue 15, json/filler.py).

Three ways, same records, interleaved repetitions, medians:

* ``append``: ``write`` at the end of the file (``O_APPEND``), then ``fdatasync``: each sync also commits the new
  file size (what the journal did before preallocation, and the ``floor`` of bench_peers.py).
* ``overwrite``: ``pwrite`` over newlines that were written and fsynced beforehand, then ``fdatasync``: no size
  or allocation change to commit (what the journal does now, and what SQLite's WAL gets by reusing its file).
* ``fallocate``: ``pwrite`` into ``posix_fallocate``d (unwritten) space, then ``fdatasync``: shown for
  comparison; not used because unwritten extents read back as NUL bytes, and the journal stays readable text.

Run: ``python benchmarks/bench_fsync_modes.py [--dir DIR] [--records N] [--reps R]``; the disk matters (the
default is the system temp dir). Results go to ``benchmarks/results/fsync_modes.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import fmt, machine_info, print_table, write_results

RECORD = b'[["p","members","42_%08d",{"user_id":"1","guild_id":"42","statistics":{"message_count":7}}]]\n'


def _timed_writes(fd: int, records: int, write: Callable[[bytes, int], None]) -> list[float]:
    out, offset = [], 0
    for i in range(records):
        line = RECORD % i
        started = time.perf_counter()
        write(line, offset)
        os.fdatasync(fd)
        out.append(time.perf_counter() - started)
        offset += len(line)
    return out


def append(path: Path, records: int) -> list[float]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        os.fsync(fd)
        return _timed_writes(fd, records, lambda line, _offset: os.write(fd, line) and None)
    finally:
        os.close(fd)


def overwrite(path: Path, records: int) -> list[float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\n" * (len(RECORD % 0) * records))
        os.fsync(fd)
        return _timed_writes(fd, records, lambda line, offset: os.pwrite(fd, line, offset) and None)
    finally:
        os.close(fd)


def fallocate(path: Path, records: int) -> list[float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, len(RECORD % 0) * records)
        os.fsync(fd)
        return _timed_writes(fd, records, lambda line, offset: os.pwrite(fd, line, offset) and None)
    finally:
        os.close(fd)


MODES = {"append": append, "overwrite": overwrite, "fallocate": fallocate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write (default: the system temp dir); the disk matters")
    parser.add_argument("--records", type=int, default=2000, help="records per round (default 2000)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    args = parser.parse_args()
    medians: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_fsync-") as tmp:
        for rep in range(args.reps):
            for mode, run in MODES.items():
                times = run(Path(tmp) / mode, args.records)
                medians[mode].append(statistics.median(times) * 1e6)
                print(f"rep {rep + 1}/{args.reps} {mode}: median {medians[mode][-1]:.1f} us", flush=True)
    base = statistics.median(medians["append"])
    rows = [[mode, fmt(statistics.median(values)), fmt(base / statistics.median(values)) + "x",
             " ".join(fmt(v) for v in values)] for mode, values in medians.items()]
    print_table(["mode", "median write+fdatasync (us)", "speed vs append", "per repetition"], rows,
                title=f"{args.records} records of {len(RECORD % 0)} bytes, medians of {args.reps} interleaved "
                      "repetitions")
    path = write_results("fsync_modes", {"machine": machine_info(args.dir), "records": args.records,
                                         "median_us": {m: statistics.median(v) for m, v in medians.items()},
                                         "per_rep_us": medians})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
