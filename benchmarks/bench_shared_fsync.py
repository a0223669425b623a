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
* ``group``: the cross-process group commit benchmarks/README.md proposes (issue 15), PostgreSQL ``XLogFlush``
  style, with what it must pay: the ``pwrite`` under the append lock at the *written end* (the counter), which it
  moves; the lock let go; then a second lock, the *flush lock*: a writer whose record the *committed end* (a
  counter in a third file, published after each fsync) already covers is done without an fsync of its own; else it
  reads the written end, ``fdatasync``s once for every record before it and publishes that as the committed end.
  A record that would cross a 4 KiB page starts at the next one instead (filler in between): with several
  records in flight a power loss could otherwise leave a torn record before a whole one, which the journal's
  reader takes for corruption. Also counts the fsyncs (records per fsync);
* ``ordered``: the other way to keep the rule that a record becomes committed only once its own fsync succeeded:
  each writer registers its record's span in its slot (under the append lock), lets go, runs its own
  ``fdatasync`` (overlapping the others', as ``outside``), then under the second lock marks its slot synced and
  moves the committed end over every record from it on whose slot says synced, in order; then waits (polling the
  committed end every 20 us) until the committed end covers its record;
* ``slots``: leader/follower through shared slots, the fsync under the lock as ``inside``: a writer that finds the
  lock taken offers its record in its slot of a third file (under the slot's mutex, an OFD lock on one byte) and
  then waits for the lock; the holder, before its ``pwrite``, claims every offered slot (CLAIMED, with the place,
  under the slot's mutex), writes its record and the claimed ones in one ``pwrite``, one ``fdatasync``, publishes
  the end, marks them COMMITTED and lets go; a follower that then gets the lock and finds COMMITTED lets go
  without writing;
* ``single``: one process, ``inside`` (the floor of bench_peers.py, for scale).

``--work-us N``: each writer spins N microseconds of CPU per record before taking the lock (what a save costs
its process outside the serialized part: with 4 writers on 2 cores the CPU, not the disk, then bounds ``group``).

Run: ``python benchmarks/bench_shared_fsync.py [--dir DIR] [--writers 4] [--seconds 2] [--reps 5]``; the disk
matters (the default is the system temp dir). Results go to ``benchmarks/results/shared_fsync.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt, machine_info, print_table, write_results

RECORD = b'[["p","members","42_%08d",{"user_id":"1","guild_id":"42","statistics":{"message_count":7}}]]\n'
_SLOT = struct.Struct("<QQQ")  # ordered: a writer's record in flight: start, end, synced (at 8 + index * size)
PAGE = 4096
ROOM = 64 << 20  # preallocated newlines: no size change to commit, as in the journal's filler
MODES = ("single", "inside", "outside", "group", "ordered", "slots")
#: slots: one slot a writer in a file beside the lock: state, length, where the holder put it, the record
_SLOTHEAD = struct.Struct("<BxxxIQ")
SLOT_SIZE = 512
EMPTY, OFFERED, CLAIMED, COMMITTED = 0, 1, 2, 3


def prepare(folder: Path) -> None:
    with open(folder / "journal", "wb") as f:
        chunk = b"\n" * (1 << 20)
        for _ in range(ROOM >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    (folder / "end").write_bytes((0).to_bytes(8, "little"))
    (folder / "flush").write_bytes(bytes(8 + _SLOT.size * 64))
    (folder / "slots").write_bytes(bytes(SLOT_SIZE * 64))


def _ofd(fd: int, kind: int, byte: int, wait: bool = True) -> None:
    """An OFD lock (or unlock) of one byte of the slot file (the slot's mutex)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK,
                struct.pack("hhqqi", kind, os.SEEK_SET, (1 << 30) + byte, 1, 0))


def _slots_commit(fd: int, lock: int, slots: int, index: int, line: bytes) -> int:
    """slots: under the flock. Claim every offered slot (CLAIMED with its place, under its mutex, before the
    write), write ours and theirs in one pwrite, one fdatasync, publish the end, mark them COMMITTED. Returns the
    records committed (ours included)."""
    end = int.from_bytes(os.pread(lock, 8, 0), "little")
    table = os.pread(slots, SLOT_SIZE * 64, 0)
    parts = [line]
    at = end + len(line)
    claimed = []
    for other in range(64):
        if other == index:
            continue
        state, length, _x = _SLOTHEAD.unpack_from(table, other * SLOT_SIZE)
        if state != OFFERED:
            continue
        _ofd(slots, fcntl.F_WRLCK, other)
        head = os.pread(slots, SLOT_SIZE, other * SLOT_SIZE)
        state, length, _x = _SLOTHEAD.unpack_from(head)
        if state == OFFERED:
            record = head[_SLOTHEAD.size:_SLOTHEAD.size + length]
            os.pwrite(slots, _SLOTHEAD.pack(CLAIMED, length, at), other * SLOT_SIZE)
            parts.append(record)
            claimed.append((other, length, at))
            at += length
        _ofd(slots, fcntl.F_UNLCK, other)
    os.pwrite(fd, b"".join(parts), end)
    os.fdatasync(fd)
    os.pwrite(lock, at.to_bytes(8, "little"), 0)
    for other, length, x in claimed:
        _ofd(slots, fcntl.F_WRLCK, other)
        os.pwrite(slots, _SLOTHEAD.pack(COMMITTED, length, x), other * SLOT_SIZE)
        _ofd(slots, fcntl.F_UNLCK, other)
    return len(parts)


def writer(folder: Path, index: int, mode: str, start_at: float, seconds: float,
           work_us: float = 0.0) -> dict[str, float]:
    """One writer process: records until the window ends; how many, the window's length and its fsyncs."""
    fd = os.open(folder / "journal", os.O_RDWR)
    lock = os.open(folder / "end", os.O_RDWR)
    flush = os.open(folder / "flush", os.O_RDWR)
    slots = os.open(folder / "slots", os.O_RDWR)
    time.sleep(max(0.0, start_at - time.time()))
    deadline = start_at + seconds
    n = syncs = 0
    while time.time() < deadline:
        if work_us:
            spin_until = time.thread_time() + work_us / 1e6
            while time.thread_time() < spin_until:
                pass
        line = RECORD % (index * 10_000_000 + n)
        if mode == "slots":
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the lock is taken: offer the record to its holder, then wait as usual
                _ofd(slots, fcntl.F_WRLCK, index)
                os.pwrite(slots, _SLOTHEAD.pack(OFFERED, len(line), 0) + line, index * SLOT_SIZE)
                _ofd(slots, fcntl.F_UNLCK, index)
                fcntl.flock(lock, fcntl.LOCK_EX)
                _ofd(slots, fcntl.F_WRLCK, index)
                state = os.pread(slots, 1, index * SLOT_SIZE)[0]
                os.pwrite(slots, bytes(1), index * SLOT_SIZE)  # EMPTY: ours now, whatever happened
                _ofd(slots, fcntl.F_UNLCK, index)
                if state == COMMITTED:  # a holder wrote and synced it: nothing to do (the store catches up here)
                    fcntl.flock(lock, fcntl.LOCK_UN)
                    n += 1
                    continue
            syncs += 1
            _slots_commit(fd, lock, slots, index, line)
            fcntl.flock(lock, fcntl.LOCK_UN)
            n += 1
            continue
        fcntl.flock(lock, fcntl.LOCK_EX)
        end = int.from_bytes(os.pread(lock, 8, 0), "little")
        if end + len(line) > ROOM:
            fcntl.flock(lock, fcntl.LOCK_UN)
            break
        if mode == "group" and end // PAGE != (end + len(line) - 1) // PAGE:
            end = -(-end // PAGE) * PAGE  # never across a page: a power loss leaves it whole or absent (README)
        os.pwrite(fd, line, end)
        if mode == "ordered":
            mine = end + len(line)
            os.pwrite(lock, mine.to_bytes(8, "little"), 0)
            os.pwrite(flush, _SLOT.pack(end, mine, 0), 8 + _SLOT.size * index)  # in flight
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.fdatasync(fd)
            syncs += 1
            fcntl.flock(flush, fcntl.LOCK_EX)
            os.pwrite(flush, _SLOT.pack(end, mine, 1), 8 + _SLOT.size * index)
            state = os.pread(flush, 8 + _SLOT.size * 64, 0)
            committed = int.from_bytes(state[:8], "little")
            spans = {start: (stop, synced) for start, stop, synced in _SLOT.iter_unpack(state[8:]) if stop}
            while committed in spans and spans[committed][1]:  # over the synced records in order
                committed = spans[committed][0]
            os.pwrite(flush, committed.to_bytes(8, "little"), 0)
            fcntl.flock(flush, fcntl.LOCK_UN)
            while committed < mine:
                time.sleep(0.00002)
                committed = int.from_bytes(os.pread(flush, 8, 0), "little")
        elif mode == "group":
            mine = end + len(line)
            os.pwrite(lock, mine.to_bytes(8, "little"), 0)  # the written end
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(flush, fcntl.LOCK_EX)
            if int.from_bytes(os.pread(flush, 8, 0), "little") < mine:  # not covered by another's fsync yet
                written = int.from_bytes(os.pread(lock, 8, 0), "little")  # every record before it: one fsync
                os.fdatasync(fd)
                syncs += 1
                os.pwrite(flush, written.to_bytes(8, "little"), 0)  # the committed end
            fcntl.flock(flush, fcntl.LOCK_UN)
        elif mode == "outside":
            os.pwrite(lock, (end + len(line)).to_bytes(8, "little"), 0)
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.fdatasync(fd)
            syncs += 1
        else:
            os.fdatasync(fd)
            syncs += 1
            os.pwrite(lock, (end + len(line)).to_bytes(8, "little"), 0)
            fcntl.flock(lock, fcntl.LOCK_UN)
        n += 1
    return {"records": n, "seconds": time.time() - start_at, "syncs": syncs}


def run(folder: Path, mode: str, writers: int, seconds: float, work_us: float) -> tuple[float, float]:
    """records/s in all, and records per fsync."""
    prepare(folder)
    count = 1 if mode == "single" else writers
    start_at = time.time() + 1.0  # python starts in 0.3-0.6 s on a loaded host: every writer starts together
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(folder), str(i), mode, str(start_at),
                               str(seconds), str(work_us)], stdout=subprocess.PIPE, text=True) for i in range(count)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode:
            raise RuntimeError(f"writer exited with {proc.returncode}")
        results.append(json.loads(out))
    records = sum(r["records"] for r in results)
    return records / max(r["seconds"] for r in results), records / max(1, sum(r["syncs"] for r in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write (default: the system temp dir); the disk matters")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work-us", type=float, default=0.0,
                        help="CPU microseconds each writer spins per record, outside the locks")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder, index, mode, start_at, seconds, work_us = args.worker
        print(json.dumps(writer(Path(folder), int(index), mode, float(start_at), float(seconds), float(work_us))))
        return 0
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    per_sync: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench_shared_fsync-", dir=args.dir) as tmp:
        info = machine_info(tmp)
        for rep in range(args.reps):
            order = MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]
            for mode in order:
                rate, batch = run(Path(tmp), mode, args.writers, args.seconds, args.work_us)
                runs[mode].append(rate)
                per_sync[mode].append(batch)
                print(f"rep {rep + 1}/{args.reps} {mode}: {rate:,.0f} records/s, {batch:.2f} records per fsync",
                      file=sys.stderr)
    medians = {mode: statistics.median(values) for mode, values in runs.items()}
    print_table(["way", "records/s (median)", "per repetition", "/ single", "/ inside", "records per fsync"],
                [[mode, fmt(medians[mode]), " ".join(f"{v:,.0f}" for v in runs[mode]),
                  f"{medians[mode] / medians['single']:.2f}x", f"{medians[mode] / medians['inside']:.2f}x",
                  f"{statistics.median(per_sync[mode]):.2f}"] for mode in MODES])
    path = write_results("shared_fsync", {"machine": info, "writers": args.writers, "seconds": args.seconds,
                                          "work_us": args.work_us, "runs": runs, "medians": medians,
                                          "records_per_fsync": per_sync})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
