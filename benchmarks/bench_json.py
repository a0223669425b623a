"""How fast is the JSON backend, against the seed's whole-file rewrite and against the disk's own floor?

Run it from the repository root::

    .venv/bin/python benchmarks/bench_json.py                  # 1k, 10k, 100k members (1-2 minutes)
    .venv/bin/python benchmarks/bench_json.py --quick          # 1k and 10k, shorter rounds (well under a minute)
    .venv/bin/python benchmarks/bench_json.py --sizes 5000 --dir /mnt/ssd/tmp

For each size, fresh subprocesses (so that one size's peak memory never shows in another's):

1. *prepare* builds a store of seed-shaped members (1000 per guild, keys ``f"{guild_id}_{user_id}"``): a snapshot
   plus a journal of single saves (5% of the members), as a bot leaves it between two compactions; and the seed's
   ``members.json`` of the same members.
2. *open*, three times: opens a fresh copy of that store, as a bot restart does (open time, peak and final RSS).
3. *ops* opens one more copy and measures, through ``storage.open_store(backend="json")``:

   * ``save_member_data``: sequential (each awaited before the next) and 16 concurrent writers (``gather``);
   * ``get_member_data``; ``batch_update_members`` of 1000 updates;
   * two baselines in the same process, on the same disk: the seed's ``save_member_data`` body (read
     ``members.json``, set the key, ``json.dump(indent=2)``) and appending one ~300-byte line + ``os.fdatasync``
     (the physical floor of a durable write).

fsync is cheap and the machine is shared, so saves are measured in short rounds interleaved with the floor and
reported as ratios to it. Targets are printed as PASS/MISS for information; the script exits 0 either way.
Results go to ``benchmarks/results/json.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

from _common import (
    Rate,
    Target,
    atimed,
    concurrent_rate,
    fmt,
    machine_info,
    median_rate,
    member_doc,
    member_ids,
    peak_rss_mib,
    print_table,
    rss_mib,
    run_worker,
    timed,
    write_results,
)

WRITERS = 16
BATCH = 1000
JOURNAL_FRACTION = 0.05  # members re-saved one by one since the last compaction, in the store that is opened
FLOOR_LINE = b'[["p","members","x",' + b"0" * 278 + b"]]\n"  # 300 bytes, about one journal line of a save
OPEN_REPEATS = 3
ROUNDS = 5  # short rounds, medians: a neighbour's burst of I/O moves one round, not the result

# -- the data -------------------------------------------------------------------------------------------------------






def label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def log(size: int, message: str) -> None:
    print(f"[{label(size)}] {message}", file=sys.stderr, flush=True)


# -- prepare worker: build the store that the open and ops workers open --------------------------------------------


async def prepare(size: int, root: Path) -> dict[str, Any]:
    import storage

    t0 = time.perf_counter()
    build = root / "build"
    async with storage.open_store(backend="json", path=build) as store:
        for start in range(0, size, 10_000):
            updates = [{"user_id": member_ids(i)[0], "guild_id": member_ids(i)[1], "data": member_doc(i)}
                       for i in range(start, min(size, start + 10_000))]
            await store.batch_update_members(updates)
    bulk_s = time.perf_counter() - t0

    # Reopen and leave a journal of single saves, as a running bot does between compactions. The files are
    # copied while the store is open (every save is durable by then): exactly what a restart finds on disk.
    journal_saves = max(10, int(size * JOURNAL_FRACTION))
    rng = random.Random(size)
    async with storage.open_store(backend="json", path=build) as store:
        for n in range(journal_saves):
            i = rng.randrange(size)
            user_id, guild_id = member_ids(i)
            await store.save_member_data(user_id, guild_id, member_doc(i, version=n + 1))
        template = root / "template"
        template.mkdir()
        for name in ("members.json", "storage.journal"):
            shutil.copy2(build / name, template / name)
    shutil.rmtree(build)

    # The seed's file: json.dump(indent=2) of the same members, as its save_member_data writes it.
    seed = root / "seed"
    seed.mkdir()
    members = {}
    for i in range(size):
        user_id, guild_id = member_ids(i)
        members[f"{guild_id}_{user_id}"] = member_doc(i)
    with open(seed / "members.json", "w") as f:
        json.dump(members, f, indent=2, ensure_ascii=False)

    snapshot_bytes = (template / "members.json").stat().st_size
    journal_bytes = (template / "storage.journal").stat().st_size
    log(size, f"prepared in {time.perf_counter() - t0:.1f} s: snapshot {snapshot_bytes / 1e6:.1f} MB, "
              f"journal {journal_bytes / 1e6:.2f} MB ({journal_saves} saves)")
    return {"bulk_load_s": bulk_s, "bulk_load_members_per_s": size / bulk_s, "journal_saves": journal_saves,
            "snapshot_bytes": snapshot_bytes, "journal_bytes": journal_bytes,
            "seed_file_bytes": (seed / "members.json").stat().st_size}


# -- open and ops workers, and the two baselines -------------------------------------------------------------------


def floor_rate(path: Path, seconds: float) -> Rate:
    """The physical floor: append one 300-byte line and fdatasync it, as often as the disk allows."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        sync = getattr(os, "fdatasync", os.fsync)
        return timed(lambda _: (os.write(fd, FLOOR_LINE), sync(fd)), seconds=seconds, min_ops=20)
    finally:
        os.close(fd)


