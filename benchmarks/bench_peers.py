"""Our JSON backend beside SQLite (the embedded store a bot developer would pick instead), same documents, same run.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_peers.py            # 100k members, 5 interleaved repetitions (a few minutes)
    .venv/bin/python benchmarks/bench_peers.py --quick    # 10k members, 3 repetitions, shorter rounds (about a minute)
    .venv/bin/python benchmarks/bench_peers.py --members 50000 --reps 7 --dir /mnt/ssd/tmp

Systems (each in a fresh process for every repetition, the repetitions interleaved, medians reported):

* ``json``: this library's JSON backend through ``storage.open_store(backend="json")`` and its public calls;
* ``sqlite-full``: the standard ``sqlite3`` module, WAL, ``synchronous=FULL`` (durable: the configuration that
  gives the guarantee ours gives), one row per member (``key TEXT PRIMARY KEY, doc TEXT`` holding the JSON, encoded
  with orjson as ours is);
* ``sqlite-normal``: the same in WAL with ``synchronous=NORMAL`` (what most bots run: a power cut may lose the last
  commits);
* ``json-base`` (with ``--baseline PATH``): the JSON backend of another checkout, run exactly like ``json`` (on a
  store it prepared itself: the sidecar format may differ), so a
  change is measured before/after in the same interleaved run;
* ``floor``: a raw loop of ``os.write`` + ``os.fdatasync`` of one save's journal line (what a durable save cannot
  beat on this disk).

Rows: sequential durable save (``save_member_data`` / one autocommitted upsert, one await per save, every save
writing different bytes); 4 writer processes on one store, total saves per second; a batch of 1,000 member upserts
(``put_many`` / ``executemany`` in one transaction); ``get``; open of the store + first get, and the peak RSS of
that process; size on disk (the store as prepared: our compacted snapshot, SQLite's checkpointed database).
Ratios are ours / SQLite FULL, ours / SQLite NORMAL, and the save against the floor. The SQLite calls are
synchronous (they block the event loop; ours do not): the comparison flatters SQLite, not us.
Results go to ``benchmarks/results/peers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import importlib.metadata
import itertools
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # storage, when not installed

import orjson
from _common import (
    Target,
    atimed,
    fmt,
    machine_info,
    member_doc,
    member_ids,
    peak_rss_mib,
    print_table,
    rss_mib,
    run_worker,
    write_results,
)

SYSTEMS = ("json", "sqlite-full", "sqlite-normal", "floor")
WRITERS = 4
BATCH = 1000
UPSERT = "INSERT INTO members(key, doc) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET doc = excluded.doc"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def key_of(i: int) -> str:
    user_id, guild_id = member_ids(i)
    return f"{guild_id}_{user_id}"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the systems ----------------------------------------------------------------------------------------------------
class Json:
    """Our store, through the public API a bot uses."""

    def __init__(self, path: Path) -> None:
        import storage  # before any clock starts: an import is not an open

        self.storage = storage
        self.path = path
        self.store: Any = None

    async def open(self) -> None:
        self.store = await self.storage.open_store(backend="json", path=self.path)

    async def get(self, i: int) -> Any:
        user_id, guild_id = member_ids(i)
        return await self.store.get_member_data(user_id, guild_id)

    async def save(self, i: int, doc: dict[str, Any]) -> Any:
        user_id, guild_id = member_ids(i)
        return await self.store.save_member_data(user_id, guild_id, doc)

    async def batch(self, items: dict[str, dict[str, Any]]) -> Any:
        return await self.store.put_many("members", items)

    async def close(self) -> None:
        await self.store.close()


class Sqlite:
    """The standard module, one row per member; autocommit (each save is its own durable transaction)."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path = path / "members.db"
        self.synchronous = synchronous
        self.conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("CREATE TABLE IF NOT EXISTS members (key TEXT PRIMARY KEY, doc TEXT NOT NULL)")
        self.conn = conn

    async def get(self, i: int) -> Any:
        assert self.conn is not None
        row = self.conn.execute("SELECT doc FROM members WHERE key = ?", (key_of(i),)).fetchone()
        return orjson.loads(row[0]) if row is not None else {}

    async def save(self, i: int, doc: dict[str, Any]) -> Any:
        assert self.conn is not None
        self.conn.execute(UPSERT, (key_of(i), orjson.dumps(doc).decode()))
        return True

    async def batch(self, items: dict[str, dict[str, Any]]) -> Any:
        assert self.conn is not None
        conn = self.conn
        conn.execute("BEGIN")
        try:
            conn.executemany(UPSERT, [(k, orjson.dumps(d).decode()) for k, d in items.items()])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return len(items)

    async def close(self) -> None:
        assert self.conn is not None
        self.conn.close()


