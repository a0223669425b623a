"""How fast are message analytics: bulk ingest, every query, point updates, prune, on 1M messages?

Run it from the repository root::

    .venv/bin/python benchmarks/bench_analytics.py                       # JSON, 1M messages over 10 guilds
    .venv/bin/python benchmarks/bench_analytics.py --messages 100000     # scaled down
    .venv/bin/python benchmarks/bench_analytics.py --dsn postgresql://postgres@127.0.0.1/bench   # + PostgreSQL
    STORAGE_BENCH_DSN=postgresql://... .venv/bin/python benchmarks/bench_analytics.py

The PostgreSQL database must be a scratch one: the benchmark refuses to start when it already holds messages
(``--clear`` deletes them first) and deletes what it wrote at the end.

Each backend runs in a fresh subprocess (its own peak memory). Messages are seed-shaped records with Discord-like
ids, spread evenly over ``--months`` months and ``--guilds`` guilds (50 channels and 2000 authors each), recorded
with ``record_messages`` in batches of ``--batch`` (only the ``record_messages`` calls are timed, not making the
records). Then, for one guild (a tenth of the messages by default), every query is timed over all its messages and
over its last 30 days: the first call (cold: the JSON backend builds its column cache then) and the median of
three more. Also: re-sending a batch of duplicates, ``record_message`` and ``update_message`` one at a time,
``refresh_member_statistics``, the longest the event loop stalled during an ingest call (a bot's gateway
heartbeat and replies share that loop), reopening the store (the JSON id index is built on the first write after
opening), and pruning the oldest month. Targets are printed as PASS/MISS for information; the script exits 0 either way.
Results go to ``benchmarks/results/analytics.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

from _common import Target, fmt, machine_info, peak_rss_mib, print_table, rss_mib, run_worker, write_results

DISCORD_EPOCH_MS = 1_420_070_400_000
GUILD_BASE = 900_000_000_000_000_000
CHANNELS_PER_GUILD = 50
AUTHORS_PER_GUILD = 2000
TOPICS = ("gaming", "music", "art", "programming", "memes", "news", "anime", "sports", "movies", "food", "help",
          "offtopic")
SENTIMENTS = ("positive", "neutral", "negative")
END = datetime(2026, 1, 1, tzinfo=timezone.utc)
QUERY_REPEATS = 3


def log(message: str) -> None:
    print(f"[analytics] {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------------------------
# data
class Stream:
    """The benchmark's messages, made on demand in time order (deterministic)."""

    def __init__(self, total: int, guilds: int, months: int) -> None:
        self.total, self.guilds = total, guilds
        self.start = END - timedelta(days=30 * months)
        self.step = (END - self.start) / max(total, 1)
        self.rnd = random.Random(1234)

    def guild(self, g: int) -> str:
        return str(GUILD_BASE + g)

    def record(self, i: int) -> dict[str, Any]:
        rnd = self.rnd
        g = i % self.guilds
        when = self.start + self.step * i
        ms = int(when.timestamp() * 1000)
        analysis: dict[str, Any] = {"topics": rnd.sample(TOPICS, rnd.randrange(0, 3))}
        if rnd.random() < 0.95:
            analysis["sentiment"] = rnd.choice(SENTIMENTS)
        return {
            "message_id": str(((ms - DISCORD_EPOCH_MS) << 22) | (i & 0x3FFFFF)),
            "channel_id": str(GUILD_BASE + 10_000 + g * 100 + rnd.randrange(CHANNELS_PER_GUILD)),
            "author_id": str(GUILD_BASE + 1_000_000 + g * 10_000 + rnd.randrange(AUTHORS_PER_GUILD)),
            "guild_id": self.guild(g),
            "timestamp": when.isoformat().replace("+00:00", "Z"),
            "content_length": rnd.randrange(1, 400),
            "attachments": int(rnd.random() < 0.1),
            "reactions": rnd.randrange(0, 5),
            "analysis": analysis,
        }

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, self.total, size):
            yield [self.record(i) for i in range(start, min(start + size, self.total))]