def seed_save_member_data(path: Path, user_id: int, guild_id: int, data: dict[str, Any]) -> bool:
    """The seed's ``save_member_data`` body (its error handling aside): read everything, set one key, rewrite."""
    try:
        with open(path) as f:
            members = json.load(f)
    except FileNotFoundError:
        members = {}
    key = f"{guild_id}_{user_id}"
    members[key] = data
    with open(path, "w") as f:
        json.dump(members, f, indent=2, ensure_ascii=False)
    return True


async def measure_open(size: int, root: Path, rep: int) -> dict[str, Any]:
    """One open in a fresh process, as a bot restart does: time, and the memory it takes."""
    import storage
    import storage.backends.json.store  # imported before the baseline memory reading

    folder = root / f"open{rep}"
    shutil.copytree(root / "template", folder)  # closing compacts: each open gets an untouched copy
    rss_before = rss_mib()
    t0 = time.perf_counter()
    store = await storage.open_store(backend="json", path=folder)
    open_s = time.perf_counter() - t0
    out = {"open_s": open_s, "rss_before_open_mib": rss_before, "rss_peak_open_mib": peak_rss_mib(),
           "rss_after_open_mib": rss_mib()}
    t0 = time.perf_counter()
    await store.close()
    out["close_s"] = time.perf_counter() - t0
    shutil.rmtree(folder)
    log(size, f"open {open_s:.3f} s, peak RSS {out['rss_peak_open_mib']:.0f} MiB, close {out['close_s']:.2f} s")
    return out


async def measure_ops(size: int, root: Path, scale: float) -> dict[str, Any]:
    """Every timed operation on one open store, then the seed baseline, in one fresh process."""
    import storage

    out: dict[str, Any] = {}
    shutil.copytree(root / "template", root / "ops")
    store = await storage.open_store(backend="json", path=root / "ops")
    rss_open = rss_mib()

    rng = random.Random(1)
    picks = [rng.randrange(size) for _ in range(4096)]
    ids = [member_ids(i) for i in picks]
    docs = [member_doc(i, version=10_000 + n) for n, i in enumerate(picks)]
    second = 0.3 * scale

    # get
    async def get(n: int) -> dict[str, Any]:
        user_id, guild_id = ids[n & 4095]
        doc: dict[str, Any] = await store.get_member_data(user_id, guild_id)
        return doc

    if (await get(0)).get("user_id") != str(ids[0][0]):
        raise RuntimeError("get_member_data did not return the prepared member")
    gets = [await atimed(get, seconds=second, min_ops=100) for _ in range(ROUNDS)]
    out["get_ops_s"] = median_rate(gets)

    # sequential saves, in rounds interleaved with the floor
    async def save(n: int) -> object:
        user_id, guild_id = ids[n & 4095]
        return await store.save_member_data(user_id, guild_id, docs[n & 4095])

    floor_path = root / "floor.bin"
    floors, saves = [], []
    for _ in range(ROUNDS):
        floors.append(floor_rate(floor_path, second))
        saves.append(await atimed(save, seconds=second, min_ops=20))
    out["floor_ops_s_seq"] = median_rate(floors)
    out["save_seq_ops_s"] = median_rate(saves)

    # 16 concurrent writers, interleaved with the floor likewise
    floors_c, concurrent = [], []
    for _ in range(ROUNDS):
        floors_c.append(floor_rate(floor_path, second))
        concurrent.append(await concurrent_rate(save, writers=WRITERS, seconds=second))
    out["floor_ops_s_concurrent"] = median_rate(floors_c)
    out["save_concurrent_ops_s"] = median_rate(concurrent)
    out["floor_ops_s"] = statistics.median(r.per_second for r in floors + floors_c)
    log(size, f"save {out['save_seq_ops_s']:,.0f}/s, {WRITERS} writers {out['save_concurrent_ops_s']:,.0f}/s, "
              f"floor {out['floor_ops_s']:,.0f}/s, get {out['get_ops_s']:,.0f}/s")

    # batch_update_members of 1000 existing members
    async def batch(n: int) -> object:
        start = (n * BATCH) % size
        updates = []
        for j in range(BATCH):
            i = (start + j) % size
            user_id, guild_id = member_ids(i)
            updates.append({"user_id": user_id, "guild_id": guild_id, "data": member_doc(i, version=20_000 + n)})
        t0 = time.perf_counter()
        written = await store.batch_update_members(updates)
        batch_times.append(time.perf_counter() - t0)  # building the updates is the caller's work: not counted
        if written != BATCH:
            raise RuntimeError(f"batch_update_members wrote {written} of {BATCH}")
        return written

    batch_times: list[float] = []
    await atimed(batch, seconds=2 * second, min_ops=5, max_ops=50)
    out["batch_ms"] = 1000 * statistics.median(batch_times)
    out["batch_ms_all"] = [1000 * t for t in batch_times]
    out["rss_growth_ops_mib"] = rss_mib() - rss_open
    await store.close()
    log(size, f"batch of {BATCH} {out['batch_ms']:.1f} ms")

    # the seed's whole-file rewrite: at 100k members a save takes seconds, so only a few
    seed_file = root / "seed" / "members.json"
    seed_rate = timed(lambda n: seed_save_member_data(seed_file, *ids[n & 4095], docs[n & 4095]),
                      seconds=3 * second, min_ops=2, max_ops=200)
    out["seed_save_ops_s"] = seed_rate.per_second
    out["seed_save_ops"] = seed_rate.ops
    log(size, f"seed whole-file save {seed_rate.per_second:,.2f}/s ({seed_rate.ms_per_op:,.0f} ms each)")
    return out