def make(system: str, path: Path) -> Json | Sqlite:
    if system in ("json", "json-base"):
        return Json(path)
    return Sqlite(path, "FULL" if system == "sqlite-full" else "NORMAL")


def floor_line() -> bytes:
    """One save's journal line, as the JSON backend writes it (the floor writes the same bytes)."""
    from storage.backends.json.journal import encode_record
    from storage.codec import encode_doc

    return encode_record([("p", "members", key_of(0), encode_doc(member_doc(0)))])


# -- workers (each in a fresh interpreter) ---------------------------------------------------------------------------
async def prepare(system: str, path: Path, members: int) -> dict[str, Any]:
    """Build the store every repetition copies: ``members`` members, compacted / checkpointed."""
    path.mkdir(parents=True)
    target = make(system, path)
    await target.open()
    for start in range(0, members, 10_000):
        await target.batch({key_of(i): member_doc(i) for i in range(start, min(members, start + 10_000))})
    if isinstance(target, Sqlite):
        assert target.conn is not None
        target.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    await target.close()
    return {"bytes": dir_bytes(path)}


async def ops(system: str, path: Path, members: int, seconds: float) -> dict[str, Any]:
    """One repetition of every single-process row, on a fresh copy of the prepared store."""
    out: dict[str, Any] = {}
    if system == "floor":
        line = floor_line()
        fd = os.open(path / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sync = getattr(os, "fdatasync", os.fsync)
        try:
            n, start = 0, time.perf_counter()
            while n < 20 or time.perf_counter() - start < seconds:
                os.write(fd, line)
                sync(fd)
                n += 1
            out["save_per_s"] = n / (time.perf_counter() - start)
        finally:
            os.close(fd)
        return out

    rng = random.Random(7)
    picks = [rng.randrange(members) for _ in range(4096)]
    docs = [member_doc(i) for i in picks]
    target = make(system, path)
    rss_before = rss_mib()
    started = time.perf_counter()
    await target.open()
    first = await target.get(picks[0])
    out["open_first_get_ms"] = 1000 * (time.perf_counter() - started)
    out["open_peak_rss_mib"] = peak_rss_mib()
    out["open_rss_added_mib"] = rss_mib() - rss_before
    if first.get("user_id") != str(member_ids(picks[0])[0]):
        raise RuntimeError(f"{system}: the first get did not return the prepared member")

    rate = await atimed(lambda n: target.get(picks[n & 4095]), seconds=seconds, min_ops=200)
    out["get_per_s"] = rate.per_second

    async def save(n: int) -> Any:
        doc = docs[n & 4095]
        doc["statistics"]["message_count"] = n + 1  # every save writes different bytes
        return await target.save(picks[n & 4095], doc)

    rate = await atimed(save, seconds=seconds, min_ops=20)
    out["save_per_s"] = rate.per_second

    times = []
    for b in range(max(5, int(10 * seconds))):
        base = (b * BATCH * 7) % members
        items = {}
        for j in range(BATCH):
            i = (base + j) % members
            doc = member_doc(i)
            doc["statistics"]["message_count"] = b + 1
            items[key_of(i)] = doc
        t0 = time.perf_counter()
        await target.batch(items)
        times.append(time.perf_counter() - t0)
    out["batch_ms"] = 1000 * statistics.median(times)
    await target.close()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


async def writer(system: str, path: Path, index: int, seconds: float) -> dict[str, Any]:
    """One of the concurrent writer processes: its own members. It opens the store, says READY, reads the start
    time from stdin (sent once every writer has opened: an open holds the lock while it loads), then saves."""
    counts = _instrument(system)
    target = make(system, path)
    await target.open()
    docs = [member_doc(index * 1000 + j) for j in range(1000)]
    print("READY", flush=True)
    start_at = float(await asyncio.to_thread(sys.stdin.readline))
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    deadline = start_at + seconds
    cpu = time.process_time()
    n = 0
    waits: list[float] = []  # each save's time: what a writer waits for the lock shows here (json/lease.py HOLD)
    clock = time.perf_counter
    while time.time() < deadline:
        doc = docs[n % 1000]
        doc["statistics"]["message_count"] = n + 1
        began = clock()
        await target.save(index * 1000 + n % 1000, doc)
        waits.append(clock() - began)
        n += 1
    elapsed = time.time() - start_at
    if counts:
        counts["cpu_s"] = time.process_time() - cpu
    await target.close()
    waits.sort()
    return {"saves": n, "seconds": elapsed, "p99_s": waits[len(waits) * 99 // 100] if waits else 0.0,
            "max_s": waits[-1] if waits else 0.0, **({"counts": counts} if counts else {})}


def _instrument(system: str) -> dict[str, Any]:
    """``--fsync-model US``: the JSON journal's fsync becomes a GIL-free sleep of US microseconds (timer slack 1 us;
    a disk of a known, steady fsync time on tmpfs). ``--counters``: count, per writer process, the store lock's
    acquisitions, the deferred and inline commits and the time each took, the catch-ups and their time, the CPU
    time, and when it took and let go of the lock (``spans``: the parent finds the gaps between holders). Wrapped
    methods: they cost a little."""
    counts: dict[str, Any] = {}
    if not system.startswith("json"):
        return counts
    model = float(os.environ.get("STORAGE_BENCH_FSYNC_US") or 0)
    if model:
        import ctypes

        from storage.backends.json import journal

        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, in ns
        journal.sync_fd = lambda fd: time.sleep(model / 1e6)  # type: ignore[assignment]
    defer = os.environ.get("STORAGE_BENCH_DEFER_BYTES")
    if defer and system == "json":  # json-base keeps its own (the variant against the baseline)
        try:  # json/holding.py since the lock discipline left json/store.py
            from storage.backends.json import holding as defer_home
        except ImportError:
            from storage.backends.json import store as defer_home  # type: ignore[no-redef]
        defer_home.DEFER_BYTES = int(defer)
    if os.environ.get("STORAGE_BENCH_COUNTERS"):
        from storage.backends.json import lock, store, tables

        def wrap(cls: Any, name: str, key: str, timed: bool = False, when_true: bool = False) -> None:
            inner = getattr(cls, name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                got = inner(*args, **kwargs)
                if not when_true or got:
                    counts[key] = counts.get(key, 0) + 1
                if timed:
                    counts[key + "_s"] = counts.get(key + "_s", 0.0) + time.perf_counter() - t0
                return got

            setattr(cls, name, wrapper)

        wrap(lock.SidecarLock, "try_acquire", "locked_at_once", when_true=True)
        wrap(lock.SidecarLock, "adopt", "locked_after_wait", when_true=True)
        _time_hand_overs(counts, lock)
        spans: list[float] = []  # (taken, let go) pairs, wall clock: the parent finds the gaps between holders
        counts["spans"] = spans
        kinds: list[str] = []  # who let go, one per span (the caller's and its caller's function)
        counts["kinds"] = kinds
        releases: dict[str, int] = {}
        for name in ("try_acquire", "adopt"):
            took = getattr(lock.SidecarLock, name)

            def taking(*args: Any, _took: Any = took) -> Any:
                got = _took(*args)
                if got:
                    spans.append(time.time())
                return got

            setattr(lock.SidecarLock, name, taking)
        release = lock.SidecarLock.release

        def releasing(self: Any) -> None:  # the time noted while still held: recorded holds never overlap
            if self.held and len(spans) % 2:
                spans.append(time.time())
                why = f"{sys._getframe(1).f_code.co_name}<{sys._getframe(2).f_code.co_name}"
                releases[why] = releases.get(why, 0) + 1
                kinds.append(why)
            release(self)

        lock.SidecarLock.release = releasing  # type: ignore[method-assign]
        wrap(store.JsonBackend, "_commit_deferred", "deferred", timed=True)
        wrap(store.JsonBackend, "_commit_now", "commit_now", timed=True)
        wrap(tables.Tables, "catch_up", "catch_up", timed=True)
        wrap(tables.Tables, "apply_after", "apply_after", timed=True)
        if hasattr(store.JsonBackend, "_claim"):  # json/slots.py: the waiting writers' records a holder committed
            claim = store.JsonBackend._claim

            def claiming(*args: Any) -> Any:
                got = claim(*args)
                counts["claimed"] = counts.get("claimed", 0) + len(got[1])
                return got

            store.JsonBackend._claim = claiming  # type: ignore[method-assign]
            taken_by_peer = store.JsonBackend._commit_group

            async def grouped(self: Any, *args: Any) -> Any:
                if self._peer_committed:
                    counts["peer_committed"] = counts.get("peer_committed", 0) + 1
                return await taken_by_peer(self, *args)

            store.JsonBackend._commit_group = grouped  # type: ignore[method-assign]
    return counts


def _time_hand_overs(counts: dict[str, Any], lock: Any) -> None:
    """``--counters``: when, in each writer process, a waiting thread came back from ``flock`` holding the lock
    (``woke``), the event loop ran the thread's delivery (``settled``) and the loop began to adopt the descriptor
    (``adopting``): :func:`_hand_over_legs` splits each gap between two holders into those legs."""
    from storage.backends.json import holding

    marks: dict[str, list[float]] = {"woke": [], "settled": [], "adopting": []}
    counts["marks"] = marks
    woke, settled, adopting = marks["woke"], marks["settled"], marks["adopting"]
    wait_free, adopt, deliver = lock.SidecarLock.wait_free, lock.SidecarLock.adopt, holding._deliver

    def timed_wait_free(*args: Any) -> Any:
        got = wait_free(*args)
        woke.append(time.time())
        return got

    def timed_adopt(*args: Any) -> Any:
        adopting.append(time.time())
        return adopt(*args)

    def timed_deliver(loop: Any, settle: Any, result: Any, error: Any) -> None:
        def timed_settle(*args: Any) -> None:
            settled.append(time.time())
            settle(*args)

        deliver(loop, timed_settle, result, error)

    lock.SidecarLock.wait_free = timed_wait_free
    lock.SidecarLock.adopt = timed_adopt
    holding._deliver = timed_deliver


def _hand_over_legs(window: list[tuple[float, float, str]], marks: dict[str, list[float]]) -> str | None:
    """For each gap between two holders of ``window`` that a woken waiter ended: the lock let go -> the waiter's
    thread back from ``flock``; -> the loop running its delivery; -> the loop adopting it; -> adopted (the next
    hold's start). Medians and p90 in ms, or None without such gaps."""
    for times in marks.values():
        times.sort()

    def last(times: list[float], lo: float, hi: float) -> float | None:
        i = bisect.bisect_right(times, hi) - 1
        return times[i] if i >= 0 and times[i] >= lo else None

    legs: dict[str, list[float]] = {"let go -> thread back": [], "-> loop ran delivery": [], "-> adopt began": [],
                                    "-> adopted": []}
    for (_, let_go, _), (taken, _, _) in itertools.pairwise(window):
        woke = last(marks["woke"], let_go, taken)
        settled = last(marks["settled"], woke, taken) if woke is not None else None
        adopting = last(marks["adopting"], settled, taken) if settled is not None else None
        if adopting is None:
            continue
        for name, (a, b) in zip(legs, [(let_go, woke), (woke, settled), (settled, adopting), (adopting, taken)],
                                strict=True):
            legs[name].append(b - a)  # type: ignore[operator]
    if not legs["-> adopted"]:
        return None
    return f"hand-overs to a woken waiter: {len(legs['-> adopted'])}; " + ", ".join(
        f"{name} {1e3 * statistics.median(v):.3f} ms (p90 {1e3 * sorted(v)[len(v) * 9 // 10]:.3f})"
        for name, v in legs.items())


def run_writers(system: str, path: Path, seconds: float) -> tuple[float, float, float]:
    """``WRITERS`` fresh processes on one store, started together: total saves per second, and the slowest
    writer's 99th percentile and longest save (seconds)."""
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "writer", system, str(path),
                               json.dumps([w, seconds])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for w in range(WRITERS)]
    for proc in procs:  # every writer has opened the store (the opens are not part of the window)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"writer of {system} did not start")
    start_at = time.time() + 0.2
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start_at}\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"writer of {system} exited with {proc.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    late = [r for r in results if r["seconds"] > seconds * 1.5]
    if late:
        log(f"  warning: {system} writers ran {max(r['seconds'] for r in late):.2f} s for a {seconds} s window")
    held: list[tuple[float, float, str]] = []
    marks: dict[str, list[float]] = {}
    for r in results:
        if "counts" in r:
            for name, times in r["counts"].pop("marks", {}).items():
                marks.setdefault(name, []).extend(times)
            spans = r["counts"].pop("spans", [])
            held.extend(zip(spans[::2], spans[1::2], r["counts"].pop("kinds", []), strict=False))
            shown = ", ".join(f"{k} {v:.3f}" if k.endswith("_s") else f"{k} {v:.0f}"
                              for k, v in sorted(r["counts"].items()))
            log(f"    {system} writer: saves {r['saves']}, {shown}")
    if held:
        held.sort()
        window = [(a, b, why) for a, b, why in held if start_at <= a and b <= start_at + seconds]
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(window)]
        legs = _hand_over_legs(window, marks)
        if legs:
            log(f"    {system}: {legs}")
        busy = sum(b - a for a, b, _ in window)
        after: dict[str, list[float]] = {}  # the gaps by who let go before them
        for (_, _, why), gap in zip(window, gaps, strict=False):
            after.setdefault(why, []).append(gap)
        for why, some in sorted(after.items()):
            log(f"    after {why}: {len(some)} gaps, sum {sum(some):.3f} s, median {1e3 * statistics.median(some):.3f}"
                f" ms, over 2 ms: {sum(g > 0.002 for g in some)}")
        log(f"    {system}: {len(window)} holds in the window, lock held {busy:.3f} s, gaps between holders: "
            f"sum {sum(gaps):.3f} s, median {1e3 * statistics.median(gaps) if gaps else 0:.3f} ms, "
            f"max {1e3 * max(gaps, default=0):.3f} ms, over 2 ms: {sum(g > 0.002 for g in gaps)} "
            f"({sum(g for g in gaps if g > 0.002):.3f} s)")
    return (sum(r["saves"] for r in results) / max(r["seconds"] for r in results), max(r["p99_s"] for r in results),
            max(r["max_s"] for r in results))


