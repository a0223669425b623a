"""Where the JSON backend's key -> offset sidecar starts to pay: open + first get, and a compaction, with and without
it, at a few snapshot sizes (the basis of ``storage.backends.json.offsets.MIN_SNAPSHOT_BYTES``).

Run it from the repository root::

    .venv/bin/python benchmarks/bench_offsets_threshold.py                   # 10 .. 30,000 members, 15 repetitions
    .venv/bin/python benchmarks/bench_offsets_threshold.py --sizes 100,3000 --reps 31

For each size, one store of seed-shaped members is prepared and copied twice: ``sidecar`` keeps its
``storage.members.offsets`` and opens lazily (json/lazy.py: the table read, one crc32 pass over the snapshot, the
first document ``pread``); ``whole`` has none and is opened with the threshold above its size, so it is read whole
and no sidecar is written (what a snapshot below the threshold gets). The two are measured alternately in this one
process (the interpreter, the imports and the page cache are warm for both), ``--reps`` times; medians reported:

* ``open + get``: ``open_store`` through the first ``get_member_data``;
* ``compact``: one ``save_member_data`` then ``compact()``: the snapshot rewritten, plus (``sidecar``) the sidecar
  rendered and written with its own fsync.

Results go to ``benchmarks/results/offsets_threshold.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

from _common import fmt, machine_info, member_doc, member_ids, print_table, write_results

import storage
from storage.backends.json import offsets

NEVER = 1 << 62


def key_of(i: int) -> str:
    user_id, guild_id = member_ids(i)
    return f"{guild_id}_{user_id}"


async def prepare(path: Path, members: int) -> int:
    """A compacted store of ``members`` members with its sidecar; returns the snapshot's size in bytes."""
    offsets.MIN_SNAPSHOT_BYTES = 0
    async with storage.open_store(backend="json", path=path) as store:
        for start in range(0, members, 10_000):
            await store.put_many("members", {key_of(i): member_doc(i)
                                             for i in range(start, min(members, start + 10_000))})
    assert (path / offsets.offsets_name("members")).is_file()
    return (path / "members.json").stat().st_size


async def one(path: Path, members: int, threshold: int, rep: int) -> tuple[float, float]:
    """(open + first get ms, save + compact ms) with the given threshold."""
    offsets.MIN_SNAPSHOT_BYTES = threshold
    user_id, guild_id = member_ids((rep * 7919) % members)
    started = time.perf_counter()
    store = await storage.open_store(backend="json", path=path)
    try:
        doc = await store.get_member_data(user_id, guild_id)
        opened = time.perf_counter() - started
        assert doc is not None and doc["user_id"] == str(user_id)
        doc["statistics"]["message_count"] = rep + 1
        await store.save_member_data(user_id, guild_id, doc)
        started = time.perf_counter()
        await store.compact()
        compacted = time.perf_counter() - started
    finally:
        await store.close()
    return 1000 * opened, 1000 * compacted


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for members in sizes:
            base = Path(tmp) / f"m{members}"
            snapshot = await prepare(base / "prepared", members)
            lazy, whole = base / "sidecar", base / "whole"
            shutil.copytree(base / "prepared", lazy)
            shutil.copytree(base / "prepared", whole)
            (whole / offsets.offsets_name("members")).unlink()
            times: dict[str, list[tuple[float, float]]] = {"sidecar": [], "whole": []}
            for rep in range(args.reps):
                order = [("sidecar", lazy, 0), ("whole", whole, NEVER)]
                for mode, path, threshold in order if rep % 2 == 0 else order[::-1]:
                    times[mode].append(await one(path, members, threshold, rep))
            assert not (whole / offsets.offsets_name("members")).exists()
            row: dict[str, Any] = {"members": members, "snapshot_bytes": snapshot,
                                   "sidecar_bytes": (lazy / offsets.offsets_name("members")).stat().st_size}
            for mode, got in times.items():
                row[f"{mode}_open_ms"] = statistics.median(t[0] for t in got)
                row[f"{mode}_compact_ms"] = statistics.median(t[1] for t in got)
            rows.append(row)
            print(f"{members} members done", file=sys.stderr, flush=True)
    return {"rows": rows, "reps": args.reps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,300,1000,3000,10000,30000", help="members per store")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dir", default=None, help="where the stores go (default: the system's temp folder)")
    args = parser.parse_args(argv)
    info = machine_info(args.dir)
    result = asyncio.run(run(args))
    rows = result["rows"]
    print_table(["members", "snapshot KiB", "sidecar KiB", "open+get ms sidecar", "open+get ms whole",
                 "whole / sidecar", "compact ms sidecar", "compact ms whole"],
                [[r["members"], fmt(r["snapshot_bytes"] / 1024), fmt(r["sidecar_bytes"] / 1024),
                  fmt(r["sidecar_open_ms"]), fmt(r["whole_open_ms"]), fmt(r["whole_open_ms"] / r["sidecar_open_ms"]),
                  fmt(r["sidecar_compact_ms"]), fmt(r["whole_compact_ms"])] for r in rows],
                title=f"open + first get and compaction, with and without the sidecar (medians of {args.reps}, "
                      f"load {info.get('loadavg_1m')})")
    path = write_results("offsets_threshold", {"machine": info, **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