def summarize_opens(opens: list[dict[str, Any]]) -> dict[str, Any]:
    """Median open and close times over the fresh processes; memory from the first (they agree closely)."""
    first = opens[0]
    return {"open_s": statistics.median(o["open_s"] for o in opens), "open_s_all": [o["open_s"] for o in opens],
            "close_s": statistics.median(o["close_s"] for o in opens),
            **{k: first[k] for k in ("rss_before_open_mib", "rss_peak_open_mib", "rss_after_open_mib")}}


# -- the report -----------------------------------------------------------------------------------------------------


def targets(results: list[dict[str, Any]]) -> list[tuple[Target, str]]:
    """Each target with the per-size values it was judged on (a target must hold at every size measured)."""

    def per_size(key: str, base: str | None = None) -> tuple[list[float], str]:
        values = [r[key] / r[base] if base else r[key] for r in results]
        return values, "  ".join(f"{label(r['size'])}: {fmt(v)}" for r, v in zip(results, values))

    out: list[tuple[Target, str]] = []
    seq, seq_text = per_size("save_seq_ops_s", "floor_ops_s_seq")
    out.append((Target("sequential save / append+fsync", min(seq), ">=", 0.5, "x"), seq_text))
    con, con_text = per_size("save_concurrent_ops_s", "floor_ops_s_concurrent")
    out.append((Target(f"{WRITERS} writers / append+fsync", min(con), ">=", 3.0, "x"), con_text))
    small, large = results[0], results[-1]
    if large["size"] > small["size"]:
        ratio = large["save_seq_ops_s"] / small["save_seq_ops_s"]
        norm = ((large["save_seq_ops_s"] / large["floor_ops_s_seq"])
                / (small["save_seq_ops_s"] / small["floor_ops_s_seq"]))
        text = f"raw {fmt(ratio)}, each over its floor {fmt(norm)}"
        name = f"save at {label(large['size'])} / save at {label(small['size'])}"
        out.append((Target(name, ratio, ">=", 0.67, "x"), text))
    else:
        out.append((Target("save at largest / save at smallest", None, ">=", 0.67, "x"), "needs two sizes"))
    gets, get_text = per_size("get_ops_s")
    out.append((Target("get ops/s", min(gets), ">=", 100_000), get_text))
    batches, batch_text = per_size("batch_ms")
    out.append((Target(f"batch of {BATCH} (ms)", max(batches), "<=", 20), batch_text))
    big = [r for r in results if r["size"] == 100_000]
    out.append((Target("open of 100k (s)", big[0]["open_s"] if big else None, "<=", 0.75),
                "" if big else "100k not in --sizes"))
    return out