# -- the report -----------------------------------------------------------------------------------------------------
ROWS = (  # (label, key)
    ("sequential durable save (saves/s)", "save_per_s"),
    (f"{WRITERS} writer processes, total (saves/s)", "writers_per_s"),
    (f"batch of {BATCH} upserts (ms)", "batch_ms"),
    ("get (ops/s)", "get_per_s"),
    ("open + first get (ms)", "open_first_get_ms"),
    ("peak RSS after open + first get (MiB)", "open_peak_rss_mib"),
    ("peak RSS of the whole run (MiB)", "peak_rss_mib"),
    ("size on disk (MB)", "disk_mb"),
)


def per_rep(runs: dict[str, list[dict[str, Any]]]) -> None:
    """The writer row's ratios repetition by repetition (the same repetition of each system ran back to back): how
    much the median hides."""
    full = runs.get("sqlite-full", [])
    for system in ("json", "json-base"):
        mine = runs.get(system, [])
        pairs = [(a.get("writers_per_s"), b.get("writers_per_s")) for a, b in zip(mine, full, strict=False)]
        if pairs and all(a and b for a, b in pairs):
            log(f"{system} writers / SQLite FULL per repetition: " + ", ".join(f"{a / b:.3f}" for a, b in pairs))
    base = runs.get("json-base", [])
    pairs = [(a.get("writers_per_s"), b.get("writers_per_s")) for a, b in zip(runs.get("json", []), base, strict=False)]
    if pairs and all(a and b for a, b in pairs):
        log("json / json-base writers per repetition: " + ", ".join(f"{a / b:.3f}" for a, b in pairs))


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = {k for run in runs for k in run}
    return {k: statistics.median(run[k] for run in runs if k in run) for k in keys}


