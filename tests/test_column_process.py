"""The column cache's first parse in a child process (json/column_process.py), held to the parse in this process's
thread that it replaces: the same columns, sizes and summaries on random message files, with torn last lines,
update lines and corrupt lines; the files the child declines or reads in another version parsed here as before; no
child at all (no interpreter to start) changing nothing but where the work runs."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backends.json import column_process
from storage.backends.json.column_process import parse_elsewhere
from storage.backends.json.message_cache import ColumnCache
from storage.backends.json.message_files import parse_block
from storage.errors import CorruptDataError
from storage.messages.columns import ColumnsBuilder, text_micros

GUILDS = ("100", "200")


def _record(rnd: random.Random, mid: int) -> dict[str, Any]:
    month = rnd.randrange(1, 4)
    fraction = rnd.choice(["", f".{rnd.randrange(10**6):06d}"])
    analysis: dict[str, Any] = {"sentiment": rnd.choice(["positive", "negative", None, "ünï"]),
                                "topics": [rnd.choice(["music", "art", "news"]) for _ in range(rnd.randrange(4))]}
    if rnd.random() < 0.2:
        analysis = {}
    return {"message_id": str(mid), "guild_id": rnd.choice(GUILDS), "channel_id": str(rnd.randrange(1, 6)),
            "author_id": str(rnd.randrange(1, 40)),
            "timestamp": f"2024-{month:02d}-{rnd.randrange(1, 29):02d}T{rnd.randrange(24):02d}:00:00{fraction}Z",
            "content_length": rnd.randrange(100), "analysis": analysis}


async def _message_folder(tmp_path: Path, rnd: random.Random, n: int) -> Path:
    """A JSON store's message files with ``n`` random records (written by the store itself)."""
    store = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:
        records = [_record(rnd, 10**6 + i) for i in range(n)]
        for start in range(0, n, 97):
            await store.record_messages(records[start:start + 97])  # type: ignore[attr-defined]
    finally:
        await store.close()
    return tmp_path / "data" / "messages"


def _files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.jsonl"))


def _state(cache: ColumnCache) -> dict[Any, Any]:
    """What the cache holds: per file, the bytes read and the columns (as plain lists)."""
    out = {}
    for key, cached in cache._files.items():
        cols = cached.columns.snapshot()
        out[key] = (cached.ino, cached.size, list(cols.micros), list(cols.authors), list(cols.channels),
                    list(cols.sentiments), list(cols.topics), cached.rows)
    return out


def _plain_columns(builder: ColumnsBuilder) -> list[list[Any]]:
    cols = builder.snapshot()
    return [list(cols.micros), list(cols.authors), list(cols.channels), list(cols.sentiments), list(cols.topics)]


def _parsed_here(path: Path) -> tuple[int, ColumnsBuilder]:
    builder = ColumnsBuilder()
    return parse_block(path, path.read_bytes(), 0, lambda rec, update: builder.add(rec)), builder


def _plain(path: Path) -> tuple[int, list[Any]]:
    """A plain-Python reference: every complete line that parses, as the cache's columns would hold it (the last
    version of an id where it was updated); bytes read up to the last such line."""
    data = path.read_bytes()
    rows: dict[str, list[Any]] = {}
    consumed = 0
    lines = data.split(b"\n")[:-1]
    for number, line in enumerate(lines):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            assert number == len(lines) - 1, "a bad line before the last one"
            break
        rec = obj.get("update", obj)
        analysis = rec["analysis"]
        topics = analysis.get("topics")
        rows[rec["message_id"]] = [text_micros(rec["timestamp"]), rec["author_id"], rec["channel_id"],
                                   analysis.get("sentiment"), tuple(dict.fromkeys(topics)) if topics else ()]
        consumed += len(line) + 1
    return consumed, list(rows.values())


async def _both(root: Path, monkeypatch: pytest.MonkeyPatch, call: Any) -> tuple[Any, Any, ColumnCache]:
    """``call(cache)`` with the parse in this process's thread, then with the child: both results, and the
    child's cache."""
    got = []
    caches = []
    for threshold in (1 << 60, 0):
        monkeypatch.setattr(column_process, "ELSEWHERE_BYTES", threshold)
        cache = ColumnCache(root)
        got.append((await call(cache), _state(cache)))
        caches.append(cache)
    return got[0], got[1], caches[1]


