"""The message code's work cut into pieces for worker threads (issue 15), each against the plain version it replaces.

A worker thread's single C call keeps the GIL, and with it the event loop, to its end; so message files are split,
joined and searched a piece at a time, sorts run in pieces and are merged (here without a key: member keys), a
``record_messages`` batch is encoded a small group at a time,
and PostgreSQL's ``COPY`` rows are bytes keyed by id instead of ``(id, row)`` tuples. Timing is measured in
benchmarks/bench_stalls.py; here each is held to a plain-Python reference on random inputs.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from storage.backends.json import message_files
from storage.backends.json.message_files import (
    ENCODE_SLICE,
    block_ids,
    encode_bodies,
    iter_blocks,
    iter_lines,
    join_lines,
    parse_block,
    split_lines,
)
from storage.backends.json.messages import ENCODE_GROUP, encode_batch
from storage.backends.postgres.ingest import Ingest, RowEncoder, checked_rows
from storage.errors import CorruptDataError, ValidationError
from storage.messages.records import message_records, normalized_chunks
from storage.sorting import sorted_in_runs


def _record(rnd: random.Random, mid: int) -> dict[str, Any]:
    topics = rnd.sample(["music", "art", "news", "gaming"], rnd.randrange(0, 3))
    record: dict[str, Any] = {
        "message_id": str(mid), "guild_id": str(rnd.choice([100, 200, 300])), "channel_id": str(rnd.randrange(1, 9)),
        "author_id": str(rnd.randrange(1, 10**18)),
        "timestamp": f"2024-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}T12:00:00Z",
        "content_length": rnd.randrange(0, 500), "attachments": rnd.randrange(0, 3), "reactions": rnd.randrange(0, 9),
        "analysis": {"sentiment": rnd.choice(["positive", "negative"]), "topics": topics}}
    if rnd.random() < 0.1:
        record["analysis"] = {"sentiment": None, "topics": topics}  # the general path of both encoders
    if rnd.random() < 0.05:
        record["content_length"] = 2**63 + 5  # beyond bigint: a ValidationError on PostgreSQL
    return record


# -------------------------------------------------------------------------------------------------------------------
# sorting in runs, without a key (refresh_member_statistics' member keys)
@pytest.mark.parametrize("seed", range(5))
def test_sorted_in_runs_without_a_key_is_sorted(seed: int) -> None:
    rnd = random.Random(seed)
    for n in (0, 1, 5, 63, 64, 65, 500):
        items = [f"{rnd.randrange(100)}_{rnd.randrange(10**rnd.randrange(1, 6))}" for _ in range(n)]
        assert list(sorted_in_runs(items, run=rnd.choice([1, 2, 7, 64]))) == sorted(items)


def test_sorted_in_runs_without_a_key_is_stable() -> None:
    class Item:
        def __init__(self, key: int, tag: int) -> None:
            self.key, self.tag = key, tag

        def __lt__(self, other: Item) -> bool:
            return self.key < other.key

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Item) and self.key == other.key

        __hash__ = None  # type: ignore[assignment]

    rnd = random.Random(7)
    items = [Item(rnd.randrange(10), i) for i in range(300)]
    got = list(sorted_in_runs(items, run=16))
    expected = sorted(items, key=lambda item: item.key)
    assert [(i.key, i.tag) for i in got] == [(i.key, i.tag) for i in expected]


# -------------------------------------------------------------------------------------------------------------------
# lines a piece at a time
def _lines(rnd: random.Random, count: int, long_every: int = 17) -> list[bytes]:
    return [b"x" * (rnd.randrange(1, 300) if i % long_every else rnd.randrange(300, 2000)) + str(i).encode()
            for i in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_split_lines_gives_the_lines_of_one_split(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    monkeypatch.setattr(message_files, "PIECE", rnd.choice([1, 64, 257, 1000]))
    lines = _lines(rnd, rnd.randrange(1, 200))
    data = b"\n".join(lines) + b"\n"
    tail = b"" if rnd.random() < 0.5 else b"torn"
    assert list(split_lines(data + tail, len(data))) == data[:-1].split(b"\n") == lines


@pytest.mark.parametrize("seed", range(3))
def test_blocks_of_a_piece_give_the_lines_and_ids_of_one_block(seed: int, tmp_path: Path) -> None:
    rnd = random.Random(seed)
    records = [_record(rnd, mid) for mid in rnd.sample(range(1, 10**6), 300)]
    data = join_lines(encode_bodies(records)) + b'{"message_id":"77","torn'
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for size in (1, 100, 4096, 1 << 20):
            blocks = list(iter_blocks(fd, 0, len(data), size))
            assert b"".join(b for _o, b in blocks) == data[:data.rfind(b"\n") + 1]
            assert all(offset == sum(len(b) for _o, b in blocks[:i]) for i, (offset, _b) in enumerate(blocks))
            ids = [int(d) for _o, block in blocks for d in block_ids(block) or []]
            assert ids == [int(r["message_id"]) for r in records]
            assert [line for _o, line in iter_lines(fd, 0, len(data), size)] == data.split(b"\n")[:-1]
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", range(3))
def test_parse_block_in_pieces_keeps_what_a_whole_parse_keeps(seed: int, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    rnd = random.Random(seed)
    monkeypatch.setattr(message_files, "PIECE", rnd.choice([1, 300, 5000]))
    records = [_record(rnd, mid) for mid in range(1, 120)]
    data = join_lines(encode_bodies(records))
    got: list[Any] = []
    assert parse_block(tmp_path, data + b'{"update":', 0, lambda rec, update: got.append(rec)) == len(data)
    assert got == [orjson.loads(line) for line in data.split(b"\n")[:-1]]
    torn = data + b'{"message_id":"5", broken\n'  # a complete last line that does not parse: left for later
    assert parse_block(tmp_path, torn, 0, lambda rec, update: None) == len(data)
    lines = data.split(b"\n")
    lines[rnd.randrange(len(lines) - 2)] = b"garbage"  # a bad line with lines after it: corruption
    with pytest.raises(CorruptDataError):
        parse_block(tmp_path, b"\n".join(lines), 0, lambda rec, update: None)


@pytest.mark.parametrize("count", [1, 2, ENCODE_SLICE - 1, ENCODE_SLICE, ENCODE_SLICE + 1, 3 * ENCODE_SLICE + 7])
def test_join_lines_in_slices_is_one_join(count: int) -> None:
    rnd = random.Random(count)
    records = [_record(rnd, mid) for mid in range(1, count + 1)]
    bodies = encode_bodies(records)
    assert join_lines(bodies) == b"".join(orjson.dumps(r) + b"\n" for r in records)
    assert join_lines(tuple(bodies)) == join_lines(bodies)


# -------------------------------------------------------------------------------------------------------------------
# a record_messages batch, encoded a group at a time
@pytest.mark.parametrize("seed", range(4))
def test_an_encoded_batch_holds_what_the_normalized_records_encode_to(seed: int) -> None:
    rnd = random.Random(seed)
    ids = [rnd.randrange(1, 3 * ENCODE_GROUP) for _ in range(rnd.choice([0, 1, ENCODE_GROUP, 3 * ENCODE_GROUP + 5]))]
    raw = [_record(rnd, mid) for mid in ids]  # with duplicates: the first of an id wins
    reference = [rec for chunk in normalized_chunks(message_records(raw), 10**9) for rec in chunk]
    batch = encode_batch(message_records(raw))
    assert len(batch) == len(reference)
    assert batch.ids == [int(r["message_id"]) for r in reference]
    assert batch.guilds == [r["guild_id"] for r in reference]
    assert batch.months == [r["timestamp"][:7] for r in reference]
    if reference:
        assert join_lines(batch.bodies) == b"".join(orjson.dumps(r) + b"\n" for r in reference)


def test_an_encoded_batch_refuses_a_bad_record_anywhere() -> None:
    rnd = random.Random(1)
    raw = [_record(rnd, mid) for mid in range(1, 2 * ENCODE_GROUP)]
    raw[ENCODE_GROUP + 3]["author_id"] = "x"
    with pytest.raises(ValidationError):
        encode_batch(message_records(raw))


# -------------------------------------------------------------------------------------------------------------------
# PostgreSQL's keyed rows
@pytest.mark.parametrize("seed", range(4))
def test_keyed_rows_send_the_rows_of_the_tuples_in_id_order(seed: int) -> None:
    rnd = random.Random(seed)
    ids = rnd.sample([*range(1, 500), *range(2**63 - 200, 2**63 + 200), *range(10**19 - 100, 10**19)], 300)
    raw = [_record(rnd, mid) for mid in ids]
    for rec in raw:
        rec["content_length"] %= 2**63  # no record the encoders refuse here
    chunks = list(checked_rows(message_records(raw), 64, RowEncoder()))
    normalized = [rec for chunk in normalized_chunks(message_records(raw), 10**9) for rec in chunk]
    reference = RowEncoder()
    expected = [sorted(map(reference.record, normalized[start:start + 64])) for start in range(0, len(raw), 64)]
    ingest = Ingest(iter(chunks))
    assert ingest.first_ids == (expected[0][0][0], expected[0][-1][0])
    got = []
    while (data := ingest.step()) is not None:
        got.append(data)
    assert got == [b"".join(row for _id, row in chunk) for chunk in expected]


def test_keyed_rows_refuse_a_counter_beyond_bigint() -> None:
    rec = _record(random.Random(2), 5)
    rec["content_length"] = 2**63
    with pytest.raises(ValidationError):
        list(checked_rows(message_records([rec]), 64, RowEncoder()))


async def test_encoded_and_plain_batches_commit_together(tmp_path: Path) -> None:
    """A ``record_messages`` batch (encoded) and a copy's (normalized records) in one group commit: each id is
    written once, to the first batch that has it, and the files read back as the records."""
    import storage

    rnd = random.Random(11)
    store = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:
        first = [_record(rnd, mid) for mid in range(1, 3000)]  # over VALIDATE_IN_THREAD: checked in a thread
        second = [_record(rnd, mid) for mid in range(2000, 2600)]
        plain = [rec for chunk in normalized_chunks(message_records(second), 10**9) for rec in chunk]
        counts = await asyncio.gather(store.record_messages(first), store._messages.insert(plain),
                                      store.record_messages(first[:50]))
        assert sum(counts) == 2999
        stored = {r["message_id"]: r async for r in store.scan_messages()}
        assert sorted(map(int, stored)) == list(range(1, 3000))
    finally:
        await store.close()


@pytest.mark.parametrize("seed", range(3))
def test_order_key_sorts_as_order_and_holds_its_parts(seed: int) -> None:
    """A month's scan sorts by ``order_key`` strings (no tuple per record: see its docstring); they must sort
    exactly as the ``order`` tuples, with ids of every length and timestamps with and without microseconds."""
    rng = random.Random(seed)
    records = []
    for _ in range(3000):
        mid = str(rng.choice([rng.randrange(1, 10**4), rng.randrange(10**16, 10**19), 2**64 - 1 - rng.randrange(9)]))
        second = f"2024-05-0{rng.randrange(1, 4)}T10:00:{rng.randrange(3):02d}"
        ts = second + "Z" if rng.random() < 0.5 else f"{second}.{rng.randrange(10**6):06d}Z"
        records.append({"timestamp": ts, "message_id": mid})
    assert sorted(records, key=message_files.order_key) == sorted(records, key=message_files.order)
    for rec in records:
        key = message_files.order_key(rec)
        assert key[:message_files.ORDER_TS] == message_files.order(rec)[0]
        assert key[message_files.ORDER_ID:] == rec["message_id"]
