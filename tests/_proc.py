"""Starting child processes of tests/_child.py with a store config (shared by the process tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from storage import StoreConfig

CHILD = Path(__file__).with_name("_child.py")
ROOT = Path(__file__).resolve().parent.parent


def config_arg(config: StoreConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def spawn(mode: str, config: StoreConfig, *args: object, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, str(CHILD), mode, config_arg(config), *map(str, args)],
        stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
    )


async def read_until(child: subprocess.Popen[str], marker: str) -> float:
    """Read a child's output lines until one starts with ``marker``; returns when (monotonic). A child that ends
    first fails the test with its stderr."""
    assert child.stdout is not None
    while True:
        line = await asyncio.to_thread(child.stdout.readline)
        if not line:
            raise AssertionError(f"the child ended before {marker!r}: {child.stderr.read() if child.stderr else ''}")
        if line.startswith(marker):
            return time.monotonic()


async def crash_writer_round(config: StoreConfig, start: int, window: float, *args: object) -> list[int]:
    """One round of the kill -9 tests: a ``crash-writer`` child writes from ``start`` and is killed ``window``
    seconds after its first acknowledged write (counted from there, not from the spawn: on a loaded machine the
    interpreter's start alone can take seconds, and a kill before the open tests nothing). Returns the numbers it
    acknowledged."""
    proc = spawn("crash-writer", config, start, *args)
    assert proc.stdout is not None
    first = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=60)
    deadline = time.monotonic() + window
    while time.monotonic() < deadline and proc.poll() is None:
        await asyncio.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    out, _err = proc.communicate(timeout=30)
    return [int(line.split()[1]) for line in (first + out).splitlines()
            if line.startswith("ACK ") and line.count(" ") == 1]


def assert_crash_writes(docs: dict[str, Any], acks: list[int]) -> None:
    """Every write the ``crash-writer`` child acknowledged is in ``docs`` (the ``crash`` collection, reopened)."""
    for n in acks:
        if n % 7 == 0:
            assert docs[f"k{n}"] == {"n": n, "pad": "x" * 200} and docs[f"m{n}"] == {"n": -n}
        elif n % 11 == 0:
            assert docs["counter"]["n"] >= n
        else:
            assert docs[f"k{n}"] == {"n": n, "pad": "y" * (n % 300)}
