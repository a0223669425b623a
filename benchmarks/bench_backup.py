"""How fast are backups, restores and copies, on each backend and between them?

Run it from the repository root::

    .venv/bin/python benchmarks/bench_backup.py                          # 100k members + 1M messages
    .venv/bin/python benchmarks/bench_backup.py --members 10000 --messages 100000
    .venv/bin/python benchmarks/bench_backup.py --backends json          # no PostgreSQL

For each available backend a source store is filled with seed-shaped members (1000 per guild) and message records
(spread over 12 months and 4 guilds), then these are timed, each once (they are long, so one run is a fair
measurement on a shared machine; rerun to see the spread):

* ``backup``: :meth:`create_backup` (one snapshot read, files written and fsynced, then verified);
* ``verify``: :meth:`verify_backup` alone (hash and count every file);
* ``restore, empty target``: the backup restored into an empty store of the same backend (the safety backup of the
  empty target is nearly free);
* ``restore, unchanged``: the backup restored onto the data it came from: safety backup, diff, and nothing written;
* ``copy A -> B``: :func:`storage.backup.copy.copy` into an empty store, for every pair of available backends,
  including the read-back verification.

And, because a bot runs its gateway heartbeat on the same event loop: the **longest event-loop stall** (the
longest gap between two runs of a 1 ms timer) during ``create_backup`` and during ``restore --dry-run`` (target:
none over 50 ms), and the backup's size on disk (gzip) against its uncompressed content.

Records = members + messages. PostgreSQL runs against ``--pg-admin-dsn`` (default: the local trust-auth server),
in scratch databases that are dropped afterwards; when the server is not reachable, only JSON runs. Results go to
``benchmarks/results/backup.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

from _common import fmt, machine_info, peak_rss_mib, print_table, write_results

import storage
from storage import StoreConfig
from storage.backup.copy import copy

GUILDS = ("800000000000000001", "800000000000000002", "800000000000000003", "800000000000000004")
MEMBERS_PER_GUILD = 1000
USER_BASE = 300_000_000_000_000_000
MESSAGE_BASE = 1_100_000_000_000_000_000
BATCH = 10_000
STALL_TARGET = 0.050  # seconds: a gateway heartbeat or a command reply should not wait longer


def member(i: int, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    guild = str(800_000_000_000_000_000 + i // MEMBERS_PER_GUILD)
    user = str(USER_BASE + i)
    return user, guild, {
        "user_id": user, "guild_id": guild, "join_date": "2024-01-01T00:00:00Z",
        "roles": ["member"] + (["mod"] if i % 50 == 0 else []),
        "preferences": {"notifications": bool(i % 2), "language": "ja"},
        "statistics": {"message_count": rng.randrange(5000), "last_active": "2024-06-15T12:00:00Z"},
    }


def message(i: int, rng: random.Random) -> dict[str, Any]:
    return {
        "message_id": str(MESSAGE_BASE + i), "guild_id": GUILDS[i % len(GUILDS)],
        "channel_id": str(900_000_000_000_000_000 + i % 20), "author_id": str(USER_BASE + rng.randrange(10_000)),
        "timestamp": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i // 60) % 60:02d}Z",
        "content_length": rng.randrange(2000), "attachments": int(i % 3 == 0), "reactions": rng.randrange(10),
        "analysis": {"sentiment": ("positive", "neutral", "negative")[i % 3], "topics": ["gaming", "music"][: i % 3]},
    }


class Places:
    """Fresh empty stores of each backend, cleaned up at the end."""

    def __init__(self, root: Path, admin_dsn: str | None) -> None:
        self.root = root
        self.admin_dsn = admin_dsn
        self.databases: list[str] = []
        self.backup_dir = root / "backups"

    async def config(self, backend: str, name: str) -> StoreConfig:
        if backend == "json":
            return StoreConfig(backend="json", path=str(self.root / name), backup_dir=str(self.backup_dir),
                               source="benchmark")
        import asyncpg

        assert self.admin_dsn is not None
        db = f"bench_backup_{secrets.token_hex(4)}_{name}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{db}"')
        finally:
            await conn.close()
        self.databases.append(db)
        base, _, _ = self.admin_dsn.rpartition("/")
        return StoreConfig(backend="postgres", dsn=f"{base}/{db}", backup_dir=str(self.backup_dir),
                           source="benchmark")

    @asynccontextmanager
    async def store(self, backend: str, name: str) -> AsyncIterator[Any]:
        async with storage.open_store(config=await self.config(backend, name)) as s:
            yield s

    async def cleanup(self) -> None:
        if not self.databases:
            return
        import asyncpg

        assert self.admin_dsn is not None
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            for db in self.databases:
                await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        finally:
            await conn.close()


async def postgres_reachable(dsn: str) -> str | None:
    """None when we can use the server, else why not."""
    try:
        import asyncpg

        conn = await asyncio.wait_for(asyncpg.connect(dsn), 5)
        await conn.close()
        return None
    except Exception as exc:  # any failure means: skip PostgreSQL
        return f"{type(exc).__name__}: {exc}"


async def fill(store: Any, members: int, messages: int) -> float:
    rng = random.Random(7)
    started = time.perf_counter()
    for start in range(0, members, BATCH):
        await store.batch_update_members(
            [{"user_id": u, "guild_id": g, "data": d}
             for u, g, d in (member(i, rng) for i in range(start, min(members, start + BATCH)))])
    await store.put_many("_migrations", {"1.0.0": {"description": "init"}, "1.1.0": {"description": "prefs"}})
    await store.put("spam_blocker", "settings", {"threshold": 5})
    if messages:
        for start in range(0, messages, BATCH):
            await store.record_messages([message(i, rng) for i in range(start, min(messages, start + BATCH))])
    return time.perf_counter() - started


def busy_python(seconds: float) -> int:
    """Pure-Python work for ``seconds`` (small dicts, as a backup's worker thread makes)."""
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += len({"k": n, "v": [n, n + 1]})
    return n


class StallWatch:
    """The longest the event loop went without running a 1 ms timer while one call ran (a full garbage
    collection, or a worker thread holding the GIL, counts too: a heartbeat would wait just the same)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._running = False

    async def _tick(self) -> None:
        last = time.perf_counter()
        while self._running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    async def watch(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        self._running = True
        ticker = asyncio.create_task(self._tick())
        await asyncio.sleep(0.002)
        try:
            return await fn()
        finally:
            self._running = False
            await ticker


async def timed(label: str, fn: Callable[[], Awaitable[Any]]) -> tuple[Any, float, float]:
    """``(result, seconds, longest event-loop stall in seconds)``."""
    print(f"  {label}...", file=sys.stderr, flush=True)
    watch = StallWatch()
    started = time.perf_counter()
    result = await watch.watch(fn)
    return result, time.perf_counter() - started, watch.longest


async def run(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    notes: list[str] = []
    if "postgres" in backends:
        why = await postgres_reachable(args.pg_admin_dsn)
        if why is not None:
            notes.append(f"postgres skipped: {why}")
            backends.remove("postgres")
    root = Path(tempfile.mkdtemp(prefix="bench_backup_", dir=args.dir))
    places = Places(root, args.pg_admin_dsn if "postgres" in backends else None)
    rows: list[list[object]] = []
    sizes: list[list[object]] = []
    results: list[dict[str, Any]] = []

    def record(backend: str, operation: str, records: int, seconds: float, stall: float | None = None) -> None:
        stall_ms = "" if stall is None else f"{stall * 1000:.0f}" + (" MISS" if stall > STALL_TARGET else "")
        rows.append([backend, operation, records, f"{seconds:.2f}", fmt(records / seconds), stall_ms])
        results.append({"backend": backend, "operation": operation, "records": records, "seconds": seconds,
                        "records_per_s": records / seconds,
                        "longest_stall_ms": None if stall is None else stall * 1000})

    # The host's own noise floor: the same watch over an idle loop (a loaded 2-core VM misses 1 ms timers too).
    _, seconds, stall = await timed("idle loop", lambda: asyncio.sleep(2))
    record("-", "(baseline: idle event loop, 2 s)", 1, seconds, stall)
    # ...and the floor for any work done in a worker thread: the loop must get the GIL back from it
    _, seconds, stall = await timed("loop + busy thread", lambda: asyncio.to_thread(busy_python, 2.0))
    record("-", "(baseline: a thread running Python, 2 s)", 1, seconds, stall)
    try:
        for backend in backends:
            print(f"{backend}: filling {args.members} members + {args.messages} messages", file=sys.stderr)
            async with places.store(backend, "source") as source:
                loaded = await fill(source, args.members, args.messages)
                total = args.members + 3 + args.messages
                record(backend, "(fill: batch_update_members + record_messages)", total, loaded)
                info, seconds, stall = await timed("backup", lambda s=source: s.create_backup())
                assert info.records == total, (info.records, total)
                record(backend, "backup (create + verify)", total, seconds, stall)
                sizes.append([backend, f"{info.raw_bytes / 2**20:.1f}", f"{info.size_bytes / 2**20:.1f}",
                              f"{info.raw_bytes / max(info.size_bytes, 1):.1f}x"])
                results.append({"backend": backend, "operation": "backup size", "raw_bytes": info.raw_bytes,
                                "stored_bytes": info.size_bytes})
                report, seconds, stall = await timed("verify", lambda s=source, i=info: s.verify_backup(i.id))
                assert report.ok, report.problems
                record(backend, "verify", total, seconds, stall)
                async with places.store(backend, "restored") as target:
                    dry, seconds, stall = await timed("restore --dry-run into empty",
                                                      lambda t=target, i=info: t.restore_backup(i.id, dry_run=True))
                    assert dry.changed == args.members + 3
                    record(backend, "restore --dry-run, empty target", total, seconds, stall)
                    _, seconds, stall = await timed("restore into empty",
                                                    lambda t=target, i=info: t.restore_backup(i.id))
                    record(backend, "restore, empty target", total, seconds, stall)
                result, seconds, stall = await timed("restore unchanged",
                                                     lambda s=source, i=info: s.restore_backup(i.id))
                assert result.changed == 0
                record(backend, "restore, unchanged data", total, seconds, stall)
                for other in backends:
                    async with places.store(other, f"copy_{backend}_{other}") as target:
                        copied, seconds, stall = await timed(f"copy to {other}",
                                                             lambda s=source, t=target: copy(s, t))
                        assert copied.records == total
                        record(backend, f"copy {backend} -> {other} (+ verify)", total, seconds, stall)
            shutil.rmtree(places.backup_dir, ignore_errors=True)
    finally:
        await places.cleanup()
        shutil.rmtree(root, ignore_errors=True)

    print_table(["backend", "operation", "records", "seconds", "records/s", "longest stall ms"], rows,
                title=f"backup / restore / copy: {args.members} members + {args.messages} messages "
                      f"(peak RSS {peak_rss_mib():.0f} MiB; stall target <= {STALL_TARGET * 1000:.0f} ms)")
    print_table(["backend", "backup MiB uncompressed", "MiB on disk (gzip)", "ratio"], sizes,
                title="backup size")
    for note in notes:
        print(note)
    path = write_results("backup", {"machine": machine_info(args.dir), "members": args.members,
                                    "messages": args.messages, "results": results, "notes": notes})
    print(f"results: {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--members", type=int, default=100_000, help="members (default %(default)s)")
    parser.add_argument("--messages", type=int, default=1_000_000, help="message records (default %(default)s)")
    parser.add_argument("--backends", default="json,postgres", help="comma-separated (default %(default)s)")
    parser.add_argument("--pg-admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a server where scratch databases may be created (default %(default)s)")
    parser.add_argument("--dir", default=None, help="where JSON stores and backups go (default: system temp)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
