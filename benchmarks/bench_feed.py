"""The change feed and the coherent cache (issue 16): what they give and what they cost, in one run.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_feed.py            # about a minute
    .venv/bin/python benchmarks/bench_feed.py --quick    # shorter rounds

It creates a throwaway database on the server of ``--admin-dsn`` (default: ``STORAGE_BENCH_DSN``, else
``STORAGE_TEST_DSN``, else the local server) and a JSON store in a temporary folder, and measures:

* **get**: ``get_member_data`` of one member through the coherent cache, the same with the cache off
  (``STORAGE_CACHE=off``: a round trip per call), and raw asyncpg ``fetchval`` of the same row on a dedicated
  connection (the fastest a round trip goes), in alternating rounds; medians.
* **delivery delay**: a writer *process* puts documents stamped with ``time.monotonic()`` (one clock for every
  process on Linux) every few milliseconds; this process watches and records how long after the put returned each
  change reached it. p50 and p99, on both backends.
* **save cost**: ``save_member_data`` awaited one after the other, in alternating rounds. PostgreSQL: today's
  statement (the plain upsert, patched in for the baseline rounds) against the notifying one, first with nobody
  listening, then with a watcher in another process. JSON: nobody watching against a watcher in another process
  (its journal poll) and one in this process (every commit published to its queue).

Targets, printed as PASS/MISS for information (the script exits 0 either way): cached get >= 20x raw asyncpg,
delivery p99 <= 50 ms, a save <= 1.1x its cost without watchers. Results go to ``benchmarks/results/feed.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

import asyncpg
from _common import Target, atimed, fmt, machine_info, member_doc, member_ids, print_table, write_results

import storage
from storage import StoreConfig
from storage.backends.postgres import documents as pg_documents
from storage.backends.postgres import notify as pg_notify

ROOT = Path(__file__).resolve().parent.parent


# -- child processes --------------------------------------------------------------------------------------------------
def _spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


async def writer(config: StoreConfig, count: int, interval: float) -> None:
    """Put ``count`` stamped documents, ``interval`` seconds apart (the stamp is taken when the put returned: the
    delay measured is the feed's, not the commit's)."""
    store = await storage.open_store(config=config)
    try:
        for i in range(count):
            await store.put("feed", f"k{i % 50}", {"i": i})
            await store.put("stamps", "last", {"i": i, "t": time.monotonic()})
            await asyncio.sleep(interval)
    finally:
        await store.close()


async def watcher(config: StoreConfig) -> None:
    """Watch everything (and drain it) until stdin closes: a watcher in another process."""
    store = await storage.open_store(config=config)
    try:
        watch = await store.watch().ready()

        async def drain() -> None:
            async for _change in watch:
                pass

        task = asyncio.create_task(drain())
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        task.cancel()
    finally:
        await store.close()


# -- measurements -----------------------------------------------------------------------------------------------------
async def rounds(ops: dict[str, Callable[[int], Awaitable[object]]], seconds: float, count: int) -> dict[str, float]:
    """Median microseconds per call of each op, measured in alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(count):
        for name, op in ops.items():
            rate = await atimed(op, seconds=seconds, min_ops=20)
            samples[name].append(rate.ms_per_op * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


async def paired(ops: dict[str, Callable[[int], Awaitable[object]]], seconds: float) -> dict[str, float]:
    """Median microseconds per call of each op, the ops called in turn, one call each, in alternating order (so
    that a neighbour's burst of I/O, which moves fsync-bound saves by 2x here, hits every op alike)."""
    samples: dict[str, list[float]] = {name: [] for name in ops}
    clock = time.perf_counter
    deadline = clock() + seconds
    i = 0
    names = list(ops)
    while clock() < deadline or i < 20:
        for name in names if i % 2 else names[::-1]:  # each op first half of the time: no order effect
            op = ops[name]
            start = clock()
            await op(i)
            samples[name].append((clock() - start) * 1e6)
        i += 1
    return {name: statistics.median(values) for name, values in samples.items()}


async def delivery(config: StoreConfig, count: int) -> dict[str, float]:
    """p50/p99 milliseconds from a put returning in a writer process to its change reaching this process."""
    store = await storage.open_store(config=config)
    delays: list[float] = []
    try:
        watch = await store.watch("stamps").ready()
        proc = _spawn("--writer", json.dumps(dataclasses.asdict(config)), str(count), "0.004")
        assert proc.stdin is not None
        proc.stdin.close()
        while len(delays) < count:
            change = await asyncio.wait_for(watch.__anext__(), 60)
            if change.op == "put" and change.doc is not None:
                delays.append((time.monotonic() - change.doc["t"]) * 1000)
        await asyncio.get_running_loop().run_in_executor(None, proc.wait)
    finally:
        await store.close()
    delays.sort()
    return {"p50_ms": delays[len(delays) // 2], "p99_ms": delays[int(len(delays) * 0.99) - 1],
            "max_ms": delays[-1], "n": len(delays)}


class OtherWatcher:
    """A watcher process for the duration of a ``with`` block."""

    def __init__(self, config: StoreConfig) -> None:
        self.proc = _spawn("--watcher", json.dumps(dataclasses.asdict(config)))

    async def __aenter__(self) -> OtherWatcher:
        assert self.proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)
        assert line.strip() == "READY", line
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)


