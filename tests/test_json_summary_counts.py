"""The JSON message summary's shortcut (storage/backends/json/message_counts.py: files counted without parsing their
lines, only the earliest and latest months parsed) against the summary that parses every file (the column cache,
as before the shortcut) and against a plain reference, over random message sets: random guilds, months, key orders,
timestamps with and without a fraction, strings with escapes and non-ASCII, updates, prunes, torn last lines,
corrupt lines (the same exception, type and text), other stores appending between two calls."""

from __future__ import annotations

import os
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import storage
from storage import StoreConfig
from storage.backends.json import message_counts
from storage.backends.json.message_cache import ColumnCache
from storage.backends.json.message_counts import count_records
from storage.backends.json.message_files import parse_line
from storage.messages.columns import micros_text, text_micros
from storage.offload import Pacer

_MONTHS = [(2023, 11), (2023, 12), (2024, 1), (2024, 2), (2024, 3)]
_STRINGS = ["pos", "neg", 'quote " and \\ backslash', "tab\tnew\nline", "ünïcödé ✓", "emoji 😀", "\x7f", ""]


def _timestamp(rng: random.Random) -> str:
    year, month = rng.choice(_MONTHS)
    day = rng.randint(1, 29 if month == 2 else 30)
    text = f"{year:04d}-{month:02d}-{day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
    return text + rng.choice(["Z", "Z", ".500000Z", f".{rng.randrange(1, 10**6):06d}Z"])


def _record(rng: random.Random, mid: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"message_id": str(mid), "guild_id": str(10 + rng.randrange(4)),
                           "channel_id": str(rng.randrange(3)), "author_id": str(rng.randrange(9)),
                           "timestamp": _timestamp(rng)}
    if rng.random() < 0.7:
        rec["content_length"] = rng.randrange(100)
    analysis: dict[str, Any] = {}
    for name in rng.sample(["sentiment", "topics"], rng.randrange(3)):
        analysis[name] = rng.choice(_STRINGS) if name == "sentiment" else rng.sample(_STRINGS, rng.randrange(3))
    if analysis or rng.random() < 0.5:
        rec["analysis"] = analysis
    if rng.random() < 0.05:
        rec["extra"] = {"nested": [1, 2]}  # a field the shortcut does not know: that file is parsed
    keys = list(rec)
    tail = keys[1:]
    if rng.random() < 0.3:
        rng.shuffle(tail)
    return {k: rec[k] for k in [keys[0], *tail]}


def _reference(root: Path) -> tuple[int, int, str | None, str | None] | None:
    """Plain Python: the current record of each id in each file; None when some line is corrupt (not the last)."""
    times: list[int] = []
    guilds = set()
    for guild in sorted(os.listdir(root)) if root.is_dir() else []:
        if not (root / guild).is_dir():
            continue
        for name in sorted(os.listdir(root / guild)):
            if not name.endswith(".jsonl"):
                continue
            data = (root / guild / name).read_bytes()
            lines = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
            latest: dict[str, str] = {}
            for number, line in enumerate(lines):
                try:
                    rec, _ = parse_line(line)
                    text_micros(rec["timestamp"])
                except ValueError:
                    if number == len(lines) - 1:
                        break
                    return None
                latest[rec["message_id"]] = rec["timestamp"]
            if latest:
                guilds.add(guild)
                times += map(text_micros, latest.values())
    if not times:
        return 0, 0, None, None
    return len(times), len(guilds), micros_text(min(times)), micros_text(max(times))


async def _outcome(cache: ColumnCache, shortcut: bool) -> Any:
    try:
        return tuple(await cache.summary(shortcut))
    except Exception as exc:  # the same failure, compared by type and text
        return type(exc), str(exc)


async def _check(root: Path, kept: ColumnCache) -> None:
    old = await _outcome(ColumnCache(root), False)
    new = await _outcome(ColumnCache(root), True)
    assert new == old
    assert await _outcome(kept, True) == old  # a cache that lives across calls (partly filled by earlier ones)
    reference = _reference(root)
    if reference is not None:
        assert old == reference


def _files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.jsonl"))


