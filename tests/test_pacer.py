"""The shared pacer of worker threads (``storage.offload.Pacer``; issue 15, a GIL convoy starving the event loop).

A worker thread that alternates short C calls with system calls hands the GIL over all the time, but never to the
waiting event loop; a real pause now and then lets the loop in. The pacer must pause as specified (``PAUSE`` once
``WORK`` has passed, never on the loop's own thread) and change nothing in what the paced work produces: here
backups, restores and copies (their writers, readers, message export, inserts and the child's frames) run with a
pause at every tick and give exactly what they give unpaced, on both backends.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backup import messages as backup_messages
from storage.backup.copy import copy
from storage.child import child_items
from storage.offload import PACED, Pacer
from tests.test_backup import has_messages, json_config, populate, snapshot


class Pauses:
    """Records each real ``time.sleep`` the library's pacers make: its length and the thread that made it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[tuple[float, float, int]] = []  # (when, seconds, thread)
        real = time.sleep

        def sleep(seconds: float) -> None:
            self.made.append((time.perf_counter(), seconds, threading.get_ident()))
            real(seconds)

        monkeypatch.setattr(time, "sleep", sleep)  # what Pacer calls (the module, not a copy of the function)

    def clear(self) -> None:
        self.made.clear()


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pauses]:
    yield Pauses(monkeypatch)


def test_a_pacer_pauses_once_per_work_in_a_worker_thread(pauses: Pauses) -> None:
    """Busy work ticking often: a pause of PAUSE each time WORK has passed since the last one, no more."""
    def busy(pacer: Pacer, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            sum(range(200))  # a few microseconds of Python between ticks
            pacer.tick()

    worker = threading.Thread(target=busy, args=(Pacer(), 0.05))
    worker.start()
    worker.join()
    made = pauses.made
    assert made and {seconds for _w, seconds, _t in made} == {Pacer.PAUSE}
    assert {thread for _w, _s, thread in made} == {worker.ident}
    # at most one pause per WORK of ticking (a pause's own length counts as neither)
    assert len(made) <= 0.05 / Pacer.WORK + 1
    assert all(b - a >= Pacer.WORK + Pacer.PAUSE for (a, _s, _t), (b, _s2, _t2) in itertools.pairwise(made))

    pauses.clear()

    class Never(Pacer):
        WORK = 3600.0

    busy(Never(), 0.01)
    assert pauses.made == []


def test_a_pacer_made_where_pacing_is_off_never_pauses(pauses: Pauses) -> None:
    """A child process of ours turns pacing off (``PACED``; it has no event loop to let in): its pacers never
    pause, in a worker thread either; a context with pacing on is not affected."""
    class Always(Pacer):
        WORK = 0.0

    def ticks() -> None:
        pacer = Always()
        for _ in range(20):
            pacer.tick()

    def off() -> None:
        PACED.set(False)
        ticks()

    contextvars.copy_context().run(off)
    assert pauses.made == []
    ticks()
    assert len(pauses.made) == 20


async def test_a_pacer_never_puts_the_event_loop_to_sleep(pauses: Pauses) -> None:
    """A helper shared by a worker and the loop (a backup file's reader) ticks on the loop's thread too: no pause
    there, only in the worker thread."""
    class Always(Pacer):
        WORK = 0.0

    loop_pacer = Always()
    for _ in range(20):
        loop_pacer.tick()
    assert pauses.made == []
    worker_pacer = Always()
    await asyncio.to_thread(lambda: [worker_pacer.tick() for _ in range(20)])
    assert len(pauses.made) == 20 and threading.get_ident() not in {t for _w, _s, t in pauses.made}


async def test_backup_restore_and_copy_paced_at_every_tick_give_the_same_results(
        store: Any, tmp_path: Path, pauses: Pauses, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both backends: a backup, a restore (its check in a child too) and a copy made with a pause at every tick
    give the digests, counts and contents made without any pause; the pauses happen, in worker threads only."""
    await populate(store, members=60, messages=300)
    original = await snapshot(store)
    monkeypatch.setattr(Pacer, "WORK", 3600.0)
    pauses.clear()  # (any the filling made)
    plain = await store.create_backup()
    assert pauses.made == []

    monkeypatch.setattr(Pacer, "WORK", 0.0)  # every tick pauses
    monkeypatch.setattr(backup_messages, "CHILD_CHECK_RECORDS", 0)  # the restore's check in a child
    paced = await store.create_backup()
    assert pauses.made and threading.get_ident() not in {t for _w, _s, t in pauses.made}
    assert (paced.counts, paced.digests, paced.raw_bytes) == (plain.counts, plain.digests, plain.raw_bytes)
    made = len(pauses.made)

    await store.put("notes", "later", {"v": 1})
    dry = await store.restore_backup(paced.id, dry_run=True)
    assert dry.dry_run and await store.get("notes", "later") == {"v": 1}
    await store.restore_backup(paced.id)
    assert await snapshot(store) == original
    assert len(pauses.made) > made

    made = len(pauses.made)
    async with storage.open_store(config=json_config(tmp_path / "twin", store.config.backup_dir)) as twin:
        report = await copy(store, twin, batch_size=7)
        assert await snapshot(twin) == original
        assert report.counts == {name: await store.count(name) for name in await store.collections()}
        assert report.messages == (300 if has_messages(store) else None)
    assert len(pauses.made) > made
    assert threading.get_ident() not in {t for _w, _s, t in pauses.made}


async def test_a_childs_items_paced_at_every_frame_are_the_same(tmp_path: Path, pauses: Pauses,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The frames read from a child (a backup's message check), with a pause before each: the same items as
    without; the pauses made in the reading thread."""
    async with storage.open_store(config=json_config(tmp_path / "data", str(tmp_path / "backups"))) as store:
        await populate(store, messages=200)
        info = await store.create_backup()
    root = tmp_path / "backups" / info.id
    entry = orjson.loads((root / "manifest.json").read_bytes())["messages"]
    monkeypatch.setattr(Pacer, "WORK", 3600.0)
    pauses.clear()  # (any the filling made)
    plain = await asyncio.to_thread(lambda: list(child_items("storage.backup.messages:checked_count", str(root),
                                                             entry)))
    assert plain == [200] and pauses.made == []
    monkeypatch.setattr(Pacer, "WORK", 0.0)
    paced = await asyncio.to_thread(lambda: list(child_items("storage.backup.messages:checked_count", str(root),
                                                             entry)))
    assert paced == plain
    assert len(pauses.made) >= 2 and threading.get_ident() not in {t for _w, _s, t in pauses.made}