def report(summary: dict[str, dict[str, float]], args: argparse.Namespace, info: dict[str, Any]) -> list[Target]:
    ours, full, normal = summary.get("json", {}), summary.get("sqlite-full", {}), summary.get("sqlite-normal", {})
    before = summary.get("json-base")
    floor = summary.get("floor", {}).get("save_per_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None  # rates: >= 1 is better; times and sizes: <= 1 is better

    rows = []
    for name, key in ROWS:
        a, f, n = ours.get(key), full.get(key), normal.get(key)
        row = [name, fmt(a), fmt(f), fmt(n), fmt(ratio(a, f)) + "x", fmt(ratio(a, n)) + "x", ""]
        if before is not None:
            b = before.get(key)
            row += [fmt(b), fmt(ratio(b, f)) + "x"]
        rows.append(row)
    if floor:
        rows.append(["append+fdatasync floor (saves/s)", "-", "-", "-", "-", "-", fmt(floor)])
        floors = [("  ours / floor", ours), ("  SQLite FULL / floor", full), ("  SQLite NORMAL / floor", normal)]
        if before is not None:
            floors.append(("  ours before / floor", before))
        for name, system in floors:
            if system.get("save_per_s"):
                rows.append([name, "-", "-", "-", "-", "-", fmt(system["save_per_s"] / floor) + "x"])
    title = (f"JSON backend vs sqlite3 {sqlite3.sqlite_version} at {args.members:,} members, medians of {args.reps} "
             f"interleaved repetitions (Python {info['python']}, {info['cpus']} cpus, {info['data_dir']}, load "
             f"{info.get('loadavg_1m', '?')}); times and sizes: ours / theirs, lower is better")
    heads = ["row", "ours", "SQLite FULL", "SQLite NORMAL", "ours/FULL", "ours/NORMAL", "floor ratio"]
    if before is not None:
        heads += ["ours before", "before/FULL"]
    print_table(heads, [row + [""] * (len(heads) - len(row)) for row in rows], title=title)

    def get(d: dict[str, float], k: str) -> float | None:
        return d.get(k)

    def r(k: str) -> float | None:
        a, b = get(ours, k), get(full, k)
        return a / b if a and b else None

    targets = [
        Target("sequential save / SQLite FULL", r("save_per_s"), ">=", 1.0, "x"),
        Target(f"{WRITERS} writer processes / SQLite FULL", r("writers_per_s"), ">=", 1.0, "x"),
        Target(f"batch of {BATCH} time / SQLite FULL", r("batch_ms"), "<=", 1.0, "x"),
        Target("get / SQLite FULL", r("get_per_s"), ">=", 2.0, "x"),
        Target("size on disk / SQLite FULL", r("disk_mb"), "<=", 1.0, "x"),
        Target("sequential save / floor", ours["save_per_s"] / floor if floor and ours.get("save_per_s") else None,
               ">=", 0.8, "x"),
        Target("open + first get (ms)", get(ours, "open_first_get_ms"), "<=", 50, "ms"),
        Target("peak RSS after open / SQLite FULL", r("open_peak_rss_mib"), "<=", 1.5, "x"),
    ]
    print_table(["target", "value", "goal", "verdict"],
                [[t.name, fmt(t.value), f"{t.op} {fmt(t.goal)}", t.verdict] for t in targets],
                title="Targets of issue 15 (informational)")
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k members, 3 repetitions, shorter rounds")
    parser.add_argument("--members", type=int, help="members in the store (default 100000, --quick 10000)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 5, --quick 3)")
    parser.add_argument("--seconds", type=float, help="length of each timed round (default 1.0, --quick 0.5)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--no-writers", action="store_true", help="skip the multi-process writer row")
    parser.add_argument("--only-writers", action="store_true",
                        help="only the multi-process writer row (no single-process rows, no floor)")
    parser.add_argument("--dir", help="where to put the data (default: the system temp dir); the disk matters")
    parser.add_argument("--baseline", help="a checkout of this repository whose JSON backend runs as one more "
                                           "system, json-base, interleaved with the others (before/after)")
    parser.add_argument("--fsync-model", type=float, metavar="US",
                        help="writer row: the JSON journal's fsync is a sleep of US microseconds (use on tmpfs)")
    parser.add_argument("--counters", action="store_true",
                        help="writer row: print each JSON writer's lock acquisitions, deferred commits, catch-up time")
    parser.add_argument("--defer-bytes", type=int, metavar="N",
                        help="writer row: json (not json-base) runs with json/holding.py's DEFER_BYTES = N")
    parser.add_argument("--worker", nargs=4, metavar=("STEP", "SYSTEM", "PATH", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        step, system, path, extra = args.worker
        if system == "json-base":  # the same JSON backend from another checkout (--baseline), imported first
            sys.path.insert(0, os.environ["STORAGE_BENCH_BASELINE"])
        params = json.loads(extra)
        steps = {"prepare": lambda: prepare(system, Path(path), *params),
                 "ops": lambda: ops(system, Path(path), *params),
                 "writer": lambda: writer(system, Path(path), *params)}
        print(json.dumps(asyncio.run(steps[step]())))
        return 0

    if args.fsync_model:
        os.environ["STORAGE_BENCH_FSYNC_US"] = str(args.fsync_model)
    if args.counters:
        os.environ["STORAGE_BENCH_COUNTERS"] = "1"
    if args.defer_bytes is not None:
        os.environ["STORAGE_BENCH_DEFER_BYTES"] = str(args.defer_bytes)
    args.members = args.members or (10_000 if args.quick else 100_000)
    args.reps = args.reps or (3 if args.quick else 5)
    args.seconds = args.seconds or (0.5 if args.quick else 1.0)
    systems = [s for s in args.systems.split(",") if s]
    if not systems or set(systems) - set(SYSTEMS):
        parser.error(f"--systems: choose among {', '.join(SYSTEMS)}")
    if args.only_writers:
        if args.no_writers:
            parser.error("--only-writers and --no-writers exclude each other")
        systems = [s for s in systems if s != "floor"]  # the floor has no writer row
    if args.baseline:
        if not (Path(args.baseline) / "storage" / "__init__.py").is_file():
            parser.error("--baseline: not a checkout of this repository (no storage/__init__.py)")
        os.environ["STORAGE_BENCH_BASELINE"] = str(Path(args.baseline).resolve())
        systems.insert(1, "json-base")

    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="bench_peers-", dir=args.dir) as tmp:
        root = Path(tmp)
        info = machine_info(tmp)
        info["orjson"] = importlib.metadata.version("orjson")
        info["sqlite"] = sqlite3.sqlite_version
        sizes: dict[str, int] = {}
        for system in systems:
            if system != "floor":  # json-base prepares its own: its sidecar format may differ (json/offsets.py)
                log(f"preparing {system} ({args.members:,} members)")
                got = run_worker(__file__, ["prepare", system, str(root / f"template-{system}"),
                                            json.dumps([args.members])])
                sizes[system] = got["bytes"]
        for rep in range(args.reps):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]  # who goes first rotates
            for system in order:
                place = root / f"{system}-{rep}"
                template = root / f"template-{system}"
                if system == "floor":
                    place.mkdir()
                else:
                    shutil.copytree(template, place)
                got = {} if args.only_writers else run_worker(
                    __file__, ["ops", system, str(place), json.dumps([args.members, args.seconds])])
                if system != "floor" and not args.no_writers:
                    if not args.only_writers:
                        shutil.rmtree(place)
                        shutil.copytree(template, place)
                    rate, p99, longest = run_writers(system, place, 2 * args.seconds)
                    got["writers_per_s"] = rate
                    got["writers_save_p99_ms"], got["writers_save_max_ms"] = 1e3 * p99, 1e3 * longest
                if template.name[len("template-"):] in sizes:
                    got["disk_mb"] = sizes[template.name[len("template-"):]] / 1e6
                runs[system].append(got)
                shutil.rmtree(place)
                shown = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(got.items()))
                log(f"rep {rep + 1}/{args.reps} {system}: {shown}")
    summary = {system: medians(r) for system, r in runs.items() if r}
    print(file=sys.stderr)
    per_rep(runs)
    targets = report(summary, args, info)
    info["wall_s"] = time.perf_counter() - started
    path = write_results("peers", {"machine": info, "members": args.members, "reps": args.reps,
                                   "seconds": args.seconds, "runs": runs, "medians": summary,
                                   "targets": [t.as_dict() for t in targets]})
    print(f"wrote {path} in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
