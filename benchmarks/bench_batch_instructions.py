"""Instructions the CPU part of a 1,000-member ``put_many`` costs on the JSON backend, counted by callgrind: a figure
that repeats on a shared, loaded machine where timings do not (issue 15, the batch row).

    .venv/bin/python benchmarks/bench_batch_instructions.py                          # this checkout
    .venv/bin/python benchmarks/bench_batch_instructions.py --baseline /path/to/old  # before/after
    .venv/bin/python benchmarks/bench_batch_instructions.py --parts                  # each step apart too

Each checkout runs in a fresh ``valgrind --tool=callgrind`` process (needs valgrind; about a minute each): a 10k
collection held in memory (a ``Tables`` without files: no I/O, no event loop), then ``BATCHES`` batches of 1,000
members put through what a ``put_many`` does on the loop's CPU: ``normalize_items`` (the member rule's fast path
and the encoding), ``_put_ops``, ``encode_record``, ``Tables.plan`` and ``apply_plan``. The counting is switched on
only inside one ``functools.reduce`` that makes those calls (``--toggle-collect``), so the start-up and the batches'
construction are not counted; the garbage collector is off in it (a collection runs wherever the allocations cross
a threshold, which moved a whole collection from one step to another between checkouts). Instructions are not
time: the plan's cost at 100k members is cache misses, which this does not see (benchmarks/README.md). Results:
benchmarks/results/batch-instructions.json.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkouts, member_doc, print_table, write_results

MEMBERS = 10_000
BATCHES = 20
PARTS = ("all", "normalize", "put_ops", "record", "plan", "apply_plan")


def worker(part: str) -> None:
    """The measured calls (in the callgrind process, with the checkout first on sys.path)."""
    from bench_batch import batch_items, key_of

    from storage.backends.json import store as json_store
    from storage.backends.json.journal import encode_record

    try:  # json/puts.py since the store's module was split; a baseline checkout may predate it
        from storage.backends.json.puts import put_ops
    except ImportError:
        put_ops = json_store._put_ops
    from storage.backends.json.tables import Tables
    from storage.documents import normalize_items

    class MemoryTables(Tables):
        """Tables over a dict of collections only: what plan and apply_plan read and change."""

        def __init__(self) -> None:  # no super().__init__(): no folder, no journal, no lock
            self.data = {"members": {}}
            self.sizes = {"members": 2}
            self.expires = {}
            self.dirty = set()
            self.feed = None
            self.indexes = type("NoIndexes", (), {"live": False})()

    tables = MemoryTables()
    seed = put_ops("members", normalize_items({key_of(i): member_doc(i) for i in range(MEMBERS)},
                                                          "members"), None)
    tables.apply_plan(tables.plan(seed), seed)
    batches = [batch_items(b) for b in range(BATCHES)]
    prepared = []
    if part not in ("all", "normalize"):
        for items in batches:
            pairs = normalize_items(items, "members")
            prepared.append((items, put_ops("members", pairs, None), pairs))

    def one(_: Any, batch: Any) -> None:
        if part == "all":
            ops = put_ops("members", normalize_items(batch, "members"), None)
            encode_record(ops)
            tables.apply_plan(tables.plan(ops), ops)
        elif part == "normalize":
            normalize_items(batch, "members")
        elif part == "put_ops":
            put_ops("members", batch[2], None)
        elif part == "record":
            encode_record(batch[1])
        elif part == "plan":
            tables.plan(batch[1])
        else:
            tables.apply_plan(tables.plan(batch[1]), batch[1])

    gc.collect()
    gc.disable()  # a collection lands wherever the allocations happen to cross a threshold: not in the count
    functools.reduce(one, batches if part in ("all", "normalize") else prepared, None)


def count(checkout: str, part: str) -> float:
    """Millions of instructions a batch, from one callgrind run of :func:`worker`."""
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as folder:
        out = os.path.join(folder, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--toggle-collect=functools_reduce", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--worker", checkout, part]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"callgrind run of {checkout} ({part}) failed:\n{proc.stderr[-2000:]}")
        return int(found.group(1)) / BATCHES / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="another checkout of this repository (before/after)")
    parser.add_argument("--parts", action="store_true", help="also count each step apart")
    parser.add_argument("--worker", nargs=2, metavar=("CHECKOUT", "PART"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, args.worker[0])
        worker(args.worker[1])
        return 0
    if shutil.which("valgrind") is None:
        parser.error("needs valgrind (apt-get install valgrind)")
    systems = checkouts(parser, __file__, args.baseline)
    parts = PARTS if args.parts else PARTS[:1]
    summary: dict[str, dict[str, float]] = {name: {} for name in systems}
    for part in parts:
        for name, path in systems.items():
            print(f"{name}: {part}", file=sys.stderr, flush=True)
            summary[name][part] = count(path, part)
    headers = ["M instructions a batch", *systems] + (["this / base"] if "base" in systems else [])
    rows = [[part, *(f"{summary[n][part]:.2f}" for n in systems)]
            + ([f"{summary['this'][part] / summary['base'][part]:.3f}x"] if "base" in systems else [])
            for part in parts]
    print_table(headers, rows, title=f"put_many of 1,000 members, CPU path only (callgrind), {MEMBERS:,} members "
                                     f"in memory, {BATCHES} batches")
    path = write_results("batch-instructions", {"systems": systems, "summary": summary, "batches": BATCHES})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