@pytest.mark.parametrize("seed", range(12))
async def test_shortcut_summary_equals_the_parsed_one(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    config = StoreConfig(backend="json", path=str(tmp_path / "data"), backup_dir=str(tmp_path / "b"), source="t")
    store = await storage.open_store(config=config)
    other = await storage.open_store(config=config)  # another "process" appending to the same folder
    root = tmp_path / "data" / "messages"
    kept = ColumnCache(root)
    mid = 1000
    try:
        await _check(root, kept)  # empty store
        for _ in range(10):
            step = rng.random()
            writer = store if rng.random() < 0.6 else other
            if step < 0.45:
                batch = [_record(rng, mid + i) for i in range(rng.randrange(1, 60))]
                mid += len(batch)
                await writer.record_messages(batch)  # type: ignore[attr-defined]
            elif step < 0.65 and mid > 1000:
                target = str(rng.randrange(1000, mid))
                await writer.update_message(target, {"content_length": rng.randrange(50)})  # type: ignore[attr-defined]
            elif step < 0.75:
                year, month = rng.choice(_MONTHS)
                when = datetime(year, month, rng.randint(1, 28), rng.randrange(24), tzinfo=timezone.utc)
                guild = rng.choice([None, "10", "11"])
                await writer.prune_messages(when, guild_id=guild)  # type: ignore[attr-defined]
            elif step < 0.85 and _files(root):
                path = rng.choice(_files(root))
                with open(path, "ab") as f:  # a torn last line: never acknowledged, skipped by readers
                    f.write(rng.choice([b'{"message_id":"99', b'{"message_id":"5","guild_id":"1"}\n', b"x"]))
            await _check(root, kept)
        if _files(root):  # a corrupt line that is not the last: the same error either way
            path = rng.choice(_files(root))
            data = path.read_bytes()
            month = path.stem
            bad = rng.choice([b"not json", b'{"message_id":"1"}',
                              b'{"message_id":"1","guild_id":"1","channel_id":"1","author_id":"1","timestamp":"'
                              + month.encode() + b'-31T00:00:00Z","analysis":{}}'])
            cut = data.find(b"\n") + 1
            path.write_bytes(data[:cut] + bad + b"\n" + data[cut:] + b'{"message_id":"1"}\n')
            await _check(root, ColumnCache(root))
    finally:
        await store.close()
        await other.close()


def test_count_records_refuses_what_it_cannot_vouch_for(tmp_path: Path) -> None:
    """Lines a file of ours could hold but the shortcut does not count: the caller parses that file instead."""
    good = (b'{"message_id":"1","guild_id":"2","channel_id":"3","author_id":"4","timestamp":"2024-02-29T23:59:59Z",'
            b'"analysis":{"sentiment":"a\\u00e9\\"","topics":["x"]}}\n')
    path = tmp_path / "f.jsonl"
    shapes: dict[Any, Any] = {}
    cases = {
        good * 3: 3,
        good * 2 + good[:-5]: 2,  # a torn last line is not a line
        good.replace(b"2024-02-29", b"2024-02-30"): None,  # no such day
        good.replace(b'"x"', b'"\\ud800"'): None,  # an escaped surrogate
        good + good.replace(b'"a\\u00e9', b'"\xff'): None,  # not UTF-8
        good + b'{"update":' + good[:-1] + b"}\n": None,  # an update line
        good + good.replace(b'"3"', b"3"): None,  # another type
        good.replace(b"2024-02", b"2024-03"): None,  # another month than the file's
        b"": 0,
    }
    for data, expected in cases.items():
        path.write_bytes(data)
        found = count_records(path, "2024-02", shapes)
        assert (None if found is None else found.records) == expected, data
    path.write_bytes(good)
    first = count_records(path, "2024-02", shapes)
    assert first is not None and first.records == 1
    with open(path, "ab") as f:
        f.write(good * 2 + b'{"message_id":"7"')
    grown = count_records(path, "2024-02", shapes, first)  # only the tail is read
    assert grown is not None and (grown.records, grown.size) == (3, 3 * len(good))
    with open(path, "ab") as f:
        f.write(b"}\n")
    assert count_records(path, "2024-02", shapes, grown) is None  # that line turned out not to be a record


def test_the_pacer_lets_the_loop_in_between_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A count of a file of many pieces pauses (a real sleep: the GIL free for the event loop) once per ``WORK``
    of counting, and counts the same as without pauses (see ``offload.Pacer`` for why a pause is needed)."""
    line = (b'{"message_id":"1","guild_id":"2","channel_id":"3","author_id":"4","timestamp":"2024-02-29T23:59:59Z",'
            b'"analysis":{"sentiment":null,"topics":null}}\n')
    path = tmp_path / "f.jsonl"
    lines = 4 * (message_counts.COUNT_PIECE // len(line) + 1)  # more than four pieces
    path.write_bytes(line * lines)
    pauses: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)  # what Pacer calls
    plain = count_records(path, "2024-02", {})
    assert plain is not None and plain.records == lines and pauses == []

    class EveryPiece(Pacer):
        WORK = 0.0  # a pause after every piece

    paced = count_records(path, "2024-02", {}, None, EveryPiece())
    assert paced is not None and (paced.records, paced.size) == (plain.records, plain.size)
    assert len(pauses) >= 4 and set(pauses) == {Pacer.PAUSE}

    pauses.clear()

    class Never(Pacer):
        WORK = 3600.0

    assert count_records(path, "2024-02", {}, None, Never()) == paced and pauses == []