async def postgres(dsn: str, seconds: float, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = StoreConfig(backend="postgres", dsn=dsn, source="bench")
    cached = await storage.open_store(config=base)
    plain = await storage.open_store(config=dataclasses.replace(base, cache="off"))
    # the same without waiting for the WAL flush: the feed's own CPU cost, without the disk's noise (a shared disk
    # moves an fsync-bound save by +-30% from one second to the next here)
    nosync = await storage.open_store(config=dataclasses.replace(base, cache="off", dsn=_with_option(
        dsn, "-csynchronous_commit=off")))
    raw = await asyncpg.connect(dsn)
    try:
        user, guild = member_ids(1)
        await cached.save_member_data(user, guild, member_doc(1))
        key = f"{guild}_{user}"
        query = "SELECT doc::text FROM storage_documents WHERE collection = $1 AND key = $2"
        await raw.fetchval(query, "members", key)

        async def get_cached(_i: int) -> object:
            return await cached.get_member_data(user, guild)

        async def get_plain(_i: int) -> object:
            return await plain.get_member_data(user, guild)

        async def get_raw(_i: int) -> object:
            return await raw.fetchval(query, "members", key)

        out["get_us"] = await rounds({"coherent cache": get_cached, "cache off": get_plain,
                                      "raw asyncpg fetchval": get_raw}, seconds, count)
        out["cache_hits"] = cached._coherent.hits if cached._coherent is not None else 0
        await cached.close()
        out["delivery"] = await delivery(base, 300)

        notifying = pg_notify.put

        async def today(conn: Any, _channel: str, collection: str, items: Any, expires: Any = None) -> None:
            await pg_documents.put(conn, collection, items, expires)

        def saves(store: Any) -> dict[str, Callable[[int], Awaitable[object]]]:
            async def save(i: int) -> object:
                u, g = member_ids(i % 1000)
                return await store.save_member_data(u, g, member_doc(i % 1000, i))

            async def save_today(i: int) -> object:
                pg_notify.put = today  # type: ignore[assignment]
                try:
                    return await save(i)
                finally:
                    pg_notify.put = notifying

            return {"today (no notify)": save_today, "notify": save}

        out["save_us_nobody_listening"] = await paired(saves(plain), seconds * count)
        out["save_us_nobody_listening_nosync"] = await paired(saves(nosync), seconds * count)
        async with OtherWatcher(base):
            out["save_us_watcher_elsewhere"] = await paired(saves(plain), seconds * count)
            out["save_us_watcher_elsewhere_nosync"] = await paired(saves(nosync), seconds * count)
    finally:
        await plain.close()
        await nosync.close()
        await cached.close()
        await raw.close()
    return out


async def json_backend(folder: str, seconds: float, count: int, *, deliveries: int = 300) -> dict[str, Any]:
    out: dict[str, Any] = {}
    config = StoreConfig(backend="json", path=folder, source="bench")
    store = await storage.open_store(config=config)
    try:
        await store.put("warm", "k", {})
        if deliveries:
            out["delivery"] = await delivery(config, deliveries)

        async def save(i: int) -> object:
            u, g = member_ids(i % 1000)
            return await store.save_member_data(u, g, member_doc(i % 1000, i))

        # Alternating rounds: nobody watching and a watcher in this process (subscribed and drained for its round);
        # then, against a baseline of their own, a watcher in another process running or stopped (SIGSTOP: a
        # stopped watcher costs the writer nothing, since a JSON writer never knows who watches).
        samples: dict[str, list[float]] = {"nobody watching": [], "watcher in this process": [],
                                           "another process's watcher stopped": [], "watcher in another process": []}
        for _ in range(count):
            samples["nobody watching"].append((await paired({"s": save}, seconds))["s"])
            watch = await store.watch().ready()
            task = asyncio.create_task(_drain(watch))
            samples["watcher in this process"].append((await paired({"s": save}, seconds))["s"])
            task.cancel()
            await watch.aclose()
        async with OtherWatcher(config) as other:
            for _ in range(count):
                os.kill(other.proc.pid, signal.SIGSTOP)
                samples["another process's watcher stopped"].append((await paired({"s": save}, seconds))["s"])
                os.kill(other.proc.pid, signal.SIGCONT)
                samples["watcher in another process"].append((await paired({"s": save}, seconds))["s"])
        out["save_us"] = {name: statistics.median(values) for name, values in samples.items()}
    finally:
        await store.close()
    return out


async def _drain(watch: storage.Watch) -> None:
    async for _change in watch:
        pass


def _with_option(dsn: str, option: str) -> str:
    parts = urlsplit(dsn)
    query = "&".join(p for p in (parts.query, "options=" + quote(option, safe="")) if p)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(name, safe=""), parts.query, parts.fragment))


