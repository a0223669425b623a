"""The longest event-loop stall of every public call, on each backend, at 100k members + 1M messages.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_stalls.py                        # JSON and PostgreSQL, 100k + 1M (minutes)
    .venv/bin/python benchmarks/bench_stalls.py --scale 0.1            # 10k members + 100k messages
    .venv/bin/python benchmarks/bench_stalls.py --backends json --only open,first_query

A bot's storage calls share one event loop with discord.py's gateway heartbeat: a call that keeps the loop busy
for half a second freezes the whole bot. So a 1 ms ticker task runs beside each call and records the longest gap
between two of its ticks (work done on the loop, a worker thread holding the GIL and a full garbage collection all
count: a heartbeat would wait just the same). Target: no call over 20 ms. On a loaded shared host the ticker
also counts the time the OS did not run the process at all (the idle-loop baseline row shows how much), so the
same gaps counted in the process's CPU time are reported beside it (``stall CPU``, see :class:`Ticker`: what this
process's own threads held the loop for, a worker thread holding the GIL included), and the longest single loop
step in CPU time (see :class:`StepProbe`). ``--baseline OTHER_CHECKOUT --reps N`` runs both checkouts alternately
and prints medians (before/after in one run).

Data: members in 5 guilds (``--members`` / 5 each, seed-shaped documents), messages (bench_analytics's
``Stream``: Discord-like ids, 12 months) spread over the same guilds, authored by 25% more users than each guild
has members (so ``refresh_member_statistics`` writes about 1.25x a guild's members). Each backend runs in a fresh
process; PostgreSQL runs in scratch databases (dropped afterwards) on ``--pg-admin-dsn``.
Results go to ``benchmarks/results/stalls.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script from anywhere
# storage, when not installed; a --worker imports its checkout's (first parameter, see --baseline), decided here
# because the imports below import storage themselves
sys.path.insert(1, str(json.loads(sys.argv[2])[0]) if sys.argv[1:2] == ["--worker"] and len(sys.argv) > 2
                else str(Path(__file__).resolve().parent.parent))
importlib.import_module("storage")  # that checkout's, before bench_backup puts this one's first on the path
from _common import checkouts, fmt, machine_info, peak_rss_mib, print_table, run_worker, write_results  # noqa: E402
from bench_analytics import END, Stream  # noqa: E402
from bench_backup import Places, StallWatch, busy_python, postgres_reachable  # noqa: E402

STALL_TARGET_MS = 20.0
GUILDS = 5
BATCH = 10_000
BIG_PUT = 25_000


class Data:
    """Members and messages of the benchmark (deterministic)."""

    def __init__(self, members: int, messages: int) -> None:
        self.per_guild = max(1, members // GUILDS)
        self.members = self.per_guild * GUILDS
        self.stream = Stream(messages, GUILDS, 12)
        self.rng = random.Random(99)

    def user(self, g: int, j: int) -> str:
        return str(910_000_000_000_000_000 + g * 10_000_000 + j)

    def guild(self, g: int) -> str:
        return self.stream.guild(g)

    def member(self, g: int, j: int, version: int = 0) -> dict[str, Any]:
        return {"user_id": self.user(g, j), "guild_id": self.guild(g), "join_date": "2024-01-01T00:00:00Z",
                "roles": ["member"] + (["mod"] if j % 50 == 0 else []),
                "preferences": {"notifications": bool(j % 2), "language": "ja"},
                "statistics": {"message_count": (j + version) % 5000, "last_active": "2024-06-15T12:00:00Z"}}

    def message(self, i: int) -> dict[str, Any]:
        record = self.stream.record(i)
        g = i % GUILDS
        record["author_id"] = self.user(g, self.rng.randrange(self.per_guild + self.per_guild // 4))
        return record


def log(message: str) -> None:
    print(f"[stalls] {message}", file=sys.stderr, flush=True)


class Ticker(StallWatch):
    """:class:`StallWatch` that also counts each gap between two ticks in the process's CPU time (the smaller of
    the gap and the CPU all its threads used meanwhile): ``longest_cpu``.

    Why: on a shared host the OS also leaves the whole process waiting while other processes run (an idle loop
    showed 12-22 ms gaps at load average 3-7, a thread running Python 18-73 ms), which no change here can help.
    While a worker thread holds the GIL the loop thread waits without using CPU, so the process's CPU over a gap
    is what its own threads held the loop for; time the process was not running at all does not count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.longest_cpu = 0.0

    async def _tick(self) -> None:
        last, last_cpu = time.perf_counter(), time.process_time()
        while self._running:
            await asyncio.sleep(0.001)
            now, cpu = time.perf_counter(), time.process_time()
            self.longest = max(self.longest, now - last)
            self.longest_cpu = max(self.longest_cpu, min(now - last, cpu - last_cpu))
            last, last_cpu = now, cpu