@pytest.mark.parametrize("seed", range(4))
async def test_the_childs_columns_are_the_threads(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    root = await _message_folder(tmp_path, rnd, rnd.randrange(200, 1200))
    files = _files(root)
    for path in rnd.sample(files, len(files) // 2):  # torn last lines, complete or not
        with open(path, "ab") as f:
            f.write(rnd.choice([b'{"message_id":"77","torn', b'{"message_id":"5", broken\n', b'{"upd']))
    lo, hi = text_micros("2024-02-03T00:00:00Z"), text_micros("2024-03-10T00:00:00Z")
    for call in (lambda c: c.summary(), lambda c: c.blocks(None, None, None, None, None),
                 lambda c: c.blocks(GUILDS[0], "2024-02-03T00:00:00.000000Z", "2024-03-10T00:00:00.000000Z", lo, hi)):
        thread, child, _cache = await _both(root, monkeypatch, call)
        assert child == thread
    _summary, (_result, state), _cache = await _both(root, monkeypatch, lambda c: c.summary())
    for path in files:
        key = (path.parent.name, path.stem)
        consumed, rows = _plain(path)
        assert state[key][1] == consumed
        assert [list(r) for r in zip(*state[key][2:7])] == rows


async def test_files_with_updates_and_files_grown_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child declines a file with update lines (its parse here keeps rows by id); a file the child parsed
    grows and is extended here, from the child's frozen columns."""
    rnd = random.Random(11)
    root = await _message_folder(tmp_path, rnd, 600)
    store = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:
        await store.update_message("1000003", {"content_length": 1})  # type: ignore[attr-defined]
        thread, child, cache = await _both(root, monkeypatch, lambda c: c.summary())
        assert child == thread
        assert any(cached.rows is not None for cached in cache._files.values())
        await store.record_messages([_record(rnd, 2 * 10**6 + i) for i in range(150)])  # type: ignore[attr-defined]
        await store.update_message("1000010", {"analysis": {"sentiment": "later", "topics": []}})  # type: ignore[attr-defined]
        monkeypatch.setattr(column_process, "ELSEWHERE_BYTES", 1 << 60)
        assert await cache.summary() == await ColumnCache(root).summary()
        fresh = ColumnCache(root)
        await fresh.blocks(None, None, None, None, None)
        await cache.blocks(None, None, None, None, None)
        assert _state(cache) == _state(fresh)
    finally:
        await store.close()


async def test_a_corrupt_line_is_reported_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = await _message_folder(tmp_path, random.Random(3), 400)
    path = _files(root)[0]
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"garbage"
    path.write_bytes(b"\n".join(lines))
    errors = []
    for threshold in (1 << 60, 0):
        monkeypatch.setattr(column_process, "ELSEWHERE_BYTES", threshold)
        with pytest.raises(CorruptDataError) as info:
            await ColumnCache(root).summary()
        errors.append((str(info.value), info.value.position))  # type: ignore[attr-defined]
    assert errors[0] == errors[1]


async def test_the_child_answers_and_declines(tmp_path: Path) -> None:
    """It parses what it can (so the tests above go through it); a file with an update line, a corrupt line, a
    missing file or another inode than the caller's is left out, for the caller to parse itself."""
    root = await _message_folder(tmp_path, random.Random(5), 500)
    files = _files(root)
    assert len(files) >= 4
    wanted = [(path, path.stat().st_ino, path.stat().st_size) for path in files]
    got = {index: (consumed, columns) for index, consumed, columns in parse_elsewhere(wanted)}
    assert set(got) == set(range(len(files)))
    for index, path in enumerate(files):
        consumed, builder = _parsed_here(path)
        assert got[index][0] == consumed
        assert _plain_columns(got[index][1]) == _plain_columns(builder)

    with open(files[0], "ab") as f:
        f.write(b'{"update":' + files[0].read_bytes().split(b"\n")[0] + b"}\n")
    lines = files[1].read_bytes().split(b"\n")
    lines[0] = b"[1]"
    files[1].write_bytes(b"\n".join(lines))
    gone = files[2].with_name("1999-01.jsonl")
    wanted = [(path, path.stat().st_ino, path.stat().st_size) for path in files]
    wanted[2] = (gone, wanted[2][1], 100)
    wanted[3] = (files[3], wanted[3][1] + 1, wanted[3][2])
    assert {index for index, _c, _b in parse_elsewhere(wanted)} == set(range(4, len(files)))


async def test_without_a_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No interpreter to start (an embedded Python): the thread parses everything, as before."""
    root = await _message_folder(tmp_path, random.Random(8), 300)
    thread, _child, _cache = await _both(root, monkeypatch, lambda c: c.summary())
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    assert list(parse_elsewhere([(p, p.stat().st_ino, p.stat().st_size) for p in _files(root)])) == []
    cache = ColumnCache(root)
    assert (await cache.summary(), _state(cache)) == thread
    monkeypatch.setattr(sys, "executable", "")
    cache = ColumnCache(root)
    assert (await cache.summary(), _state(cache)) == thread


async def test_the_parse_runs_in_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point: the parse holds another process's GIL. With this process's parse_block broken, the child's
    answers still come, and equal the parse here."""
    root = await _message_folder(tmp_path, random.Random(9), 300)
    files = _files(root)
    expected = [_plain_columns(_parsed_here(path)[1]) for path in files]

    def broken(*args: Any) -> int:
        raise AssertionError("parsed in this process")

    monkeypatch.setattr(column_process, "parse_block", broken)
    got = list(parse_elsewhere([(p, p.stat().st_ino, p.stat().st_size) for p in files]))
    assert [(index, _plain_columns(columns)) for index, _c, columns in got] == list(enumerate(expected))