async def run(admin_dsn: str, seconds: float, count: int) -> dict[str, Any]:
    admin = await asyncpg.connect(admin_dsn)
    name = f"storage_bench_feed_{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
        try:
            pg = await postgres(_with_database(admin_dsn, name), seconds, count)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as folder:
        js = await json_backend(folder, seconds, count)
    if os.path.isdir("/dev/shm"):  # no fsync: what the feed adds to the commit path itself, without the disk's noise
        with tempfile.TemporaryDirectory(prefix="bench-feed-", dir="/dev/shm") as folder:
            js["memory_fs"] = await json_backend(folder, seconds, count, deliveries=0)
    return {"postgres": pg, "json": js}


def report(results: dict[str, Any]) -> list[Target]:
    pg, js = results["postgres"], results["json"]
    get = pg["get_us"]
    print_table(["PostgreSQL get_member_data", "us/call", "x raw asyncpg"],
                [[name, fmt(us), fmt(get["raw asyncpg fetchval"] / us)] for name, us in get.items()],
                title="Reads of one member (medians of alternating rounds)")
    rows = []
    for backend, res in (("postgres", pg), ("json", js)):
        d = res["delivery"]
        rows.append([backend, fmt(d["p50_ms"]), fmt(d["p99_ms"]), fmt(d["max_ms"]), d["n"]])
    print_table(["backend", "p50 ms", "p99 ms", "max ms", "changes"], rows,
                title="Delivery delay of a change to a watcher in another process")
    saves = []
    ratio = {}
    for suffix, what in (("", ""), ("_nosync", ", synchronous_commit=off")):
        for phase, label in (("nobody_listening", "nobody listening"), ("watcher_elsewhere", "watcher elsewhere")):
            res = pg[f"save_us_{phase}{suffix}"]
            base = res["today (no notify)"]
            ratio[phase + suffix] = res["notify"] / base
            saves += [[f"postgres{what}, {label}: {name}", fmt(us), fmt(us / base)] for name, us in res.items()]
    mem = js.get("memory_fs")
    for label, res in (("json", js), ("json in /dev/shm (no fsync)", mem)):
        if res is None:
            continue
        us = res["save_us"]
        nobody, stopped = us["nobody watching"], us["another process's watcher stopped"]
        saves += [[f"{label}: {name}", fmt(value), fmt(value / (stopped if "another" in name else nobody))]
                  for name, value in us.items()]
    print_table(["save_member_data", "us/call", "x without"], saves, title="What the feed adds to a save")
    return [
        Target("cached get vs raw asyncpg fetchval", get["raw asyncpg fetchval"] / get["coherent cache"], ">=", 20,
               "x"),
        Target("postgres delivery p99", pg["delivery"]["p99_ms"], "<=", 50, "ms"),
        Target("json delivery p99", js["delivery"]["p99_ms"], "<=", 50, "ms"),
        Target("postgres save, nobody listening", ratio["nobody_listening"], "<=", 1.1, "x"),
        Target("postgres save, a watcher elsewhere", ratio["watcher_elsewhere"], "<=", 1.1, "x"),
        Target("postgres save, nobody listening, async commit", ratio["nobody_listening_nosync"], "<=", 1.1, "x"),
        Target("postgres save, a watcher elsewhere, async commit", ratio["watcher_elsewhere_nosync"], "<=", 1.1,
               "x"),
        Target("json save, a watcher elsewhere", js["save_us"]["watcher in another process"]
               / js["save_us"]["another process's watcher stopped"], "<=", 1.1, "x"),
        Target("json save, a watcher here", js["save_us"]["watcher in this process"]
               / js["save_us"]["nobody watching"], "<=", 1.1, "x"),
        *([Target("json save in /dev/shm, a watcher here",
                  mem["save_us"]["watcher in this process"] / mem["save_us"]["nobody watching"], "<=", 1.1, "x")]
          if mem is not None else []),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--writer":
        asyncio.run(writer(StoreConfig(**json.loads(argv[1])), int(argv[2]), float(argv[3])))
        return 0
    if argv and argv[0] == "--watcher":
        asyncio.run(watcher(StoreConfig(**json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = (os.environ.get("STORAGE_BENCH_DSN") or os.environ.get("STORAGE_TEST_DSN")
               or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--admin-dsn", default=default,
                        help="a server where the script may create (and drop) a database (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    info = machine_info()
    info["asyncpg"] = importlib.metadata.version("asyncpg")
    results = asyncio.run(run(args.admin_dsn, 0.3 if args.quick else 0.6, 5 if args.quick else 9))
    judged = report(results)
    print_table(["target", "value", "goal", "verdict"],
                [[t.name, fmt(t.value) + t.unit, f"{t.op} {fmt(t.goal)}{t.unit}", t.verdict] for t in judged])
    info["wall_s"] = time.perf_counter() - started
    path = write_results("feed", {"machine": info, "quick": args.quick, "results": results,
                                  "targets": [t.as_dict() for t in judged]})
    print(f"wrote {path} in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
