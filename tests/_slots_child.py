"""The holder process of the shared-slot tests (tests/test_json_slots.py; json/slots.py).

``python tests/_slots_child.py FOLDER POINT``: opens the store with a lease that stays on (so the lock stays with
this process while the parent's writer offers its record), saves ``h0``..``h2`` (``ACK h<n>`` after each), prints
``READY``, then for every line ``go`` on stdin saves the next ``h<n>``. With POINT other than ``none``, the first save
that claims an offered record stops at that point of the protocol (``PAUSED <point>``, then sleeps until killed):

* ``claimed``: the slots are CLAIMED, nothing written yet;
* ``written``: the record (with the claimed ones) is written, its fsync not started;
* ``synced``: the fsync returned, the committed end not published;
* ``published``: the committed end is published, the slots not marked;
* ``<point>+<seconds>``: stops there that long, then goes on;
* ``compact``: no stop; appends go to a thread (json/store.py ``_commit``'s threaded way), and the commit that
  claimed compacts the store before it lets go of the lock (what a commit whose journal write failed does:
  ``_after_failed_append``), printing ``COMPACTED`` or ``REFUSED <errno>``.

A save that fails prints ``FAIL h<n> <errno>``. Other lines on stdin: ``put <key>`` saves that key (``ACK <key>``),
``view`` prints ``VIEW <json>``, the holder's view of collection ``c``; ``fill <n>`` saves ``n`` documents of 1 MB
(``FILLED``); ``compact`` compacts (``COMPACTED`` or ``REFUSED <errno> <message>``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable
from typing import Any

import storage
from storage import StorageIOError
from storage.backends.json import group_commit, holding, journal, lease, lock
from storage.backends.json import store as json_store

POINT = sys.argv[2] if len(sys.argv) > 2 else "none"
armed = False  # a claim was made: the next protocol point named POINT stops


def pause(point: str) -> None:
    name, _, delay = POINT.partition("+")  # "claimed+2.5": stop there 2.5 s, then go on
    if armed and point == name:
        print(f"PAUSED {point}", flush=True)
        if delay:
            time.sleep(float(delay))
            return
        while True:
            time.sleep(60)


claim = json_store.JsonBackend._claim


def claiming(self: Any, start: int, record: bytes, ops: Any) -> Any:
    global armed
    found = claim(self, start, record, ops)
    if found[1]:
        armed = True
        print(f"CLAIMED {len(found[1])}", flush=True)
        pause("claimed")
    return found


sync_fd = journal.sync_fd


def syncing(fd: int) -> None:
    pause("written")
    sync_fd(fd)
    pause("synced")


publish = lock.SidecarLock.publish


def publishing(self: Any, ino: int, end: int) -> None:
    publish(self, ino, end)
    pause("published")


commit = json_store.JsonBackend._commit


async def compact_and_say(compaction: Awaitable[Any]) -> None:
    """Run ``compaction``; print COMPACTED, or REFUSED with the StorageIOError's errno and message."""
    try:
        await compaction
    except StorageIOError as exc:
        print(f"REFUSED {exc.errno} {exc}", flush=True)
    else:
        print("COMPACTED", flush=True)


async def committing(self: Any, *args: Any, **kwargs: Any) -> None:
    global armed
    await commit(self, *args, **kwargs)
    if armed and POINT == "compact":
        armed = False
        await compact_and_say(self._run_compaction())


json_store.JsonBackend._commit = committing  # type: ignore[method-assign]
if POINT == "compact":  # every commit through _commit (the threaded append), not the lease's inline one
    json_store.JsonBackend._may_inline = lambda self, size: False  # type: ignore[method-assign]
json_store.JsonBackend._claim = claiming  # type: ignore[method-assign]
journal.sync_fd = syncing  # type: ignore[assignment]
lock.SidecarLock.publish = publishing  # type: ignore[method-assign]
holding.OFFER_MIN_SYNC = 0.0  # tests/conftest.py ``offers_always``
lease.BUDGET = lease.HOLD = 60.0  # the lease stays on while the parent offers
group_commit.SOLO_TURN_BUDGET = 60.0


async def main(folder: str) -> None:
    store = await storage.open_store(backend="json", path=folder, lock_timeout=60)
    n = 0

    async def save(key: str = "") -> None:
        nonlocal n
        if not key:
            key, n = f"h{n}", n + 1
        try:
            await store.put("c", key, {"by": "holder"})
        except StorageIOError as exc:
            print(f"FAIL {key} {exc.errno}", flush=True)
            return
        print(f"ACK {key}", flush=True)

    for _ in range(3):
        await save()
    await asyncio.sleep(0)  # the loop's turn: the lease ends here unless it is hot
    print("READY", "leased" if store._lease.held else "free", flush=True)
    while True:
        command = (await asyncio.to_thread(sys.stdin.readline)).split()
        if command == ["go"]:
            await save()
        elif command[:1] == ["put"]:
            await save(command[1])
        elif command[:1] == ["fill"]:  # that many MB of documents (f0, f1...), one 1 MB document a save
            for i in range(int(command[1])):
                await store.put("c", f"f{i}", {"pad": "x" * (1 << 20)})
            print("FILLED", flush=True)
        elif command == ["compact"]:
            await compact_and_say(store.compact())
        elif command == ["view"]:
            print("VIEW", json.dumps({k: d async for k, d in store.items("c")}), flush=True)
        else:
            break
    await store.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(sys.argv[1]))