def describe(handle: asyncio.events.Handle) -> str:
    """Which callback a loop step ran (for a task: its coroutine and the line it stood at), without its arguments.

    Not ``repr(handle)``: that formats the arguments with ``reprlib``, which calls ``repr`` of an unknown object in
    full before cutting it short. A worker thread's result handed back to the loop (say 12 column blocks of 16k
    messages) took 40-55 ms to format there: the probe itself stalled the loop it measures."""
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    name = getattr(callback, "__qualname__", type(callback).__name__)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        frame = getattr(coro, "cr_frame", None)
        where = f" at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}" if frame is not None else ""
        return f"{name} of {getattr(coro, '__qualname__', type(coro).__name__)}{where}"
    return name


class StepProbe:
    """The longest single event-loop step (one callback or task step), in the loop thread's CPU time.

    Why beside the ticker: on a loaded shared host the ticker's gaps include the time the OS did not run this
    process at all (an idle loop shows 30-200 ms there); CPU time spent inside one step is what this library's
    code holds the loop for, whatever the neighbours do. It misses time the loop waits for the GIL held by a
    worker thread, which the ticker does see: read both.
    """

    def __init__(self, sample: bool = False) -> None:
        self.longest = 0.0
        self.where = ""
        self.stacks: list[tuple[int, str]] = []  # --where: the longest step's sampled stacks, most frequent first
        self.since = 0.0  # loop-thread CPU time at the last reset: a step already running then counts from here
        self._original = asyncio.events.Handle._run
        self._sample = sample
        self._began: float | None = None  # wall time the running step began (read by the sampling thread)
        self._samples: list[str] = []
        self.gcs: dict[str, tuple[int, float]] = {}  # --where: "gen2 loop" -> (collections, longest ms)
        self._gc_began = 0.0
        self._gc_cpu_began = 0.0
        self._loop_thread = 0
        #: the longest step without the garbage collections that ran inside it (loop-thread CPU): the library's
        #: own code, where 'longest' also counts a full collection of the whole process heap that landed in it
        self.longest_no_gc = 0.0
        self._gc_in_step = 0.0
        #: --where: the most objects a full collection during the call walked, and their commonest types
        self.full_heap: tuple[int, list[tuple[str, int]]] = (0, [])
        self._probe_cpu = 0.0  # --where: CPU the heap counting took inside the running step

    def install(self) -> None:
        original, probe, clock, wall = self._original, self, time.thread_time, time.perf_counter

        def _run(handle: asyncio.events.Handle) -> None:
            began = clock()
            probe._samples = []
            probe._gc_in_step = probe._probe_cpu = 0.0
            probe._began = wall()
            original(handle)
            probe._began = None
            # not the caller's own work before the call began, nor the --where heap counting
            spent = clock() - max(began, probe.since) - probe._probe_cpu
            probe.longest_no_gc = max(probe.longest_no_gc, spent - probe._gc_in_step)
            if spent > probe.longest:
                probe.longest = spent
                probe.where = describe(handle)  # the callback (a task's coroutine and where it stood)
                probe.stacks = Counter(probe._samples).most_common(4)

        asyncio.events.Handle._run = _run  # type: ignore[method-assign]
        loop_thread = self._loop_thread = threading.get_ident()
        gc.callbacks.append(self._gc_callback)
        if self._sample:
            threading.Thread(target=self._sampler, args=(loop_thread,), daemon=True).start()

    def _gc_callback(self, phase: str, info: dict[str, int]) -> None:
        """Each garbage collection's generation, duration and thread (a full one holds the GIL); the loop thread's
        collections are subtracted from the step they ran in (``longest_no_gc``)."""
        on_loop = threading.get_ident() == self._loop_thread
        if phase == "start" and self._sample and info["generation"] == 2:
            # --where: what this full collection walks (the largest during the call, with its commonest types);
            # the counting's own CPU is left out of the step's figures (it is the probe's, not the library's)
            counting = time.thread_time()
            objects = gc.get_objects()
            if len(objects) > self.full_heap[0]:
                self.full_heap = (len(objects), Counter(type(o).__name__ for o in objects).most_common(6))
            del objects
            if on_loop:
                self._probe_cpu += time.thread_time() - counting
        if phase == "start":
            self._gc_began = time.perf_counter()
            if on_loop:
                self._gc_cpu_began = time.thread_time()
            return
        spent = time.perf_counter() - self._gc_began
        if on_loop:
            self._gc_in_step += time.thread_time() - self._gc_cpu_began
        key = f"gen{info['generation']} {'loop' if on_loop else 'thread'}"
        count, longest = self.gcs.get(key, (0, 0.0))
        self.gcs[key] = (count + 1, max(longest, spent * 1000))

    def _sampler(self, loop_thread: int) -> None:
        """``--where``: every 2 ms, if the loop's current step has run for over 5 ms, note the loop thread's stack
        (the innermost frames): the longest step's most frequent stacks say where its time went."""
        while True:
            time.sleep(0.002)
            began = self._began
            if began is None or time.perf_counter() - began < 0.005:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is None:
                continue
            frames = traceback.extract_stack(frame)[-8:]
            self._samples.append(" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)))

    def reset(self) -> None:
        """Start a new measurement (from the loop thread: the step running now counts from here on)."""
        self.longest = 0.0
        self.where = ""
        self.gcs = {}
        self.longest_no_gc = 0.0
        self.full_heap = (0, [])
        self.since = time.thread_time()


class Promotions:
    """``--promoted``: the objects each middle-generation collection moved to the oldest generation during a call,
    by kind (what, once their count passes a quarter of the oldest generation, sets off a full collection, whose
    cost is the whole heap's). Deterministic where the stall figures are not: the lever for the full collections
    a call sets off is here. Diagnosis only (its counting allocates, so it moves the collections it counts)."""

    def __init__(self) -> None:
        self.promoted = 0
        self.kinds: Counter[str] = Counter()
        self._before: set[int] = set()
        gc.callbacks.append(self._seen)

    @staticmethod
    def kind(o: object) -> str:
        name = type(o).__name__
        if isinstance(o, tuple):
            return f"tuple[{len(o)}]({','.join(type(x).__name__ for x in o[:4])})"
        if isinstance(o, list):
            return f"list[{'0' if not o else '1' if len(o) == 1 else 'n'}]({type(o[0]).__name__ if o else ''})"
        if isinstance(o, dict):
            return f"dict({','.join(str(k)[:12] for k in list(o)[:4])})"
        if name in ("function", "cell", "frame", "coroutine", "generator"):
            code = getattr(o, "__code__", None) or getattr(o, "gi_code", None) or getattr(o, "cr_code", None)
            if code is not None:
                return f"{name}({Path(code.co_filename).name}:{code.co_name})"
        return name

    def _seen(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 1:
            return
        if phase == "start":
            self._before = {id(o) for o in gc.get_objects(generation=2)}
            return
        new = [o for o in gc.get_objects(generation=2) if id(o) not in self._before]
        self.promoted += len(new)
        self.kinds.update(self.kind(o) for o in new)
        del new
        self._before = set()

    def reset(self) -> None:
        self.promoted = 0
        self.kinds = Counter()


class GilWatch:
    """``--holders``: a thread that sleeps 1 ms at a time; when it wakes more than HOLD_MS late, it notes where
    every other busy thread stands. The GIL is handed over between bytecodes, so a thread that kept it through one
    long C call (a big ``orjson.loads``, ``sorted``, a dict resize...) is found just after that call: its innermost
    frame's line is the call. Where the loop thread shows a step instead, the stall was the loop's own work.

    Each finding starts with the CPU the loop thread and the whole process used while the sleeper waited. Read it
    first: when the loop thread used about all of it, the sleeper was kept waiting by the loop, not the loop by
    anyone (a loop that makes system calls between short steps lets go of the GIL and takes it back at each one,
    and a waiter's switch request is only made after a whole switch interval with no hand-over: the same convoy as
    in ``storage.offload.Pacer``, the other way round); a late wake of the sleeper is then no stall of the loop,
    whatever the loop's stack shows (``lock.py _same_file``, ``lexists``: their GIL releases are where the sleeper
    finally got in). When neither used much, the OS did not run the process."""

    HOLD_MS = 8.0
    _IDLE = ("threading.py", "queue.py", "selectors.py", "thread.py")

    def __init__(self) -> None:
        self.found: list[tuple[float, list[str]]] = []
        self._loop_clock = time.pthread_getcpuclockid(threading.get_ident())  # made on the loop's thread
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        me = threading.get_ident()
        clock = self._loop_clock
        while True:
            began = time.perf_counter()
            loop_cpu, cpu = time.clock_gettime(clock), time.process_time()
            time.sleep(0.001)
            late = (time.perf_counter() - began) * 1000 - 1
            if late < self.HOLD_MS:
                continue
            loop_spent = (time.clock_gettime(clock) - loop_cpu) * 1000
            spent = (time.process_time() - cpu) * 1000
            names = {t.ident: t.name for t in threading.enumerate()}
            stacks = []
            for ident, frame in sys._current_frames().items():
                if ident == me or Path(frame.f_code.co_filename).name in self._IDLE:
                    continue
                parts: list[str] = []
                f: Any = frame
                while f is not None and len(parts) < 5:
                    parts.append(f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}")
                    f = f.f_back
                stacks.append(f"[{names.get(ident, ident)}] " + " < ".join(parts))
            self.found.append((late, [f"(meanwhile CPU: the loop thread {loop_spent:.1f} ms, the process "
                                      f"{spent:.1f} ms)", *stacks]))

    def reset(self) -> None:
        self.found = []

    def top(self, n: int = 6) -> list[tuple[float, list[str]]]:
        return sorted(self.found, key=lambda item: -item[0])[:n]


async def worker(backend: str, members: int, messages: int, root: str, admin_dsn: str | None,
                 only: list[str], sample: bool = False, freeze: bool = False,
                 holders: bool = False, promoted: bool = False) -> dict[str, Any]:
    import storage
    from storage.backup.copy import copy
    from storage.cli import build_parser
    from storage.commands.core import run_status

    data = Data(members, messages)
    places = Places(Path(root), admin_dsn)
    results: dict[str, dict[str, float]] = {}

    def wanted(name: str) -> bool:
        return not only or name in only

    probe = StepProbe(sample)
    probe.install()
    gil = GilWatch() if holders else None
    promotions = Promotions() if promoted else None

    async def watch(name: str, op: Callable[[], Awaitable[Any]]) -> Any:
        heap = Counter(type(o).__name__ for o in gc.get_objects()) if sample else None  # what a full GC visits
        watcher = Ticker()
        started = time.perf_counter()
        probe.reset()
        if gil is not None:
            gil.reset()
        if promotions is not None:
            promotions.reset()
        result = await watcher.watch(op)
        results[name] = {"seconds": time.perf_counter() - started, "stall_ms": watcher.longest * 1000,
                         "stall_cpu_ms": watcher.longest_cpu * 1000,
                         "step_cpu_ms": probe.longest * 1000, "longest_step": probe.where,
                         "step_no_gc_ms": probe.longest_no_gc * 1000,
                         "full_gcs": sum(v[0] for k, v in probe.gcs.items() if k.startswith("gen2")),
                         "longest_full_gc_ms": max([v[1] for k, v in probe.gcs.items() if k.startswith("gen2")],
                                                   default=0.0)}
        if probe.stacks:
            results[name]["stacks"] = probe.stacks
        if gil is not None:
            results[name]["holders"] = gil.top()
        if promotions is not None:
            results[name]["promoted"] = [promotions.promoted, promotions.kinds.most_common(12)]
        if probe.gcs:
            results[name]["gc"] = probe.gcs
        if heap is not None:
            results[name]["tracked_before"] = [sum(heap.values()), heap.most_common(6)]
        if probe.full_heap[0]:
            results[name]["tracked_at_full_gc"] = list(probe.full_heap)
        log(f"{backend}: {name}: {results[name]['seconds']:.3f} s, longest stall {watcher.longest * 1000:.1f} ms, "
            f"longest loop step {probe.longest * 1000:.1f} ms CPU")
        return result

    await watch("(baseline: idle event loop, 2 s)", lambda: asyncio.sleep(2))
    await watch("(baseline: a thread running Python, 2 s)", lambda: asyncio.to_thread(busy_python, 2.0))

    try:
        source_config = await places.config(backend, "source")
        store: Any = await storage.open_store(config=source_config)
        log(f"{backend}: filling {data.members:,} members + {messages:,} messages")
        for g in range(GUILDS):
            for start in range(0, data.per_guild, BATCH):
                await store.batch_update_members(
                    [{"user_id": data.user(g, j), "guild_id": data.guild(g), "data": data.member(g, j)}
                     for j in range(start, min(data.per_guild, start + BATCH))])
        longest = longest_cpu = longest_step = no_gc = longest_gc = 0.0
        full_gcs = 0
        stacks: list[tuple[int, str]] = []
        for start in range(0, messages, BATCH):
            batch = [data.message(i) for i in range(start, min(messages, start + BATCH))]
            watcher = Ticker()
            probe.reset()
            await watcher.watch(lambda batch=batch: store.record_messages(batch))
            longest, no_gc = max(longest, watcher.longest), max(no_gc, probe.longest_no_gc)
            longest_cpu = max(longest_cpu, watcher.longest_cpu)
            fulls = [v for k, v in probe.gcs.items() if k.startswith("gen2")]
            full_gcs += sum(v[0] for v in fulls)
            longest_gc = max([longest_gc, *(v[1] for v in fulls)])
            if probe.longest > longest_step:
                longest_step, stacks = probe.longest, probe.stacks
            del batch  # the caller's records are garbage once recorded (kept, every full collection visits them)
        results[f"record_messages ({BATCH:,} a call)"] = {
            "seconds": 0.0, "stall_ms": longest * 1000, "stall_cpu_ms": longest_cpu * 1000,
            "step_cpu_ms": longest_step * 1000, "stacks": stacks,
            "step_no_gc_ms": no_gc * 1000, "full_gcs": full_gcs, "longest_full_gc_ms": longest_gc}
        await watch("close (after the fill)", store.close)

        store = await watch("open", lambda: storage.open_store(config=source_config))
        if freeze:  # --gc-freeze: what the bot could choose (the library never does): the heap so far made permanent
            gc.collect()
            gc.freeze()
        g0, g1 = data.guild(0), data.guild(1)
        await watch("first analytics query after open (top_authors)", lambda: store.top_authors(g0))
        await watch("get_member_data", lambda: store.get_member_data(data.user(0, 1), g0))
        await watch("save_member_data", lambda: store.save_member_data(data.user(0, 1), g0, data.member(0, 1, 7)))
        await watch("message_counts(by=day)", lambda: store.message_counts(g1, by="day"))

        async def listing() -> int:
            return len([key async for key, _doc in store.items("members", prefix=g1 + "_")])

        await watch(f"items(members, prefix=guild) ({data.per_guild:,})", listing)
        if wanted("put_many"):
            big = {f"k{i:06d}": data.member(2, i, 3) for i in range(BIG_PUT)}
            await watch(f"put_many of {BIG_PUT:,} documents", lambda: store.put_many("bulk", big))
            del big  # the caller's input is garbage once written (kept, every later full collection visits it)
        await watch("refresh_member_statistics(guild)", lambda: store.refresh_member_statistics(g1))
        if backend == "json":
            await watch("compact", store.compact)
        if wanted("backup"):
            info = await watch("create_backup", store.create_backup)
            target_config = await places.config(backend, "restored")
            async with storage.open_store(config=target_config) as target:
                await watch("restore_backup(dry_run=True), empty target",
                            lambda: target.restore_backup(info.id, dry_run=True))
                await watch("restore_backup, empty target", lambda: target.restore_backup(info.id))
            async with storage.open_store(config=await places.config(backend, "copy")) as target:
                await watch("copy to an empty store (+ verify)", lambda: copy(store, target))

        async def delete_guild() -> int:
            n = 0
            async with store.transaction() as tx:
                async for key, _doc in tx.items("members", prefix=data.guild(4) + "_"):
                    await tx.delete("members", key)
                    n += 1
            return n

        await watch(f"transaction: list + delete a guild's {data.per_guild:,} members", delete_guild)
        await watch("prune_messages (oldest month)",
                    lambda: store.prune_messages(END - timedelta(days=30 * 11)))
        if wanted("lifecycle"):
            async def forget_in_transaction() -> dict[str, int]:
                async with store.transaction() as tx:
                    counts: dict[str, int] = await tx.forget_guild(data.guild(3))
                return counts

            await watch("export_user", lambda: store.export_user(data.user(0, 5)))
            await watch("forget_user", lambda: store.forget_user(data.user(0, 5)))
            await watch(f"transaction: forget_guild ({data.per_guild:,} members)", forget_in_transaction)
            await watch(f"forget_guild ({data.per_guild:,} members)", lambda: store.forget_guild(data.guild(2)))
        await watch("close", store.close)

        if wanted("status"):
            argv = ["status", "--backend", backend]
            argv += ["--path", source_config.path] if backend == "json" else ["--dsn", str(source_config.dsn)]
            args = build_parser().parse_args(argv)
            with contextlib.redirect_stdout(io.StringIO()):
                await watch("status (CLI: open, counts, message summary, backups, close)", lambda: run_status(args))
    finally:
        await places.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return {"backend": backend, "members": data.members, "messages": messages, "results": results,
            "peak_rss_mib": peak_rss_mib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: 100k members + 1M messages")
    parser.add_argument("--backends", default="json,postgres", help="comma-separated (default %(default)s)")
    parser.add_argument("--only", default="", help="skip optional groups not listed: put_many,backup,lifecycle,status")
    parser.add_argument("--pg-admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a server where scratch databases may be created (default %(default)s)")
    parser.add_argument("--dir", default=None, help="where JSON stores and backups go (default: system temp)")
    parser.add_argument("--where", action="store_true",
                        help="sample the loop thread's stack during long steps; print where the longest went")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="after the open, gc.collect() + gc.freeze() (a bot's own choice: full collections then "
                             "walk only what was made since; the library never calls it)")
    parser.add_argument("--baseline", help="another checkout of this repository, run alternately with this one "
                                           "(before/after in one run)")
    parser.add_argument("--reps", type=int, default=1,
                        help="runs of each checkout and backend, interleaved; the table shows medians (default 1)")
    parser.add_argument("--holders", action="store_true",
                        help="a 1 ms sleeper thread notes where every busy thread stands when it wakes over 8 ms "
                             "late: which worker-thread call held the GIL (perturbs the figures: diagnosis only)")
    parser.add_argument("--promoted", action="store_true",
                        help="per call, the objects the middle-generation collections moved to the oldest one (what "
                             "sets off full collections), by kind (diagnosis only)")
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        params = json.loads(args.worker[0])
        print(json.dumps(asyncio.run(worker(*params[1:]))))
        return 0

    members, messages = int(100_000 * args.scale), int(1_000_000 * args.scale)
    only = [o for o in args.only.split(",") if o]
    backends = [b for b in args.backends.split(",") if b]
    systems = checkouts(parser, __file__, args.baseline)
    notes = []
    if "postgres" in backends:
        why = asyncio.run(postgres_reachable(args.pg_admin_dsn))
        if why is not None:
            notes.append(f"postgres skipped: {why}")
            backends.remove("postgres")
    started = time.perf_counter()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {b: [] for b in backends} for s in systems}
    for rep in range(args.reps):
        for system, checkout in systems.items():
            for backend in backends:
                if len(systems) > 1 or args.reps > 1:
                    log(f"rep {rep + 1}/{args.reps}: {system} {backend}")
                root = tempfile.mkdtemp(prefix=f"bench_stalls_{backend}_", dir=args.dir)
                admin = args.pg_admin_dsn if backend == "postgres" else None
                runs[system][backend].append(run_worker(__file__, [json.dumps(
                    [checkout, backend, members, messages, root, admin, only, args.where, args.gc_freeze,
                     args.holders, args.promoted])],
                    timeout=3600))
    columns = [(s, b) for b in backends for s in systems]
    names: list[str] = []
    for per_backend in runs.values():
        for results in per_backend.values():
            for result in results:
                names += [n for n in result["results"] if n not in names]
    rows = []
    for name in names:
        row: list[object] = [name]
        for system, backend in columns:
            got = [r["results"][name] for r in runs[system][backend] if name in r["results"]]
            if not got:
                row += ["-"] * 6
                continue

            def median(key: str, got: list[dict[str, Any]] = got) -> float:
                return statistics.median(g.get(key) or 0.0 for g in got)

            stall, step, no_gc = median("stall_ms"), median("step_cpu_ms"), median("step_no_gc_ms")
            fulls = median("full_gcs")
            stall_cpu = median("stall_cpu_ms")
            row += [fmt(median("seconds")) if median("seconds") else "-",
                    fmt(stall) + (" MISS" if stall > STALL_TARGET_MS else ""),
                    fmt(stall_cpu) + (" MISS" if stall_cpu > STALL_TARGET_MS else ""),
                    fmt(step) + (" MISS" if step > STALL_TARGET_MS else ""),
                    fmt(no_gc) + (" MISS" if no_gc > STALL_TARGET_MS else ""),
                    "-" if not fulls else f"{fmt(fulls)} ({fmt(median('longest_full_gc_ms'))})"]
        rows.append(row)
    heads = ["call"] + [f"{b}{'' if len(systems) == 1 else ' ' + s} {what}" for s, b in columns
                        for what in ("s", "stall ms", "stall CPU ms", "step CPU ms", "step w/o GC ms",
                                     "full GCs (longest ms)")]
    reps = "" if args.reps == 1 else f", medians of {args.reps} interleaved runs"
    print_table(heads, rows, title=f"longest event-loop stall per call (1 ms ticker: 'stall'; the same gap counted "
                                   f"in the process's CPU time, without the time the OS ran other processes: "
                                   f"'stall CPU'; the longest single loop "
                                   f"step in the loop thread's CPU time: 'step CPU'; the same without the garbage "
                                   f"collections that ran inside it: 'w/o GC'; full collections during the call, "
                                   f"any thread), {members:,} members + "
                                   f"{messages:,} messages; target <= {STALL_TARGET_MS:.0f} ms{reps}")
    for note in notes:
        print(note)
    info = machine_info(args.dir)
    info["wall_s"] = time.perf_counter() - started
    last = {b: runs[next(reversed(systems))][b][-1] for b in backends}  # this checkout's last run, as before
    path = write_results("stalls", {"machine": info, "members": members, "messages": messages, "backends": last,
                                    "systems": systems, "runs": runs, "notes": notes})
    print(f"wrote {path} in {info['wall_s']:.0f} s")
    if args.holders:
        for system in systems:
            for backend in backends:
                label = backend if len(systems) == 1 else f"{system} {backend}"
                for name, got in runs[system][backend][-1]["results"].items():
                    for late, stacks in got.get("holders", []):
                        print(f"{label}: {name}: the sleeper woke {late:.1f} ms late; busy threads:")
                        for stack in stacks:
                            print(f"    {stack}")
    if args.promoted:
        for system in systems:
            for backend in backends:
                label = backend if len(systems) == 1 else f"{system} {backend}"
                for name, got in runs[system][backend][-1]["results"].items():
                    if "promoted" in got and got["promoted"][0]:
                        print(f"{label}: {name}: {got['promoted'][0]} objects promoted to the oldest generation; "
                              f"full collections {got.get('full_gcs', 0)}; by kind:")
                        for kind, count in got["promoted"][1]:
                            print(f"    {count:7d} {kind}")
    if args.where:
        for system in systems:
            for backend in backends:
                for name, got in runs[system][backend][-1]["results"].items():
                    label = backend if len(systems) == 1 else f"{system} {backend}"
                    if got.get("step_cpu_ms", 0) > STALL_TARGET_MS / 2 and got.get("stacks"):
                        print(f"\n{label}: {name}: longest step {got['step_cpu_ms']:.1f} ms CPU, sampled stacks:")
                        for stack, count in got["stacks"]:
                            print(f"  {count:3d}x {stack}")
                    full = {k: v for k, v in got.get("gc", {}).items() if k.startswith("gen2")}
                    if full:
                        print(f"{label}: {name}: full collections (count, longest ms): {full}; objects tracked "
                              f"before the call: {got.get('tracked_before')}; at the largest full collection "
                              f"during it: {got.get('tracked_at_full_gc')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