def report(results: list[dict[str, Any]], info: dict[str, Any]) -> list[tuple[Target, str]]:
    heads = ["members"] + [label(r["size"]) for r in results]

    def row(name: str, key: str, scale: float = 1.0, digits: int = 3) -> list[str]:
        return [name] + [fmt(r[key] * scale, digits) for r in results]

    rows = [
        row("append+fdatasync floor (ops/s)", "floor_ops_s"),
        row("save_member_data sequential (ops/s)", "save_seq_ops_s"),
        row(f"save_member_data {WRITERS} writers (ops/s)", "save_concurrent_ops_s"),
        row("seed whole-file save (ops/s)", "seed_save_ops_s"),
        ["  sequential save / seed save"] + [fmt(r["save_seq_ops_s"] / r["seed_save_ops_s"]) + "x" for r in results],
        row("get_member_data (ops/s)", "get_ops_s"),
        row(f"batch_update_members of {BATCH} (ms)", "batch_ms"),
        row("bulk load (members/s, prepare step)", "bulk_load_members_per_s"),
        row("snapshot (MB)", "snapshot_bytes", 1e-6),
        row("journal at open (MB)", "journal_bytes", 1e-6),
        row(f"open (s, median of {OPEN_REPEATS} fresh processes)", "open_s"),
        row("close right after open, compacts (s)", "close_s"),
        row("RSS before open (MiB)", "rss_before_open_mib"),
        row("peak RSS during open (MiB)", "rss_peak_open_mib"),
        row("RSS after open (MiB)", "rss_after_open_mib"),
        ["  RSS added by open, per member (bytes)"]
        + [fmt((r["rss_after_open_mib"] - r["rss_before_open_mib"]) * 2**20 / r["size"]) for r in results],
        row("RSS growth during the timed ops (MiB)", "rss_growth_ops_mib"),
    ]
    title = (f"JSON backend: Python {info['python']}, orjson {info['orjson']}, {info['cpus']} cpus, data in "
             f"{info['data_dir']} ({info['time']}, load average {info.get('loadavg_1m', '?')} at start)")
    print_table(heads, rows, title=title)
    judged = targets(results)
    print_table(["target", "value", "goal", "verdict", "per size"],
                [[t.name, fmt(t.value) if t.value is not None else "-", f"{t.op} {fmt(t.goal)}", t.verdict, text]
                 for t, text in judged], title="Targets (informational: ratios measured within one run)")
    return judged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="comma-separated member counts (default 1000,10000,100000)")
    parser.add_argument("--quick", action="store_true", help="1k and 10k only, shorter rounds")
    parser.add_argument("--dir", help="where to put the data (default: the system temp dir); the disk matters")
    parser.add_argument("--worker", nargs=4, metavar=("STEP", "SIZE", "ROOT", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        step, size, root, arg = args.worker
        steps = {"prepare": lambda: prepare(int(size), Path(root)),
                 "open": lambda: measure_open(int(size), Path(root), int(arg)),
                 "ops": lambda: measure_ops(int(size), Path(root), float(arg))}
        print(json.dumps(asyncio.run(steps[step]())))
        return 0

    if args.sizes:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    else:
        sizes = [1000, 10_000] if args.quick else [1000, 10_000, 100_000]
    if not sizes or min(sizes) < 1:
        parser.error("--sizes needs positive integers")
    scale = 0.5 if args.quick else 1.0

    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_json-", dir=args.dir) as tmp:
        info = machine_info(tmp)
        info["orjson"] = importlib.metadata.version("orjson")
        for size in sizes:
            root = Path(tmp) / label(size)
            root.mkdir()
            prepared = run_worker(__file__, ["prepare", str(size), str(root), "0"])
            opens = [run_worker(__file__, ["open", str(size), str(root), str(rep)]) for rep in range(OPEN_REPEATS)]
            ops = run_worker(__file__, ["ops", str(size), str(root), str(scale)])
            results.append({"size": size, **prepared, **summarize_opens(opens), **ops})
            shutil.rmtree(root)
    print(file=sys.stderr)
    judged = report(results, info)
    info["wall_s"] = time.perf_counter() - started
    path = write_results("json", {"machine": info, "sizes": sizes, "quick": args.quick, "results": results,
                                  "targets": [dict(t.as_dict(), per_size=text) for t, text in judged]})
    print(f"wrote {path} in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
