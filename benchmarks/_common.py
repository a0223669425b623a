"""What every benchmark script shares: timed loops, memory readings, targets, a plain table, the results file.

Why these exist: this machine is noisy and fsync on it is cheap, so absolute numbers move from run to run. The
benchmarks therefore measure in short *rounds* and report medians, compare against a baseline measured in the same
run (ratios), and run each data size in a fresh subprocess (:func:`run_worker`) so that one size's peak memory
never shows up in another's. Keep this module free of any backend: a Postgres benchmark uses it as well.

API (small on purpose):

* :func:`timed` / :func:`atimed` -- run an operation for about ``seconds`` (at least ``min_ops`` times), return
  a :class:`Rate`; :func:`median_rate` folds several rounds into one.
* :func:`peak_rss_mib` / :func:`rss_mib` -- this process's peak and current resident memory.
* :class:`Target` -- a number with a goal; ``.verdict`` is ``PASS`` / ``MISS`` / ``n/a``.
* :func:`print_table` -- fixed-width text table; :func:`write_results` -- ``benchmarks/results/<name>.json``.
* :func:`run_worker` -- run ``script --worker ...`` in a fresh interpreter and return the JSON it printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MEMBERS_PER_GUILD",
    "GUILD_BASE",
    "USER_BASE",
    "member_ids",
    "member_doc",
    "concurrent_rate",
    "RESULTS_DIR",
    "Rate",
    "Target",
    "atimed",
    "checkouts",
    "fmt",
    "machine_info",
    "median_rate",
    "peak_rss_mib",
    "print_table",
    "rss_mib",
    "run_worker",
    "timed",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Rate:
    """``ops`` operations done in ``seconds`` of wall time."""

    ops: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else float("inf")

    @property
    def ms_per_op(self) -> float:
        return 1000.0 * self.seconds / self.ops if self.ops else float("nan")


def timed(op: Callable[[int], object], *, seconds: float, min_ops: int = 1, max_ops: int = 10**9) -> Rate:
    """Call ``op(i)`` for i = 0, 1, ... until ``seconds`` passed and ``min_ops`` were done (or ``max_ops``)."""
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    done = 0
    while done < max_ops and (done < min_ops or clock() < deadline):
        op(done)
        done += 1
    return Rate(done, clock() - start)


async def atimed(op: Callable[[int], Awaitable[object]], *, seconds: float, min_ops: int = 1,
                 max_ops: int = 10**9) -> Rate:
    """:func:`timed` for a coroutine function: each call is awaited before the next one starts."""
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    done = 0
    while done < max_ops and (done < min_ops or clock() < deadline):
        await op(done)
        done += 1
    return Rate(done, clock() - start)


async def concurrent_rate(op: Callable[[int], Awaitable[object]], *, writers: int, seconds: float) -> Rate:
    """``writers`` coroutines calling ``op`` in a loop for ``seconds``: total completed calls per second.

    Writer ``w`` passes ``w * 256, w * 256 + 1, ...`` so writers touch distinct keys.
    """
    clock = time.perf_counter
    deadline = clock() + seconds
    counts = [0] * writers

    async def writer(w: int) -> None:
        n = w * 256
        while clock() < deadline:
            await op(n)
            n += 1
            counts[w] += 1

    start = clock()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return Rate(sum(counts), clock() - start)


def median_rate(rounds: Sequence[Rate]) -> float:
    """Median ops/s over rounds: one slow round (a neighbour's burst of I/O) does not move it."""
    return statistics.median(r.per_second for r in rounds)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mib() -> float:
    """Current resident memory of this process (from /proc on Linux; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return peak_rss_mib()


@dataclass(frozen=True)
class Target:
    """A measured value and its goal, e.g. ``Target("get ops/s", 120_000, ">=", 100_000)``.

    Targets are informational: a benchmark prints the verdict but never fails on it (the machine is shared).
    ``value=None`` means the number was not measured in this run (``n/a``).
    """

    name: str
    value: float | None
    op: str  # ">=" or "<="
    goal: float
    unit: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.op == ">=" else self.value <= self.goal

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.met]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "op": self.op, "goal": self.goal, "unit": self.unit,
                "verdict": self.verdict}


def fmt(value: float | None, digits: int = 3) -> str:
    """A number in a table cell: ``digits`` significant figures, thousands separated, ``-`` when missing."""
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:,.{digits}g}" if value else "0"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None) -> None:
    """Print a left-aligned first column and right-aligned others, sized to fit (no third-party dependency)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    if title:
        print(title)
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
    print()


def machine_info(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the numbers depend on, saved beside them."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hasattr(os, "getloadavg"):  # a busy neighbour explains a slow run: keep the load beside the numbers
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if data_dir is not None:
        info["data_dir"] = os.fspath(data_dir)
    return info


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (git-ignored) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def run_worker(script: str | os.PathLike[str], args: Sequence[str], *, timeout: float = 600) -> Any:
    """Run ``python script --worker ARGS`` in a fresh interpreter and return the JSON of its last stdout line.

    A fresh process per measurement keeps peak memory and warm caches of one data size out of the next. The
    worker's stderr passes through, so its progress lines show while it runs.
    """
    cmd = [sys.executable, os.fspath(script), "--worker", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-2000:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"worker {' '.join(args)} printed nothing")
    return json.loads(lines[-1])


#: The environment variables through which a benchmark tells its workers where to put their data and how long a
#: modelled fsync takes (see :func:`apply_worker_env`).
DIR_ENV, FSYNC_SLEEP_ENV = "STORAGE_BENCH_DIR", "STORAGE_BENCH_FSYNC_SLEEP_US"


def model_fsync(seconds: float) -> None:
    """In this (worker) process only: ``os.fdatasync`` and ``os.fsync`` become a sleep of ``seconds``, which, like a
    real fsync, releases the GIL. Why: on a night when the shared disk's fsync takes 0.2-4 ms and moves from one
    second to the next, it decides every durable figure; with the data on a tmpfs and the fsync modelled as a fixed
    sleep, what is left to compare between two checkouts is their CPU (and their use of the time the fsync waits)."""
    import time as _time

    def sleep(fd: int) -> None:
        _time.sleep(seconds)

    os.fdatasync = sleep  # type: ignore[assignment]
    os.fsync = sleep  # type: ignore[assignment]


def apply_worker_env() -> str | None:
    """In a worker: model the fsync if its benchmark was asked to (:data:`FSYNC_SLEEP_ENV`, microseconds), and
    return the folder to put the data in (:data:`DIR_ENV`; None: the system temp dir)."""
    sleep_us = os.environ.get(FSYNC_SLEEP_ENV)
    if sleep_us:
        model_fsync(float(sleep_us) / 1e6)
    return os.environ.get(DIR_ENV) or None


def checkouts(parser: argparse.ArgumentParser, script: str | os.PathLike[str], baseline: str | None) -> dict[str, str]:
    """The checkouts a ``--baseline`` benchmark runs, in order: ``{"base": <baseline>, "this": <this one>}``, or
    only ``"this"`` without a baseline (the repository ``script`` sits in). A ``baseline`` that is not a checkout
    of this repository is a usage error (``parser.error``)."""
    here = str(Path(script).resolve().parent.parent)
    if not baseline:
        return {"this": here}
    if not (Path(baseline) / "storage" / "__init__.py").is_file():
        parser.error("--baseline: not a checkout of this repository (no storage/__init__.py)")
    return {"base": str(Path(baseline).resolve()), "this": here}


# -- the member documents every benchmark writes --------------------------------------------------------------------
MEMBERS_PER_GUILD = 1000
GUILD_BASE = 800_000_000_000_000_000  # 18-digit snowflakes, like real Discord ids
USER_BASE = 300_000_000_000_000_000


def member_ids(i: int) -> tuple[int, int]:
    """(user_id, guild_id) of member number ``i``: 1000 members per guild."""
    return USER_BASE + i, GUILD_BASE + i // MEMBERS_PER_GUILD


def member_doc(i: int, version: int = 0) -> dict[str, Any]:
    """A member in the seed's documented shape (about 240 bytes of JSON); ``version`` changes its counters."""
    user_id, guild_id = member_ids(i)
    day = 1 + i % 28
    return {
        "user_id": str(user_id),
        "guild_id": str(guild_id),
        "join_date": f"2024-{1 + i % 12:02d}-{day:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
        "roles": [f"role{(i + k) % 40}" for k in range(1 + i % 4)],
        "preferences": {"notifications": i % 3 != 0, "language": ("ja", "en", "de", "fr")[i % 4]},
        "statistics": {
            "message_count": (i * 7 + version) % 100_000,
            "last_active": f"2024-06-{day:02d}T{(i + version) % 24:02d}:{version % 60:02d}:00Z",
        },
    }
