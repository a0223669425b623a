"""The JSON message export (``json/message_export.export_records``, a backup's and a copy's messages, issue 15).

What it emits: every record's current version once (the last line of an id wins), as its stored line and its
canonical form, whatever the read block; a torn last line skipped; a bad line before the last is corruption, with its
byte offset, also when it ends a read block. How: every step between two of its pacer's ticks is bounded. That is
measured here by what the export's thread allocates and frees between two pauses (``tracemalloc``; a pause at every
tick, ``Pacer.WORK`` 0): a whole file read as one ``bytes`` and a file's two dicts freed at once at the next file
(4.5-5 ms of GIL at 50k records, benchmarks/README.md) were each megabytes between two pauses; and the records
it holds are about their size (``orjson.dumps`` returns a ``bytes`` holding a 4 KB buffer, see the module).
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backends.json import message_export
from storage.backends.json.message_export import export_records
from storage.errors import CorruptDataError
from storage.offload import Pacer
from tests.test_backup import json_config

GUILDS = ("987654321", "123456789")


def message(i: int, guild: str = GUILDS[0], month: int = 1) -> dict[str, Any]:
    return {"message_id": str(700_000 + i), "guild_id": guild, "channel_id": str(10 + i % 3),
            "author_id": str(1000 + i % 97), "timestamp": f"2024-{month:02d}-{1 + i % 28:02d}T12:{i % 60:02d}:00Z",
            "content_length": i, "attachments": i % 2, "reactions": i % 5,
            "analysis": {"sentiment": ("positive", "neutral")[i % 2], "topics": ["gaming", f"t{i % 13}"]}}


def export(root: Path) -> list[tuple[str, bytes, bytes]]:
    out: list[tuple[str, bytes, bytes]] = []
    counted: list[int] = []
    total = export_records(root, lambda mid, line, canon: out.append((mid, line, canon)), counted.append)
    assert total == sum(counted) == len(out)
    return out


@pytest.fixture
async def store_root(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """A store's message folder (two guilds, two months each, some records updated twice) and its current
    records as the store's own scan returns them."""
    async with storage.open_store(config=json_config(tmp_path / "data", tmp_path / "backups")) as store:
        await store.record_messages([message(i, GUILDS[i % 2], 1 + i % 2) for i in range(400)])
        for i in range(0, 400, 7):
            await store.update_message(str(700_000 + i), {"reactions": 50 + i})
        for i in range(0, 400, 21):
            await store.update_message(str(700_000 + i), {"reactions": 90 + i, "content_length": 1})
        current = {r["message_id"]: r async for r in store.scan_messages(None, None, None)}
        root = store._messages.root
    assert len(current) == 400
    return root, current


