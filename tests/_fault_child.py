"""Child-process workloads for the fault tests (``python tests/_fault_child.py MODE CONFIG ...``).

Each workload prints what the store acknowledged (``ACK``), what it reported as failed (``FAIL``) and what it read
(``SEEN``), one line each and flushed at once, so the parent can compare them with what is on disk afterwards even
if the child is killed or traced. Anything else the library raises is not caught: the child then exits non-zero
with the traceback on stderr, and the test fails showing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import storage
from storage import StorageIOError, StoreConfig
from storage.backends.json import holding

holding.OFFER_MIN_SYNC = 0.0  # a waiting writer always offers its record (tests/conftest.py ``offers_always``)

CHILD = Path(__file__).resolve()
ROOT = CHILD.parent.parent


def command(mode: str, config: StoreConfig, *args: object) -> list[str]:
    """The argv that runs ``mode`` in a child process (for wrapping in strace)."""
    return [sys.executable, str(CHILD), mode, json.dumps(dataclasses.asdict(config)), *map(str, args)]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def spawn(mode: str, config: StoreConfig, *args: object, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*(prefix or []), *command(mode, config, *args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())


def strace_problem() -> str | None:
    """None when strace can trace and inject here, else why not."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=fdatasync",
                            "-e", "inject=fdatasync:error=EIO:when=1",
                            sys.executable, "-c", "import os, tempfile\nwith tempfile.TemporaryFile() as f:\n"
                            "    try: os.fdatasync(f.fileno())\n    except OSError as e: print(e.errno)"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or probe.stdout.strip() != str(errno.EIO):
        return f"strace cannot inject faults here (ptrace not permitted?): {probe.stderr.strip()[:200]}"
    return None


def lines(out: str, tag: str) -> list[list[str]]:
    """The fields after ``tag`` of every complete line starting with it."""
    return [line.split()[1:] for line in out.splitlines() if line.split()[:1] == [tag]]


async def reader(config: StoreConfig, stop_file: str, keys: list[str]) -> None:
    """Read ``keys`` of collection ``f`` in a loop until ``stop_file`` exists; print every value seen."""
    store = await storage.open_store(config=config)
    print("READY", flush=True)
    last: dict[str, Any] = {}
    rounds = 0
    try:
        while not os.path.exists(stop_file):
            docs = await store.get_many("f", keys)
            for key, doc in docs.items():
                if last.get(key) != doc:
                    last[key] = doc
                    print(f"SEEN {key} {doc['i']}", flush=True)
            rounds += 1
            await asyncio.sleep(0)
    finally:
        await store.close()
    print(f"DONE {rounds}", flush=True)


async def acker(config: StoreConfig, prefix: str, count: int) -> None:
    """``count`` writes: puts of ``<prefix><i>`` plus ``<prefix>last`` (put_many, or a transaction), and
    increments of ``<prefix>counter``.

    Prints ``ACK i`` / ``FAIL i`` (a StorageIOError: reported as not committed) after each.
    """
    store = await storage.open_store(config=config)
    try:
        for i in range(count):
            if i % 3 == 2:
                await _report(i, store.update("f", f"{prefix}counter", lambda d: {"i": d.get("i", 0) + 1}))
            elif i % 3 == 1:
                await _report(i, _in_transaction(store, prefix, i))
            else:
                await _report(i, store.put_many("f", {f"{prefix}{i}": {"i": i}, f"{prefix}last": {"i": i}}))
    finally:
        await store.close()
    print("DONE", flush=True)


async def _in_transaction(store: Any, prefix: str, i: int) -> None:
    async with store.transaction() as tx:
        await tx.put("f", f"{prefix}{i}", {"i": i})
        await tx.put("f", f"{prefix}last", {"i": i})


async def _report(i: int, write: Awaitable[Any]) -> None:
    """Await one write of a writer and print ``ACK i``, or ``FAIL i errno`` for a StorageIOError (reported as not
    committed)."""
    try:
        await write
    except StorageIOError as exc:
        print(f"FAIL {i} {exc.errno}", flush=True)
    else:
        print(f"ACK {i}", flush=True)


async def batcher(config: StoreConfig, prefix: str, count: int, size: int) -> None:
    """``count`` batches: ``put_many`` of ``size`` documents ``<prefix><i>-<j>`` plus ``<prefix>last``, each
    ``{"i": i}`` (padded). Prints ``ACK i`` / ``FAIL i errno`` (a StorageIOError: reported as not committed) after
    each."""
    store = await storage.open_store(config=config)
    try:
        for i in range(count):
            docs = {f"{prefix}{i}-{j}": {"i": i, "pad": "x" * 200} for j in range(size)}
            docs[f"{prefix}last"] = {"i": i}
            await _report(i, store.put_many("f", docs))
    finally:
        await store.close()
    print("DONE", flush=True)


async def counter(config: StoreConfig, count: int) -> None:
    """``count`` increments of ``f/counter``, printing ``ACK`` after each returned."""
    store = await storage.open_store(config=config)
    try:
        for _ in range(count):
            await store.update("f", "counter", lambda d: {"i": d.get("i", 0) + 1})
            print("ACK", flush=True)
    finally:
        await store.close()
    print("DONE", flush=True)


async def create(config: StoreConfig) -> None:
    """Open (creating the folder), write a document and a message (creating messages/<guild>/), take a backup
    (creating the backup folder), close."""
    async with storage.open_store(config=config) as store:
        await store.put("f", "k", {"i": 1})
        await store.record_messages([{"message_id": "1", "guild_id": "7", "channel_id": "3", "author_id": "4",
                                      "timestamp": "2026-01-02T03:04:05Z", "content_length": 2}])
        await store.create_backup()
    print("DONE", flush=True)


def main() -> None:
    mode, config = sys.argv[1], StoreConfig(**json.loads(sys.argv[2]))
    args = sys.argv[3:]
    if mode == "reader":
        asyncio.run(reader(config, args[0], args[1:]))
    elif mode == "acker":
        asyncio.run(acker(config, args[0], int(args[1])))
    elif mode == "batcher":
        asyncio.run(batcher(config, args[0], int(args[1]), int(args[2])))
    elif mode == "counter":
        asyncio.run(counter(config, int(args[0])))
    elif mode == "create":
        asyncio.run(create(config))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
