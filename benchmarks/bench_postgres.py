"""How fast is the PostgreSQL backend, against raw asyncpg on the same tables, in the same run?

Run it from the repository root::

    .venv/bin/python benchmarks/bench_postgres.py                 # about a minute
    .venv/bin/python benchmarks/bench_postgres.py --quick         # shorter rounds
    .venv/bin/python benchmarks/bench_postgres.py --admin-dsn postgresql://postgres@db:5432/postgres

It creates a throwaway database on the server of ``--admin-dsn`` (default: ``STORAGE_BENCH_DSN``, else
``STORAGE_TEST_DSN``, else the local server), fills it with 10k seed-shaped members, and measures, each beside
a hand-written asyncpg baseline on a table of the same shape (same columns, collation, indexes, jsonb codec):

* ``save_member_data`` / ``put``: one ``INSERT ... ON CONFLICT DO UPDATE`` per call, awaited one after the other;
* ``get_member_data`` / ``get``: one primary-key lookup per call; with the store's cache off (``cache_ttl=0``:
  the comparable number) and on (the default, served from memory after the first read);
* ``batch_update_members`` of 1000 against a COPY-based upsert (temporary table, ``COPY``, ``INSERT ... SELECT
  ... ON CONFLICT DO UPDATE``), and the backend's part of it alone (``_put_encoded`` of the encoded documents:
  what is left once the seed-shape checks of :mod:`storage.members` have run);
* 16 concurrent writers of ``save_member_data`` against 16 tasks on an asyncpg pool of 16;
* message ingest in batches of 10,000: ``record_messages`` (validation included) and the backend's
  ``_insert_messages`` (records already validated) against ``copy_records_to_table`` of the same rows
  converted by hand (no checks).

Single saves and gets are compared with two baselines: one dedicated connection (no pool: the fastest asyncpg can
go, but not how a bot shares a database) and an asyncpg pool with its defaults (how a bot written on raw asyncpg
would do it: ``pool.execute``, which also resets each connection it gets back). The store uses an asyncpg pool
too, so the first ratio includes the pool's own cost per call; a third baseline, an asyncpg pool whose reset hook
sends nothing, shows that cost alone.

Operations run in short rounds, raw and store alternating, and the table reports medians; targets are ratios
within the run, printed as PASS/MISS for information (the script exits 0 either way). Results go to
``benchmarks/results/postgres.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

import asyncpg
import orjson
from _common import (
    GUILD_BASE,
    USER_BASE,
    Rate,
    Target,
    atimed,
    concurrent_rate,
    fmt,
    machine_info,
    median_rate,
    member_doc,
    member_ids,
    print_table,
    write_results,
)

MEMBERS = 10_000
WRITERS = 16
BATCH = 1000
MESSAGE_BATCH = 10_000
ROUNDS = 7
ID_SHIFT = 2**63

RAW_DDL = """
CREATE TABLE raw_documents (LIKE storage_documents INCLUDING ALL);
CREATE TABLE raw_messages (LIKE storage_messages INCLUDING ALL);
"""
RAW_PUT = ("INSERT INTO raw_documents (collection, key, doc) VALUES ($1, $2, $3) "
           "ON CONFLICT (collection, key) DO UPDATE SET doc = EXCLUDED.doc")
RAW_GET = "SELECT doc FROM raw_documents WHERE collection = $1 AND key = $2"
MESSAGE_COLUMNS = ("message_id", "guild_id", "channel_id", "author_id", "created_at", "content_length",
                   "attachments", "reactions", "sentiment", "topics", "extra")


def log(message: str) -> None:
    print(f"[postgres] {message}", file=sys.stderr, flush=True)




def member_key(i: int) -> str:
    user_id, guild_id = member_ids(i)
    return f"{guild_id}_{user_id}"




_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)


def message_record(n: int) -> dict[str, Any]:
    """A message in the seed's shape, with its guild; ``n`` makes the id (new ones each round)."""
    ts = _EPOCH + timedelta(seconds=n * 3)
    return {
        "message_id": str(900_000_000_000_000_000 + n),
        "channel_id": str(700_000_000_000_000_000 + n % 20),
        "author_id": str(USER_BASE + n % 500),
        "guild_id": str(GUILD_BASE + n % 4),
        "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "content_length": n % 400,
        "attachments": n % 3,
        "reactions": n % 7,
        "analysis": {"sentiment": ("positive", "neutral", "negative")[n % 3], "topics": ["gaming", "music"][: n % 3]},
    }


