"""How fast are find / count with and without indexes, and how long do they hold the event loop, at 100k members?

Run it from the repository root::

    .venv/bin/python benchmarks/bench_queries.py                                   # JSON only
    .venv/bin/python benchmarks/bench_queries.py --dsn postgresql://postgres@127.0.0.1/postgres   # + PostgreSQL
    STORAGE_BENCH_DSN=postgresql://... .venv/bin/python benchmarks/bench_queries.py --members 10000
    .venv/bin/python benchmarks/bench_queries.py --baseline /path/to/old --rounds 3  # before/after, same run

``--baseline`` names another checkout of this repository (``git worktree add --detach /tmp/base <commit>``): each
round runs every backend's worker once on it and once on this checkout (the order alternating by round, the same
worker code importing the one or the other ``storage``), and the table shows both: warm ms as the median of the
rounds' warm medians, the longest stall as the worst over the rounds, and the result sizes, which must agree.

PostgreSQL runs in a schema of its own (``bench_queries_<pid>``, created and dropped by the benchmark), so any
database will do. Each backend runs in a fresh subprocess. ``--members`` seed-shaped members
(benchmarks/_common.py ``member_doc``, 1000 per guild) are written with ``put_many``, then ``user_id``,
``statistics.message_count`` and ``roles`` are indexed, and each query is timed: the first call (cold) and the
median of ``--repeats`` more (warm), with the longest event-loop stall over all its calls (a ticker task sleeping
1 ms records how late it wakes, over the calls) and the longest busy step (the CPU time the loop's thread used
between two wakes of the ticker: on a loaded machine the wall-time stall also counts other processes). Targets:
indexed equality and top-10 <= 2 ms; unindexed find <= 150 ms on JSON (done in SQL on PostgreSQL); no call stalls
the loop > 20 ms. They are printed as PASS/MISS for information; the script exits 0 either way. Results go to
``benchmarks/results/queries.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

from _common import (
    Target,
    checkouts,
    fmt,
    machine_info,
    member_doc,
    member_ids,
    print_table,
    rss_mib,
    run_worker,
    write_results,
)

INDEXED = ("user_id", "statistics.message_count", "roles")


def log(message: str) -> None:
    print(f"[queries] {message}", file=sys.stderr, flush=True)


def queries(members: int) -> dict[str, tuple[str, Callable[[Any], Awaitable[Any]]]]:
    """name -> (what it asks, the call)."""
    user, guild = member_ids(members // 2)
    return {
        "find by equality, indexed": (
            "user_id == one member's id (1 result)",
            lambda s: s.find("members", {"user_id": str(user)})),
        "top-10 by an indexed number": (
            "order_by=-statistics.message_count, limit=10",
            lambda s: s.find("members", order_by="-statistics.message_count", limit=10)),
        "guild top-10 by an indexed number": (
            "prefix=guild, order_by=-statistics.message_count, limit=10",
            lambda s: s.find("members", prefix=f"{guild}_", order_by="-statistics.message_count", limit=10)),
        "guild members with a role, indexed": (
            "roles contains role7, prefix=guild (about 25 of 1000)",
            lambda s: s.find("members", {"roles": "role7"}, prefix=f"{guild}_")),
        "find, unindexed": (
            "join_date in one day (string range, 1/84 of the members)",
            lambda s: s.find("members", {"join_date": {"$gte": "2024-03-03", "$lt": "2024-03-04"}})),
        "count, unindexed": (
            "preferences.language == ja (a quarter)",
            lambda s: s.count("members", {"preferences.language": "ja"})),
        "count, indexed range": (
            "statistics.message_count >= 90000 (a tenth)",
            lambda s: s.count("members", {"statistics.message_count": {"$gte": 90_000}})),
    }


def with_schema(dsn: str, schema: str) -> str:
    parts = urlsplit(dsn)
    extra = urlencode({"options": f"-csearch_path={schema}"})
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


class Ticker:
    """A task sleeping 1 ms in a loop, recording how late it wakes: a bot's heartbeat sharing the loop. Every gap
    that overlaps the measured calls counts, also one that a call holding the loop from start to end causes.

    ``longest`` is wall time, so on a shared machine it also counts the moments the OS ran another process
    instead of this one; ``longest_busy`` is the CPU time the loop's thread used between two wakes (a step of the
    call, a garbage collection), which the rest of the machine does not inflate."""

    def __init__(self) -> None:
        self.longest = self.longest_busy = 0.0
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while True:
            await asyncio.sleep(0.001)
            now, cpu = time.perf_counter(), time.thread_time()
            self.longest = max(self.longest, now - last - 0.001)
            self.longest_busy = max(self.longest_busy, cpu - last_cpu)
            last, last_cpu = now, cpu

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def time_calls(op: Callable[[], Awaitable[Any]], repeats: int) -> dict[str, Any]:
    times = []
    result: Any = None
    await asyncio.sleep(0.01)
    stalls = Ticker()
    await asyncio.sleep(0.005)  # the ticker's first turn
    cpu = []
    for _ in range(repeats + 1):
        started, started_cpu = time.perf_counter(), time.thread_time()
        result = await op()
        times.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
        await asyncio.sleep(0.002)  # the ticker sees the end of a call that held the loop
    await stalls.stop()
    size = len(result) if isinstance(result, list) else result
    return {"cold_ms": times[0] * 1000, "warm_ms": statistics.median(times[1:]) * 1000,
            "longest_stall_ms": stalls.longest * 1000, "longest_busy_ms": stalls.longest_busy * 1000,
            "warm_cpu_ms": statistics.median(cpu[1:]) * 1000, "result": size}


async def worker(backend: str, location: str, members: int, repeats: int) -> dict[str, Any]:
    import storage

    out: dict[str, Any] = {"backend": backend, "members": members, "storage": str(Path(storage.__file__).parent)}
    schema = None
    if backend == "postgres":
        import asyncpg

        schema = f"bench_queries_{os.getpid()}"
        conn = await asyncpg.connect(location)
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.close()
        store = await storage.open_store(backend="postgres", dsn=with_schema(location, schema))
    else:
        store = await storage.open_store(backend="json", path=location)
    try:
        started = time.perf_counter()
        batch = 10_000
        for start in range(0, members, batch):
            docs = {}
            for i in range(start, min(start + batch, members)):
                user, guild = member_ids(i)
                docs[f"{guild}_{user}"] = member_doc(i)
            await store.put_many("members", docs)
        out["load_s"] = time.perf_counter() - started
        log(f"{backend}: {members:,} members written in {out['load_s']:.1f} s")
        out["ensure_index_s"] = {}
        for path in INDEXED:
            started = time.perf_counter()
            await store.ensure_index("members", path)
            out["ensure_index_s"][path] = time.perf_counter() - started
        out["rss_mib"] = rss_mib()
        if backend == "json":  # the floor of an unindexed scan, same run: decoding every member once
            import orjson

            raws = [orjson.dumps(member_doc(i)) for i in range(members)]
            floor = []
            for _ in range(3):
                started = time.perf_counter()
                for raw in raws:
                    orjson.loads(raw)
                floor.append(time.perf_counter() - started)
            out["decode_all_ms"] = statistics.median(floor) * 1000
            del raws
        idle = Ticker()  # the baseline: how late the ticker wakes with nothing running (the machine's own noise)
        await asyncio.sleep(2.0)
        await idle.stop()
        out["idle_stall_ms"] = idle.longest * 1000
        out["queries"] = {}
        for name, (_what, call) in queries(members).items():
            out["queries"][name] = await time_calls(lambda call=call: call(store), repeats)
            log(f"{backend}: {name}: {out['queries'][name]}")
        if backend == "postgres":  # the unindexed find's plan: filtered by the server, rows sent = rows matched
            from storage.backends.postgres.query import build_find
            from storage.query import parse_query

            sql, params = build_find("members", parse_query({"join_date": {"$gte": "2024-03-03",
                                                                           "$lt": "2024-03-04"}}),
                                     frozenset(), store._now())
            plan = await store.pool.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *params)
            top = (plan if isinstance(plan, list) else __import__("json").loads(plan))[0]["Plan"]
            nodes, node = [], top
            while node is not None:
                nodes.append(f"{node['Node Type']} (rows {node.get('Actual Rows')})")
                node = (node.get("Plans") or [None])[0]
            out["unindexed_plan"] = " <- ".join(nodes)
            out["server_version"] = await store.pool.fetchval("SHOW server_version")
    finally:
        await store.close()
        if schema is not None:
            import asyncpg

            conn = await asyncpg.connect(location)
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One backend's runs (rounds) of one checkout as one: per query the median warm and cold ms, the worst stall."""
    out = dict(runs[0])
    out["queries"] = {}
    for name in runs[0]["queries"]:
        each = [run["queries"][name] for run in runs]
        results = {q["result"] for q in each}
        if len(results) != 1:
            raise RuntimeError(f"{name}: the rounds disagree on the result ({sorted(results)})")
        out["queries"][name] = {"warm_ms": statistics.median(q["warm_ms"] for q in each),
                                "cold_ms": statistics.median(q["cold_ms"] for q in each),
                                "longest_stall_ms": max(q["longest_stall_ms"] for q in each),
                                "longest_busy_ms": max(q["longest_busy_ms"] for q in each),
                                "warm_cpu_ms": statistics.median(q["warm_cpu_ms"] for q in each),
                                "result": each[0]["result"]}
    for figure in ("idle_stall_ms", "decode_all_ms"):
        if figure in out:
            out[figure] = statistics.median(run[figure] for run in runs)
    return out