# -------------------------------------------------------------------------------------------------------------------
# measuring (in the worker process)
class StallWatch:
    """The longest the event loop went without running a 1 ms timer, counting only gaps inside watched calls.

    A bot's heartbeat and command replies run on the loop that calls ``record_messages``: work done on the loop, or
    a worker thread holding the GIL (a full garbage collection included), delays them all. Gaps that begin before a
    call (this script making the next batch) or end after it are not counted.
    """

    def __init__(self) -> None:
        self.longest = 0.0
        self._since, self._until = float("inf"), float("inf")
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            if self._since <= last and now <= self._until:
                self.longest = max(self.longest, now - last)
            last = now

    async def watch(self, op: Callable[[], Awaitable[Any]]) -> Any:
        if self._task is None:
            self._task = asyncio.create_task(self._tick())
            await asyncio.sleep(0.002)  # let the first tick set its clock
        self._since, self._until = time.perf_counter(), float("inf")
        try:
            return await op()
        finally:
            self._until = time.perf_counter()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def timed_once(op: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await op()
    return time.perf_counter() - started, result


async def time_query(op: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    cold, _ = await timed_once(op)
    warm = [(await timed_once(op))[0] for _ in range(QUERY_REPEATS)]
    return {"cold_ms": cold * 1000, "warm_ms": statistics.median(warm) * 1000}


async def clear_members(store: Any, stream: Stream) -> None:
    """Delete the member documents of the benchmark's guilds (PostgreSQL, through the pool escape hatch)."""
    for g in range(stream.guilds):
        await store.pool.execute("DELETE FROM storage_documents WHERE collection = 'members' AND key LIKE $1",
                                 stream.guild(g) + "\\_%")


async def open_bench_store(backend: str, location: str) -> Any:
    import storage

    if backend == "json":
        return await storage.open_store(backend="json", path=location)
    return await storage.open_store(backend="postgres", dsn=location)


async def worker(backend: str, total: int, guilds: int, batch: int, months: int, location: str,
                 clear: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": backend, "messages": total, "guilds": guilds, "batch": batch}
    stream = Stream(total, guilds, months)
    store = await open_bench_store(backend, location)
    try:
        async for _ in store.scan_messages(None, None, None):
            if not clear:
                raise SystemExit(f"{backend}: the store already holds messages; use a scratch database or --clear")
            await store.prune_messages(END + timedelta(days=3650))
            break
        if backend == "postgres":  # members of an earlier run would make refresh_member_statistics a no-op
            await clear_members(store, stream)
            # Recorded with the figures: a server's settings can explain a cold query that another server does not
            # show (a checkpoint forced by max_wal_size mid-query, say). Autovacuum off did not matter here: one
            # guild's queries over 1M messages took 17-35 ms before and after a VACUUM (ANALYZE) (2026-11-25).
            out["server"] = {setting: await store.pool.fetchval(f"SHOW {setting}")
                             for setting in ("server_version", "autovacuum", "max_wal_size")}
        out["rss_open_mib"] = rss_mib()

        # ingest ------------------------------------------------------------------------------------------------
        spent, done, last_batch = 0.0, 0, []
        stalls = StallWatch()
        for records in stream.batches(batch):
            seconds, new = await timed_once(lambda records=records: stalls.watch(
                lambda: store.record_messages(records)))
            spent += seconds
            done += new
            last_batch = records
            if (done // batch) % 20 == 0:
                log(f"{backend}: {done:,} messages, {done / spent:,.0f}/s")
        stalls.stop()
        assert done == total, (done, total)
        out["ingest_rows_per_s"] = total / spent
        out["ingest_longest_stall_ms"] = stalls.longest * 1000
        out["rss_after_ingest_mib"] = rss_mib()
        seconds, new = await timed_once(lambda: store.record_messages(last_batch))
        assert new == 0
        out["duplicates_rows_per_s"] = len(last_batch) / seconds

        # queries -----------------------------------------------------------------------------------------------
        guild = stream.guild(0)
        since = END - timedelta(days=30)
        author = stream.record(0)["author_id"]  # not a query: the first query below must find the cache cold
        queries: dict[str, Callable[[], Awaitable[Any]]] = {
            "message_counts": lambda: store.message_counts(guild),
            "message_counts by channel": lambda: store.message_counts(guild, by="channel"),
            "message_counts by author": lambda: store.message_counts(guild, by="author"),
            "message_counts by day": lambda: store.message_counts(guild, by="day"),
            "top_authors": lambda: store.top_authors(guild),
            "top_channels": lambda: store.top_channels(guild),
            "top_topics": lambda: store.top_topics(guild),
            "sentiment_breakdown": lambda: store.sentiment_breakdown(guild),
            "last_activity": lambda: store.last_activity(guild, author),
            "top_authors, last 30 days": lambda: store.top_authors(guild, since=since),
            "message_counts by day, last 30 days": lambda: store.message_counts(guild, by="day", since=since),
        }
        out["queries"] = {}
        for name, op in queries.items():
            out["queries"][name] = await time_query(op)
            log(f"{backend}: {name}: {out['queries'][name]}")
        out["guild_messages"] = await store.message_counts(guild)
        out["rss_after_queries_mib"] = rss_mib()

        # point operations --------------------------------------------------------------------------------------
        extra = Stream(200, guilds, 1)
        singles = [dict(extra.record(i), message_id=str(10**19 + i)) for i in range(200)]
        seconds = 0.0
        for record in singles:
            seconds += (await timed_once(lambda record=record: store.record_message(record)))[0]
        out["record_message_ms"] = seconds / len(singles) * 1000
        ids = [r["message_id"] for r in last_batch[:200]]
        seconds = 0.0
        for n, mid in enumerate(ids):
            seconds += (await timed_once(lambda mid=mid, n=n: store.update_message(mid, {"reactions": n})))[0]
        out["update_message_ms"] = seconds / len(ids) * 1000
        seconds, written = await timed_once(lambda: store.refresh_member_statistics(guild))
        out["refresh_member_statistics_s"] = seconds
        out["members_written"] = written
    finally:
        await store.close()

    # reopening: what a restarted bot pays ------------------------------------------------------------------------
    rss_before = rss_mib()
    started = time.perf_counter()
    store = await open_bench_store(backend, location)
    out["reopen_s"] = time.perf_counter() - started
    try:
        record = dict(Stream(1, guilds, 1).record(0), message_id=str(10**19 + 999))
        out["first_write_after_open_s"], _ = await timed_once(lambda: store.record_message(record))
        out["rss_index_mib"] = rss_mib() - rss_before
        out["first_query_after_open_s"], _ = await timed_once(lambda: store.top_authors(stream.guild(1)))
        oldest_month_end = stream.start + timedelta(days=30)
        out["prune_s"], out["pruned"] = await timed_once(lambda: store.prune_messages(oldest_month_end))
        if backend == "postgres":  # leave the scratch database as we found it
            await store.prune_messages(END + timedelta(days=3650))
            await clear_members(store, stream)
    finally:
        await store.close()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# -------------------------------------------------------------------------------------------------------------------
# the report (in the parent process)
def report(results: dict[str, dict[str, Any]]) -> list[Target]:
    backends = list(results)
    goals = {"json": (100_000, 1000.0), "postgres": (100_000, 100.0)}
    rows: list[list[str]] = []
    targets: list[Target] = []

    def row(name: str, values: list[float | None], unit: str = "", digits: int = 3) -> None:
        rows.append([name, *(fmt(v, digits) + (f" {unit}" if v is not None and unit else "") for v in values)])

    row("ingest record_messages (rows/s)", [results[b]["ingest_rows_per_s"] for b in backends])
    row("re-sent duplicates (rows/s)", [results[b]["duplicates_rows_per_s"] for b in backends])
    query_names = list(next(iter(results.values()))["queries"])
    for name in query_names:
        row(f"{name}: cold", [results[b]["queries"][name]["cold_ms"] for b in backends], "ms")
        row(f"{name}: warm", [results[b]["queries"][name]["warm_ms"] for b in backends], "ms")
    row("longest event-loop stall in an ingest call", [results[b]["ingest_longest_stall_ms"] for b in backends], "ms")
    row("record_message, one at a time", [results[b]["record_message_ms"] for b in backends], "ms")
    row("update_message, one at a time", [results[b]["update_message_ms"] for b in backends], "ms")
    row("refresh_member_statistics (1 guild)", [results[b]["refresh_member_statistics_s"] for b in backends], "s")
    row("reopen the store", [results[b]["reopen_s"] for b in backends], "s")
    row("first write after reopening", [results[b]["first_write_after_open_s"] for b in backends], "s")
    row("first query after reopening", [results[b]["first_query_after_open_s"] for b in backends], "s")
    row("prune the oldest month", [results[b]["prune_s"] for b in backends], "s")
    row("memory: after ingest (RSS)", [results[b]["rss_after_ingest_mib"] for b in backends], "MiB")
    row("memory: after queries (RSS)", [results[b]["rss_after_queries_mib"] for b in backends], "MiB")
    row("memory: first write after reopen", [results[b]["rss_index_mib"] for b in backends], "MiB")
    row("memory: peak (RSS)", [results[b]["peak_rss_mib"] for b in backends], "MiB")
    first = results[backends[0]]
    print_table(["", *backends], rows, title=f"Message analytics: {first['messages']:,} messages, {first['guilds']} "
                f"guilds; queries over one guild ({first['guild_messages']:,} messages); batches of "
                f"{first['batch']:,}")
    for b in backends:
        if "server" in results[b]:
            print(f"{b} server: " + ", ".join(f"{k} {v}" for k, v in results[b]["server"].items()))
    for b in backends:
        ingest_goal, query_goal = goals[b]
        targets.append(Target(f"{b}: ingest rows/s", results[b]["ingest_rows_per_s"], ">=", ingest_goal))
        slowest = max(q["warm_ms"] for q in results[b]["queries"].values())
        targets.append(Target(f"{b}: slowest warm query (ms)", slowest, "<=", query_goal))
        slowest_cold = max(q["cold_ms"] for q in results[b]["queries"].values())
        targets.append(Target(f"{b}: slowest cold query (ms)", slowest_cold, "<=", query_goal))
    print_table(["target", "value", "goal", "verdict"],
                [[t.name, fmt(t.value), f"{t.op} {fmt(t.goal)}", t.verdict] for t in targets])
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages to record (default 1M)")
    parser.add_argument("--guilds", type=int, default=10, help="guilds they are spread over (default 10)")
    parser.add_argument("--batch", type=int, default=10_000, help="records per record_messages call")
    parser.add_argument("--months", type=int, default=12, help="months the messages span (default 12)")
    parser.add_argument("--dir", help="where the JSON store goes (default: the system temp dir); the disk matters")
    parser.add_argument("--dsn", default=os.environ.get("STORAGE_BENCH_DSN"),
                        help="a scratch PostgreSQL database to benchmark too (default $STORAGE_BENCH_DSN)")
    parser.add_argument("--backends", default=None, help="comma-separated subset of json,postgres")
    parser.add_argument("--clear", action="store_true", help="delete the messages a scratch database holds first")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "LOCATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        backend, location = args.worker
        if location == "-":
            location = os.environ["STORAGE_BENCH_DSN"]
        result = asyncio.run(worker(backend, args.messages, args.guilds, args.batch, args.months, location,
                                    args.clear))
        import json

        print(json.dumps(result))
        return 0

    backends = args.backends.split(",") if args.backends else ["json"] + (["postgres"] if args.dsn else [])
    if "postgres" in backends:
        try:
            import storage.backends.postgres.store  # noqa: F401
        except ImportError:
            log("the PostgreSQL backend is not available in this checkout: skipping it")
            backends.remove("postgres")
        if not args.dsn and "postgres" in backends:
            parser.error("--backends postgres needs --dsn or STORAGE_BENCH_DSN")
    common = ["--messages", str(args.messages), "--guilds", str(args.guilds), "--batch", str(args.batch),
              "--months", str(args.months)] + (["--clear"] if args.clear else [])
    results: dict[str, dict[str, Any]] = {}
    for backend in backends:
        if backend == "json":
            folder = Path(tempfile.mkdtemp(prefix="bench-analytics-", dir=args.dir))
            try:
                results[backend] = run_worker(__file__, ["json", str(folder / "data"), *common], timeout=3600)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        else:
            os.environ["STORAGE_BENCH_DSN"] = args.dsn  # to the worker through its environment, not its argv
            results[backend] = run_worker(__file__, ["postgres", "-", *common], timeout=3600)
    targets = report(results)
    path = write_results("analytics", {"machine": machine_info(args.dir), "results": results,
                                       "targets": [t.as_dict() for t in targets]})
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