def raw_message_row(rec: dict[str, Any]) -> tuple[Any, ...]:
    """What a hand-written ingest would COPY: the same columns, converted without any checks."""
    analysis = rec["analysis"]
    return (int(rec["message_id"]) - ID_SHIFT, int(rec["guild_id"]) - ID_SHIFT, int(rec["channel_id"]) - ID_SHIFT,
            int(rec["author_id"]) - ID_SHIFT, datetime.fromisoformat(rec["timestamp"][:-1]).replace(
                tzinfo=timezone.utc), rec["content_length"], rec["attachments"], rec["reactions"],
            analysis.get("sentiment"), analysis.get("topics"), None)


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + (value if isinstance(value, bytes) else orjson.dumps(value))


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(memoryview(data)[1:])


async def no_reset(conn: Any) -> None:
    """A pool reset hook that sends nothing: the cheapest an asyncpg pool can be (what the store does for the
    connections its own statements used)."""


async def raw_init(conn: Any) -> None:
    """The raw baseline gets the same jsonb codec as the store (asyncpg does not decode JSON by itself)."""
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=_encode_jsonb, decoder=_decode_jsonb,
                              format="binary")


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database, safe=""), parts.query, parts.fragment))


async def rounds(pairs: list[tuple[str, Callable[[float], Awaitable[Rate]]]], seconds: float) -> dict[str, float]:
    """Alternate the measurements round by round (raw, store, raw, store...) and take each one's median."""
    out: dict[str, list[Rate]] = {name: [] for name, _ in pairs}
    for _ in range(ROUNDS):
        for name, measure in pairs:
            out[name].append(await measure(seconds))
    return {name: median_rate(rates) for name, rates in out.items()}


