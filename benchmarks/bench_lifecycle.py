"""How fast are forget_guild / forget_user / export_user at 100k members and 1M messages, and do they hold the loop?

Run it from the repository root::

    .venv/bin/python benchmarks/bench_lifecycle.py                                   # JSON only
    .venv/bin/python benchmarks/bench_lifecycle.py --dsn postgresql://postgres@127.0.0.1/postgres   # + PostgreSQL
    STORAGE_BENCH_DSN=postgresql://... .venv/bin/python benchmarks/bench_lifecycle.py --members 20000 --messages 200000

PostgreSQL runs in a schema of its own (``bench_lifecycle_<pid>``), created for the run and dropped at the end.

The store (each backend, the same data): ``--members`` member documents, 1,000 per guild (the shape of
benchmarks/_common.py), a ``settings`` document per guild; ``--messages`` message records, of which
``--guild-messages`` in the guild that is forgotten and the rest spread over the others; one user who is a member of
every guild (100 at 100k members), with 20 messages in each and an ``economy`` document. Timed, each once, with the
longest event-loop stall during the call (a 1 ms ticker task, as a bot's gateway heartbeat): ``forget_guild`` of
the 1,000-member guild (dry run first, then the real one), ``export_user`` and ``forget_user`` of the user present
in every guild; then, same run, interleaved (``--rounds`` times, medians): ``forget_guild`` of another 1,000-member
guild on the store, and of the next one inside a transaction (with a put, as a bot's leave handler would), to show
what the transaction's form costs.
Targets (printed, never failing): ``forget_guild`` <= 1 s; no stall over 20 ms.
Results go to ``benchmarks/results/lifecycle.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

from _common import (
    MEMBERS_PER_GUILD,
    Target,
    fmt,
    machine_info,
    member_doc,
    member_ids,
    print_table,
    write_results,
)

import storage

THE_USER = 299_999_999_999_999_999  # a member of every guild
STORE_ROW = "forget_guild, another guild (median)"
TX_ROW = "tx: forget_guild + put, the next guild (median)"
USER_MESSAGES_PER_GUILD = 20
BATCH = 10_000


def log(message: str) -> None:
    print(f"[lifecycle] {message}", file=sys.stderr, flush=True)


class StallWatch:
    """The longest gap between two runs of a 1 ms timer while a watched call runs (see bench_analytics.py)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._watching = False
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            if self._watching:
                self.longest = max(self.longest, now - last)
            last = now

    async def measure(self, op: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
        """``(seconds, longest stall in seconds, result)`` of one call."""
        if self._task is None:
            self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.003)  # the ticker's clock starts before the call
        self.longest, self._watching = 0.0, True
        began = time.perf_counter()
        try:
            result = await op()
        finally:
            seconds = time.perf_counter() - began
            await asyncio.sleep(0.002)  # the gap that ends right after the call counts too
            self._watching = False
        return seconds, self.longest, result

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class WriterProbe:
    """A bot writing beside the watched call (a ``put`` every 5 ms): the longest any of its writes waited, i.e. how
    long the call kept the store's write lock (a forget on JSON takes it)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.longest = 0.0
        self._running = False

    async def _write(self) -> None:
        n = 0
        while self._running:
            began = time.perf_counter()
            await self.store.put("bench_probe", "writer", {"n": n})
            self.longest = max(self.longest, time.perf_counter() - began)
            n += 1
            await asyncio.sleep(0.005)

    async def around(self, op: Callable[[], Awaitable[Any]]) -> Any:
        self.longest, self._running = 0.0, True
        task = asyncio.create_task(self._write())
        try:
            return await op()
        finally:
            self._running = False
            await task


async def _in_transaction(store: Any, guild: int) -> dict[str, int]:
    async with store.transaction() as tx:
        counts: dict[str, int] = await tx.forget_guild(guild)
        await tx.put("left", str(guild), {"left": True})
    return counts


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _record(i: int, guild: int, author: int) -> dict[str, Any]:
    return {"message_id": str(1_000_000_000_000_000_000 + i), "guild_id": str(guild), "channel_id": str(guild + 1),
            "author_id": str(author), "timestamp": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
            "content_length": i % 300, "attachments": i % 3, "reactions": i % 5,
            "analysis": {"sentiment": ("positive", "neutral", "negative")[i % 3], "topics": ["music"]}}


async def fill(store: Any, members: int, messages: int, guild_messages: int) -> tuple[int, int]:
    guilds = max(1, members // MEMBERS_PER_GUILD)
    first_guild = member_ids(0)[1]
    batch: dict[str, Any] = {}
    for i in range(members):
        user, guild = member_ids(i)
        batch[f"{guild}_{user}"] = member_doc(i)
        if len(batch) >= BATCH:
            await store.put_many("members", batch)
            batch = {}
    for g in range(guilds):
        batch[f"{first_guild + g}_{THE_USER}"] = {"user_id": str(THE_USER), "guild_id": str(first_guild + g)}
    await store.put_many("members", batch)
    await store.put_many("settings", {str(first_guild + g): {"prefix": "!"} for g in range(guilds)})
    await store.put("economy", str(THE_USER), {"coins": 10})
    log(f"{members + guilds} member documents written")
    n = 0
    records: list[dict[str, Any]] = []
    for i in range(messages):
        if i < guild_messages:
            guild, author = first_guild, member_ids(i % MEMBERS_PER_GUILD)[0]
        elif i < guild_messages + guilds * USER_MESSAGES_PER_GUILD:
            guild, author = first_guild + (i - guild_messages) % guilds, THE_USER
        else:
            g = 1 + i % max(1, guilds - 1) if guilds > 1 else 0
            guild, author = first_guild + g, member_ids(g * MEMBERS_PER_GUILD + i % MEMBERS_PER_GUILD)[0]
        records.append(_record(i, guild, author))
        if len(records) >= BATCH:
            n += await store.record_messages(records)
            records = []
            if n % 200_000 == 0:
                log(f"{n} messages recorded")
    if records:
        n += await store.record_messages(records)
    log(f"{n} messages recorded")
    return first_guild, guilds


async def run_backend(backend: str, where: str, members: int, messages: int, guild_messages: int,
                      rounds: int = 5) -> dict[str, Any]:
    config = (storage.StoreConfig(backend="json", path=where, source="benchmark") if backend == "json"
              else storage.StoreConfig(backend="postgres", dsn=where, source="benchmark", command_timeout=600))
    out: dict[str, Any] = {}
    async with storage.open_store(config=config) as store:
        began = time.perf_counter()
        guild, guilds = await fill(store, members, messages, guild_messages)
        out["fill_s"] = time.perf_counter() - began
        watch = StallWatch()
        writer = WriterProbe(store)
        try:
            for name, op in (
                # the machine's floor, same run: the loop idle, and the loop beside a worker thread running Python
                # (the GIL changes hands every 5 ms when both are scheduled; a loaded machine adds to both)
                ("baseline: idle 0.3 s", lambda: asyncio.sleep(0.3)),
                ("baseline: Python in a thread 0.3 s", lambda: asyncio.to_thread(_spin, 0.3)),
                ("forget_guild dry run", lambda: store.forget_guild(guild, dry_run=True)),
                ("forget_guild", lambda: store.forget_guild(guild)),
                ("export_user", lambda: store.export_user(THE_USER)),
                ("forget_user dry run", lambda: store.forget_user(THE_USER, dry_run=True)),
                ("forget_user", lambda: store.forget_user(THE_USER)),
            ):
                seconds, stall, result = await watch.measure(lambda op=op: writer.around(op))
                summary = result if not isinstance(result, dict) or "format" not in result else {
                    "messages": len(result["messages"]), "members": len(result["members"])}
                out[name] = {"seconds": seconds, "stall_ms": stall * 1000, "result": summary,
                             "writer_wait_ms": writer.longest * 1000}
                log(f"{backend} {name}: {seconds:.3f} s, longest stall {stall * 1000:.1f} ms, a concurrent write "
                    f"waited up to {writer.longest * 1000:.0f} ms, {summary}")
            # the transaction's form beside the store's, interleaved over fresh guilds of the same size
            runs: dict[str, list[tuple[float, float]]] = {STORE_ROW: [], TX_ROW: []}
            for r in range(min(rounds, (guilds - 1) // 2)):
                first = guild + 1 + 2 * r
                for name, op in ((STORE_ROW, lambda g=first: store.forget_guild(g)),
                                 (TX_ROW, lambda g=first + 1: _in_transaction(store, g))):
                    seconds, stall, result = await watch.measure(op)
                    runs[name].append((seconds, stall))
                    log(f"{backend} round {r + 1}, {name.replace(' (median)', '')}: {seconds:.3f} s, longest stall "
                        f"{stall * 1000:.1f} ms, {result}")
            for name, timings in runs.items():
                out[name] = {"seconds": statistics.median(t for t, _ in timings),
                             "stall_ms": statistics.median(st for _, st in timings) * 1000, "runs": timings}
        finally:
            watch.stop()
    out["guilds"] = guilds
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--guild-messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved store/transaction forget_guild pairs")
    parser.add_argument("--dsn", default=os.environ.get("STORAGE_BENCH_DSN"))
    parser.add_argument("--dir", default=None, help="where the JSON store goes (default: a temp folder)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-lifecycle-", dir=args.dir))
    try:
        results["json"] = asyncio.run(run_backend("json", str(tmp / "data"), args.members, args.messages,
                                                  args.guild_messages, args.rounds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.dsn:
        results["postgres"] = asyncio.run(_with_schema(args))
    backends = list(results)
    rows = []
    for name in ("baseline: idle 0.3 s", "baseline: Python in a thread 0.3 s", "forget_guild dry run",
                 "forget_guild", "export_user", "forget_user dry run", "forget_user", STORE_ROW, TX_ROW):
        rows.append([name] + [f"{fmt(results[b][name]['seconds'])} s / {fmt(results[b][name]['stall_ms'])} ms / "
                              f"{fmt(results[b][name].get('writer_wait_ms', 0))} ms" for b in backends])
    rows.append(["(filling the store)"] + [f"{fmt(results[b]['fill_s'])} s" for b in backends])
    print_table(["call (time / longest loop stall / longest wait of a concurrent put)", *backends], rows,
                title=f"{args.members:,} members, {args.messages:,} messages ({args.guild_messages:,} in the "
                      f"forgotten guild), one user in every guild")
    targets = []
    for b in backends:
        targets.append(Target(f"{b} forget_guild seconds", results[b]["forget_guild"]["seconds"], "<=", 1.0, "s"))
        worst = max(results[b][n]["stall_ms"] for n in ("forget_guild", "forget_user", "export_user",
                                                        "forget_guild dry run", "forget_user dry run"))
        targets.append(Target(f"{b} longest loop stall", worst, "<=", 20.0, "ms"))
    print_table(["target", "value", "goal", "verdict"],
                [[t.name, fmt(t.value), f"{t.op} {fmt(t.goal)} {t.unit}", t.verdict] for t in targets])
    path = write_results("lifecycle", {"machine": machine_info(), "args": vars(args) | {"dsn": bool(args.dsn)},
                                       "results": results, "targets": [t.as_dict() for t in targets]})
    print(f"results: {path}")
    return 0


async def _with_schema(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    schema = f"bench_lifecycle_{os.getpid()}"
    conn = await asyncpg.connect(args.dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    sep = "&" if "?" in args.dsn else "?"
    try:
        return await run_backend("postgres", f"{args.dsn}{sep}options=-csearch_path%3D{schema}", args.members,
                                 args.messages, args.guild_messages, args.rounds)
    finally:
        conn = await asyncpg.connect(args.dsn)
        try:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            await conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