async def test_the_export_emits_each_current_record_once_whatever_the_read_block(
        store_root: tuple[Path, dict[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record once, at its last version, as its stored line and its canonical form; a bad last complete
    line (torn) and an incomplete one after it are skipped; the same with blocks of any size (1: every block
    one line)."""
    root, current = store_root
    file = next(root.glob("*/*.jsonl"))
    with file.open("ab") as f:
        f.write(b'{"message_id":"799999","guild_id":\n{"message_id":"7999')  # torn, then incomplete
    whole = export(root)
    assert sorted(mid for mid, _line, _canon in whole) == sorted(current)
    for mid, line, canon in whole:
        assert line == orjson.dumps(current[mid])
        assert canon == orjson.dumps(current[mid], option=orjson.OPT_SORT_KEYS)
    updated = {mid: int(mid) - 700_000 for mid in current if (int(mid) - 700_000) % 7 == 0}
    assert {mid: orjson.loads(line)["reactions"] for mid, line, _c in whole if mid in updated} \
        == {mid: (90 if i % 21 == 0 else 50) + i for mid, i in updated.items()}  # the last update won
    for block in (1, 300, 4096):
        monkeypatch.setattr(message_export, "READ_BLOCK", block)
        monkeypatch.setattr(message_export, "FREE_SLICE", 3)
        assert export(root) == whole


@pytest.mark.parametrize("block", [1, 1 << 20])
async def test_a_bad_line_before_the_last_is_corruption_with_its_offset(
        store_root: tuple[Path, dict[str, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    """Not skipped as torn: a bad line with complete lines after it raises, with its byte offset, also when it
    is the last line of a read block (``block`` 1) and when it is inside one."""
    monkeypatch.setattr(message_export, "READ_BLOCK", block)
    root, _current = store_root
    file = next(root.glob("*/*.jsonl"))
    data = file.read_bytes()
    second = data.index(b"\n", data.index(b"\n") + 1) + 1
    file.write_bytes(data[:second] + b'{"message_id":"1",\n' + data[second:])
    with pytest.raises(CorruptDataError, match=f"byte {second} "):
        export(root)


class Memory:
    """``tracemalloc``'s figures at each pause the export makes (a pause at every tick): how far its thread's
    traced memory rose and fell between two pauses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rises: list[int] = []
        self.falls: list[int] = []
        self.highest = 0  # the most traced at a pause, above what was traced before the run
        self._start = self._last = 0
        real = time.sleep

        def sleep(seconds: float) -> None:
            current, peak = tracemalloc.get_traced_memory()
            self.rises.append(peak - self._last)
            self.falls.append(self._last - current)
            tracemalloc.reset_peak()
            self._last = current
            self.highest = max(self.highest, current - self._start)
            real(seconds)

        monkeypatch.setattr(Pacer, "WORK", 0.0)
        monkeypatch.setattr(Pacer, "PAUSE", 0.0)
        monkeypatch.setattr(time, "sleep", sleep)  # what Pacer calls (the module, not a copy of the function)

    def run(self, fn: Any) -> None:
        tracemalloc.start()
        try:
            self._start = self._last = tracemalloc.get_traced_memory()[0]
            worker = threading.Thread(target=fn)
            worker.start()
            worker.join()
        finally:
            tracemalloc.stop()


async def test_the_export_pauses_within_bounded_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three files of 10k records (~3 MB each): between two pauses the export's thread never takes or gives back
    more than 1 MB (read in 64 KB blocks, the dicts freed 256 entries at a time; a file read whole, and its
    dicts freed at once at the next file, were each over 2 MB), and it pauses at least once per record parsed,
    per record emitted and per slice freed. It holds a file's records in memory about their size (each
    ``orjson.dumps`` result kept as it came held 4 KB: 80 MB for a 3 MB file)."""
    n = 10_000
    async with storage.open_store(config=json_config(tmp_path / "data", tmp_path / "backups")) as store:
        for month in (1, 2, 3):
            await store.record_messages([message(i + month * n, GUILDS[0], month) for i in range(n)])
        root = store._messages.root
    sizes = [p.stat().st_size for p in root.glob("*/*.jsonl")]
    assert len(sizes) == 3 and min(sizes) > 2 << 20
    monkeypatch.setattr(message_export, "READ_BLOCK", 64 << 10)
    monkeypatch.setattr(message_export, "FREE_SLICE", 256)
    memory = Memory(monkeypatch)
    emitted: list[str] = []
    memory.run(lambda: export_records(root, lambda mid, _line, _canon: emitted.append(mid), lambda _n: None))
    assert len(emitted) == len(set(emitted)) == 3 * n
    assert len(memory.rises) >= 3 * (2 * n + 2 * n // 256)
    assert max(memory.rises) < 1 << 20, sorted(memory.rises)[-3:]
    assert max(memory.falls) < 1 << 20, sorted(memory.falls)[-3:]
    # a file's records held as copies of their own size: orjson's 4 KB buffers were 80 MB for a 3 MB file
    assert memory.highest < 8 * max(sizes), (memory.highest, max(sizes))