def report(systems: dict[str, dict[str, dict[str, Any]]], members: int) -> list[Target]:
    """The table (both checkouts side by side when there is a baseline) and the targets, on this checkout."""
    results = systems["this"]
    base = systems.get("base")
    backends = list(results)
    described = queries(members)
    rows = []
    for name in described:
        for backend in backends:
            q = results[backend]["queries"][name]
            row = [name if backend == backends[0] else "", backend]
            if base is not None:
                b = base[backend]["queries"][name]
                if b["result"] != q["result"]:
                    raise RuntimeError(f"{backend}: {name}: baseline found {b['result']}, this {q['result']}")
                row += [fmt(b["warm_ms"]), fmt(q["warm_ms"]), f"{q['warm_ms'] / b['warm_ms']:.2f}x",
                        fmt(b["longest_stall_ms"]), fmt(q["longest_stall_ms"]), fmt(b["longest_busy_ms"]),
                        fmt(q["longest_busy_ms"])]
            else:
                row += [fmt(q["warm_ms"]), fmt(q["cold_ms"]), fmt(q["longest_stall_ms"]), fmt(q["longest_busy_ms"])]
            rows.append([*row, f"{q['result']:,}"])
    headers = (["query", "backend", "base warm ms", "this warm ms", "this/base", "base stall ms", "this stall ms",
                "base busy ms", "this busy ms", "result"] if base is not None else
               ["query", "backend", "warm ms", "cold ms", "longest stall ms", "longest busy ms", "result"])
    print_table(headers, rows, title=f"find / count over {members:,} members (warm: median of the repeats"
                                     + ("; medians of the rounds, stalls the worst round)" if base else ")"))
    if base is not None:  # CPU of the loop's thread per call: what the noisy wall times above are made of
        cpu_rows = []
        for name in described:
            for backend in backends:
                b, q = base[backend]["queries"][name]["warm_cpu_ms"], results[backend]["queries"][name]["warm_cpu_ms"]
                cpu_rows.append([name if backend == backends[0] else "", backend, fmt(b), fmt(q),
                                 f"{q / b:.2f}x" if b else ""])
        print()
        print_table(["query", "backend", "base cpu ms", "this cpu ms", "this/base"], cpu_rows,
                    title="the same calls in CPU time of the loop's thread (warm; medians of the rounds): not "
                          "inflated by other processes (PostgreSQL: the client's share only)")
        print()
    for name, (what, _call) in described.items():
        print(f"  {name}: {what}")
    print("  stall: the longest lateness of a 1 ms ticker sharing the loop (wall time: it also counts the OS running "
          "other processes); busy: the longest CPU time of the loop's thread between two ticks")
    for label, sys_results in systems.items():
        print(f"  {label}: storage from {', '.join(sorted({r['storage'] for r in sys_results.values()}))}")
    print("  longest ticker lateness over 2 s of an idle loop (the machine's noise, same run): " +
          ", ".join(f"{b} {fmt(results[b]['idle_stall_ms'])} ms" for b in backends))
    if "json" in results:
        print(f"  json, the floor of an unindexed scan (orjson.loads of every member, same run): "
              f"{fmt(results['json']['decode_all_ms'])} ms")
    if "postgres" in results:
        print(f"  postgres, unindexed find's plan: {results['postgres']['unindexed_plan']}")
    print()
    index_rows = [[path] + [fmt(results[b]["ensure_index_s"][path]) for b in backends] for path in INDEXED]
    print_table(["ensure_index (s)", *backends], index_rows)
    targets = []
    for backend in backends:
        q = results[backend]["queries"]
        targets += [
            Target(f"{backend}: indexed equality", q["find by equality, indexed"]["warm_ms"], "<=", 2, "ms"),
            Target(f"{backend}: indexed top-10", q["top-10 by an indexed number"]["warm_ms"], "<=", 2, "ms"),
            Target(f"{backend}: longest stall of any call", max(v["longest_stall_ms"] for v in q.values()),
                   "<=", 20, "ms"),
            Target(f"{backend}: longest busy step of any call (CPU)", max(v["longest_busy_ms"] for v in q.values()),
                   "<=", 20, "ms"),
        ]
        if backend == "json":
            targets.append(Target("json: unindexed find", q["find, unindexed"]["warm_ms"], "<=", 150, "ms"))
    print_table(["target", "value", "goal", "verdict"],
                [[t.name, f"{fmt(t.value)} {t.unit}", f"{t.op} {fmt(t.goal)} {t.unit}", t.verdict] for t in targets])
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=100_000, help="members to write (default 100k)")
    parser.add_argument("--repeats", type=int, default=9, help="warm calls per query (default 9)")
    parser.add_argument("--dir", help="where the JSON store goes (default: the system temp dir)")
    parser.add_argument("--dsn", default=os.environ.get("STORAGE_BENCH_DSN"),
                        help="a PostgreSQL database to benchmark too (default $STORAGE_BENCH_DSN)")
    parser.add_argument("--backends", default=None, help="comma-separated subset of json,postgres")
    parser.add_argument("--baseline", help="another checkout of this repository, run interleaved (before/after)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each backend per checkout (default 1)")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "LOCATION"), help=argparse.SUPPRESS)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.checkout:
            sys.path.insert(0, args.checkout)  # before this checkout (sys.path[1]) and any installed copy
        backend, location = args.worker
        if location == "-":
            location = os.environ["STORAGE_BENCH_DSN"]
        result = asyncio.run(worker(backend, location, args.members, args.repeats))
        import json

        print(json.dumps(result))
        return 0

    backends = args.backends.split(",") if args.backends else ["json"] + (["postgres"] if args.dsn else [])
    if "postgres" in backends and not args.dsn:
        parser.error("--backends postgres needs --dsn or STORAGE_BENCH_DSN")
    checked_out = checkouts(parser, __file__, args.baseline)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {b: [] for b in backends} for name in checked_out}
    for round_ in range(args.rounds):
        for backend in backends:
            order = list(checked_out) if round_ % 2 == 0 else list(reversed(checked_out))
            for name in order:
                log(f"round {round_ + 1}/{args.rounds}: {backend} on {name}")
                common = ["--members", str(args.members), "--repeats", str(args.repeats),
                          "--checkout", checked_out[name]]
                if backend == "json":
                    folder = Path(tempfile.mkdtemp(prefix="bench-queries-", dir=args.dir))
                    try:
                        runs[name][backend].append(
                            run_worker(__file__, ["json", str(folder / "data"), *common], timeout=3600))
                    finally:
                        shutil.rmtree(folder, ignore_errors=True)
                else:
                    os.environ["STORAGE_BENCH_DSN"] = args.dsn  # to the worker through its environment, not argv
                    runs[name][backend].append(run_worker(__file__, ["postgres", "-", *common], timeout=3600))
    systems = {name: {b: summarize(rs) for b, rs in by_backend.items()} for name, by_backend in runs.items()}
    targets = report(systems, args.members)
    path = write_results("queries", {"machine": machine_info(args.dir), "checkouts": checked_out,
                                     "rounds": args.rounds, "results": systems["this"],
                                     "baseline": systems.get("base"), "runs": runs,
                                     "targets": [t.as_dict() for t in targets]})
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