async def run(dsn: str, scale: float) -> dict[str, Any]:
    import storage

    seconds = 0.4 * scale
    results: dict[str, Any] = {}
    store = await storage.open_store(backend="postgres", dsn=dsn, cache_ttl=0, pool_max=WRITERS)
    cached = await storage.open_store(backend="postgres", dsn=dsn, cache_ttl=300)  # the cache turned on
    raw = await asyncpg.connect(dsn)
    await raw_init(raw)
    await raw.execute(RAW_DDL)
    raw_pool = await asyncpg.create_pool(dsn, min_size=WRITERS, max_size=WRITERS, init=raw_init)
    bare_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=WRITERS, init=raw_init, reset=no_reset)
    try:
        t0 = time.perf_counter()
        for start in range(0, MEMBERS, 5000):
            await store.batch_update_members([
                {"user_id": member_ids(i)[0], "guild_id": member_ids(i)[1], "data": member_doc(i)}
                for i in range(start, start + 5000)])
        await raw.copy_records_to_table("raw_documents", records=[
            ("members", member_key(i), orjson.dumps(member_doc(i))) for i in range(MEMBERS)])
        await raw.execute("ANALYZE raw_documents; ANALYZE storage_documents")
        log(f"loaded {MEMBERS} members in {time.perf_counter() - t0:.1f} s")

        keys = [member_ids((i * 7919) % MEMBERS) for i in range(4096)]
        docs = [member_doc((i * 7919) % MEMBERS, version=i + 1) for i in range(4096)]

        # -- single saves and gets -------------------------------------------------------------------------------
        async def raw_save(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await raw.execute(RAW_PUT, "members", f"{guild_id}_{user_id}", orjson.dumps(docs[n & 4095]))

        async def store_save(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await store.save_member_data(user_id, guild_id, docs[n & 4095])

        async def store_put(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await store.put("members", f"{guild_id}_{user_id}", docs[n & 4095])

        async def pool_save(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await raw_pool.execute(RAW_PUT, "members", f"{guild_id}_{user_id}", orjson.dumps(docs[n & 4095]))

        async def pool_get(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await raw_pool.fetchval(RAW_GET, "members", f"{guild_id}_{user_id}")

        async def bare_save(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await bare_pool.execute(RAW_PUT, "members", f"{guild_id}_{user_id}", orjson.dumps(docs[n & 4095]))

        async def bare_get(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await bare_pool.fetchval(RAW_GET, "members", f"{guild_id}_{user_id}")

        async def raw_get(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await raw.fetchval(RAW_GET, "members", f"{guild_id}_{user_id}")

        async def store_get(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await store.get_member_data(user_id, guild_id)

        async def cached_get(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await cached.get_member_data(user_id, guild_id)

        def measure(op: Callable[[int], Awaitable[object]], min_ops: int = 50) -> Callable[[float], Awaitable[Rate]]:
            return lambda s: atimed(op, seconds=s, min_ops=min_ops)

        for n in range(4096):  # warm both tables and the cache the same way
            await raw_get(n)
            await cached_get(n)
        results.update(await rounds([("raw_save_ops_s", measure(raw_save)), ("pool_save_ops_s", measure(pool_save)),
                                     ("bare_save_ops_s", measure(bare_save)), ("save_ops_s", measure(store_save)),
                                     ("put_ops_s", measure(store_put))], seconds))
        log(f"save: raw {results['raw_save_ops_s']:,.0f}/s, raw pool {results['pool_save_ops_s']:,.0f}/s, "
            f"store {results['save_ops_s']:,.0f}/s")
        results.update(await rounds([("raw_get_ops_s", measure(raw_get)), ("pool_get_ops_s", measure(pool_get)),
                                     ("bare_get_ops_s", measure(bare_get)), ("get_ops_s", measure(store_get)),
                                     ("get_cached_ops_s", measure(cached_get))], seconds))
        log(f"get: raw {results['raw_get_ops_s']:,.0f}/s, raw pool {results['pool_get_ops_s']:,.0f}/s, "
            f"store {results['get_ops_s']:,.0f}/s, cached {results['get_cached_ops_s']:,.0f}/s")

        # -- batch of 1000 ---------------------------------------------------------------------------------------
        batch_times: dict[str, list[float]] = {"raw": [], "store": []}

        def batch_updates(n: int) -> list[dict[str, Any]]:
            start = (n * BATCH) % MEMBERS
            return [{"user_id": member_ids((start + j) % MEMBERS)[0], "guild_id": member_ids((start + j) % MEMBERS)[1],
                     "data": member_doc((start + j) % MEMBERS, version=50_000 + n)} for j in range(BATCH)]

        async def raw_batch(n: int) -> object:
            updates = batch_updates(n)
            t = time.perf_counter()
            rows = [("members", f"{u['guild_id']}_{u['user_id']}", orjson.dumps(u["data"])) for u in updates]
            async with raw.transaction():
                await raw.execute("CREATE TEMPORARY TABLE raw_stage (LIKE raw_documents) ON COMMIT DROP")
                await raw.copy_records_to_table("raw_stage", records=rows)
                await raw.execute("INSERT INTO raw_documents SELECT * FROM raw_stage "
                                  "ON CONFLICT (collection, key) DO UPDATE SET doc = EXCLUDED.doc")
            batch_times["raw"].append(time.perf_counter() - t)
            return None

        async def store_batch(n: int) -> object:
            updates = batch_updates(n)
            t = time.perf_counter()
            written = await store.batch_update_members(updates)
            batch_times["store"].append(time.perf_counter() - t)
            if written != BATCH:
                raise RuntimeError(f"batch_update_members wrote {written} of {BATCH}")
            return written

        async def backend_batch(n: int) -> object:
            """The backend's part alone: what batch_update_members hands over after validating and encoding."""
            pairs = [(f"{u['guild_id']}_{u['user_id']}", orjson.dumps(u["data"])) for u in batch_updates(n)]
            t = time.perf_counter()
            await store._put_encoded("members", pairs)
            batch_times["backend"].append(time.perf_counter() - t)
            return None

        batch_times["backend"] = []
        for n in range(ROUNDS * 4):
            await raw_batch(n)
            await store_batch(n)
            await backend_batch(n)
        results["raw_batch_ms"] = 1000 * statistics.median(batch_times["raw"])
        results["batch_ms"] = 1000 * statistics.median(batch_times["store"])
        results["backend_batch_ms"] = 1000 * statistics.median(batch_times["backend"])
        log(f"batch of {BATCH}: raw COPY upsert {results['raw_batch_ms']:.1f} ms, store {results['batch_ms']:.1f} ms, "
            f"backend only {results['backend_batch_ms']:.1f} ms")

        # -- 16 concurrent writers -------------------------------------------------------------------------------
        async def concurrent(save: Callable[[int], Awaitable[object]], s: float) -> Rate:
            return await concurrent_rate(save, writers=WRITERS, seconds=s)

        async def raw_pool_save(n: int) -> object:
            user_id, guild_id = keys[n & 4095]
            return await raw_pool.execute(RAW_PUT, "members", f"{guild_id}_{user_id}", orjson.dumps(docs[n & 4095]))

        results.update(await rounds([
            ("raw_concurrent_ops_s", lambda s: concurrent(raw_pool_save, s)),
            ("concurrent_ops_s", lambda s: concurrent(store_save, s))], seconds))
        log(f"{WRITERS} writers: raw pool {results['raw_concurrent_ops_s']:,.0f}/s, "
            f"store {results['concurrent_ops_s']:,.0f}/s")

        # -- message ingest --------------------------------------------------------------------------------------
        from storage.messages.records import normalize_messages

        counter = iter(range(10**12))
        ingest: dict[str, list[float]] = {"raw": [], "record_messages": [], "insert": []}
        for _ in range(ROUNDS):
            batch = [message_record(next(counter)) for _ in range(MESSAGE_BATCH)]
            t = time.perf_counter()
            await raw.copy_records_to_table("raw_messages", records=[raw_message_row(r) for r in batch],
                                            columns=MESSAGE_COLUMNS)
            ingest["raw"].append(MESSAGE_BATCH / (time.perf_counter() - t))

            batch = [message_record(next(counter)) for _ in range(MESSAGE_BATCH)]
            t = time.perf_counter()
            if await store.record_messages(batch) != MESSAGE_BATCH:
                raise RuntimeError("record_messages skipped new messages")
            ingest["record_messages"].append(MESSAGE_BATCH / (time.perf_counter() - t))

            batch = normalize_messages([message_record(next(counter)) for _ in range(MESSAGE_BATCH)])
            t = time.perf_counter()
            if await store._insert_messages(batch) != MESSAGE_BATCH:
                raise RuntimeError("_insert_messages skipped new messages")
            ingest["insert"].append(MESSAGE_BATCH / (time.perf_counter() - t))
        results["raw_ingest_rows_s"] = statistics.median(ingest["raw"])
        results["ingest_rows_s"] = statistics.median(ingest["record_messages"])
        results["insert_rows_s"] = statistics.median(ingest["insert"])
        log(f"ingest: raw COPY {results['raw_ingest_rows_s']:,.0f} rows/s, record_messages "
            f"{results['ingest_rows_s']:,.0f}, _insert_messages {results['insert_rows_s']:,.0f}")
        results["server_version"] = raw.get_server_version().major
    finally:
        await raw_pool.close()
        await bare_pool.close()
        await raw.close()
        await cached.close()
        await store.close()
    return results


def targets(r: dict[str, Any]) -> list[Target]:
    return [
        Target("save_member_data / raw connection", r["save_ops_s"] / r["raw_save_ops_s"], ">=", 0.9, "x"),
        Target("save_member_data / raw pool", r["save_ops_s"] / r["pool_save_ops_s"], ">=", 0.9, "x"),
        Target("get_member_data (cache off) / raw connection", r["get_ops_s"] / r["raw_get_ops_s"], ">=", 0.9, "x"),
        Target("get_member_data (cache off) / raw pool", r["get_ops_s"] / r["pool_get_ops_s"], ">=", 0.9, "x"),
        Target(f"batch of {BATCH} / raw COPY upsert (time)", r["batch_ms"] / r["raw_batch_ms"], "<=", 1.2, "x"),
        Target("  backend only / raw COPY upsert (time)", r["backend_batch_ms"] / r["raw_batch_ms"], "<=", 1.2, "x"),
        Target("record_messages (rows/s)", r["ingest_rows_s"], ">=", 100_000),
        Target("_insert_messages (rows/s)", r["insert_rows_s"], ">=", 100_000),
    ]


def report(r: dict[str, Any], info: dict[str, Any]) -> list[Target]:
    def ratio(a: str, b: str) -> str:
        return fmt(r[a] / r[b]) + "x"

    rows = [
        ["save_member_data (ops/s)", fmt(r["raw_save_ops_s"]), fmt(r["save_ops_s"]),
         ratio("save_ops_s", "raw_save_ops_s")],
        ["  raw asyncpg pool (defaults) instead", fmt(r["pool_save_ops_s"]), fmt(r["save_ops_s"]),
         ratio("save_ops_s", "pool_save_ops_s")],
        ["  raw asyncpg pool, reset off instead", fmt(r["bare_save_ops_s"]), fmt(r["save_ops_s"]),
         ratio("save_ops_s", "bare_save_ops_s")],
        ["  put (ops/s)", fmt(r["raw_save_ops_s"]), fmt(r["put_ops_s"]), ratio("put_ops_s", "raw_save_ops_s")],
        ["get_member_data, cache off (ops/s)", fmt(r["raw_get_ops_s"]), fmt(r["get_ops_s"]),
         ratio("get_ops_s", "raw_get_ops_s")],
        ["  raw asyncpg pool (defaults) instead", fmt(r["pool_get_ops_s"]), fmt(r["get_ops_s"]),
         ratio("get_ops_s", "pool_get_ops_s")],
        ["  raw asyncpg pool, reset off instead", fmt(r["bare_get_ops_s"]), fmt(r["get_ops_s"]),
         ratio("get_ops_s", "bare_get_ops_s")],
        ["  cache on, ttl 300 s (ops/s)", fmt(r["raw_get_ops_s"]), fmt(r["get_cached_ops_s"]),
         ratio("get_cached_ops_s", "raw_get_ops_s")],
        [f"batch of {BATCH} vs COPY upsert (ms)", fmt(r["raw_batch_ms"]), fmt(r["batch_ms"]),
         ratio("batch_ms", "raw_batch_ms")],
        ["  backend only: _put_encoded, no checks (ms)", fmt(r["raw_batch_ms"]), fmt(r["backend_batch_ms"]),
         ratio("backend_batch_ms", "raw_batch_ms")],
        [f"{WRITERS} concurrent writers (ops/s)", fmt(r["raw_concurrent_ops_s"]), fmt(r["concurrent_ops_s"]),
         ratio("concurrent_ops_s", "raw_concurrent_ops_s")],
        ["message ingest, record_messages (rows/s)", fmt(r["raw_ingest_rows_s"]), fmt(r["ingest_rows_s"]),
         ratio("ingest_rows_s", "raw_ingest_rows_s")],
        ["  _insert_messages, pre-validated (rows/s)", fmt(r["raw_ingest_rows_s"]), fmt(r["insert_rows_s"]),
         ratio("insert_rows_s", "raw_ingest_rows_s")],
    ]
    title = (f"PostgreSQL {r['server_version']} backend vs raw asyncpg {info['asyncpg']}: Python {info['python']}, "
             f"{info['cpus']} cpus, {info['time']}, load average {info.get('loadavg_1m', '?')} at start")
    print_table(["operation", "raw asyncpg", "storage", "storage/raw"], rows, title=title)
    judged = targets(r)
    print_table(["target", "value", "goal", "verdict"],
                [[t.name, fmt(t.value), f"{t.op} {fmt(t.goal)}", t.verdict] for t in judged],
                title="Targets (informational: ratios measured within one run)")
    return judged


async def with_database_created(admin_dsn: str, scale: float) -> dict[str, Any]:
    name = f"storage_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
        try:
            return await run(with_database(admin_dsn, name), scale)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    results = asyncio.run(with_database_created(args.admin_dsn, 0.5 if args.quick else 1.0))
    print(file=sys.stderr)
    judged = report(results, info)
    info["wall_s"] = time.perf_counter() - started
    path = write_results("postgres", {"machine": info, "quick": args.quick, "results": results,
                                      "targets": [t.as_dict() for t in judged]})
    print(f"wrote {path} in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
