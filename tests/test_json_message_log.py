"""The JSON message log's fast paths, each against the slow path it replaces.

Ingest encodes a whole batch with one ``orjson.dumps`` and splits it at the record boundaries; the id index is
read with a regular expression over whole blocks; an update finds its record by searching the file backwards;
concurrent inserts are group-committed. Each of these has a fallback or an edge (records whose text could fool the
split, lines this module did not write, a record at the very start of a file or across a search block, a failed
write), and these tests go through them with real files.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage import DatabaseError
from storage.backends.json.message_files import encode_bodies, encode_line, join_lines

GUILD = "100"


def msg(mid: int, **fields: Any) -> dict[str, Any]:
    record = {"message_id": str(mid), "guild_id": GUILD, "channel_id": "200", "author_id": "300",
              "timestamp": "2024-01-15T12:00:00Z", "content_length": 10, "attachments": 0, "reactions": 0,
              "analysis": {"sentiment": "positive", "topics": ["music"]}}
    record.update(fields)
    return record


@pytest.fixture
async def json_store(tmp_path: Path) -> Any:
    s = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:
        yield s
    finally:
        await s.close()


def month_file(store: Any, guild: str = GUILD, month: str = "2024-01") -> Path:
    return Path(store.path) / "messages" / guild / f"{month}.jsonl"


async def scan(store: Any) -> dict[str, dict[str, Any]]:
    return {r["message_id"]: r async for r in store.scan_messages(None, None, None)}


# ---------------------------------------------------------------------------------------------------------------
# encoding a batch in one piece
TRICKY = [
    msg(1, extra=[{"x": 1}, {"message_id": "5"}]),  # a nested object that starts like a record
    {"guild_id": GUILD, "message_id": "2", **{k: v for k, v in msg(2).items() if k != "message_id"}},  # key order
    msg(3, note='},{"message_id":"4", and a\nnewline'),  # the separator inside a string
    msg(4, note="ünïcödé ✓ \u2028", nested={"message_id": "6", "deeper": [{"message_id": "7"}]}),
    msg(5, count=2**63, ratio=0.5, flag=True, nothing=None),
]


@pytest.mark.parametrize("records", [TRICKY, TRICKY[:1], TRICKY[1:2], [msg(i) for i in range(1, 50)],
                                     [msg(i, note=f"{i}" * i) for i in range(1, 30)]])
def test_one_dumps_split_at_record_boundaries_gives_the_lines_of_encoding_each_record(records):
    lines = join_lines(encode_bodies(records)).split(b"\n")
    assert lines[-1] == b""
    assert lines[:-1] == [encode_line(r) for r in records]
    assert [orjson.loads(line) for line in lines[:-1]] == records
    assert all(line.startswith(b'{"message_id":"') for line in lines[:-1])


async def test_tricky_records_round_trip_through_the_files(json_store, tmp_path):
    assert await json_store.record_messages(TRICKY) == len(TRICKY)
    stored = await scan(json_store)
    for record in TRICKY:
        assert stored[record["message_id"]] == record
    lines = month_file(json_store).read_bytes().splitlines()
    assert len(lines) == len(TRICKY) and all(line.startswith(b'{"message_id":"') for line in lines)
    other = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:  # a fresh index, read from these lines: every id is known, none twice
        assert await other.record_messages([*TRICKY, msg(6)]) == 1
        assert len(other._messages._index) == len(TRICKY) + 1
    finally:
        await other.close()


# ---------------------------------------------------------------------------------------------------------------
# the id index
async def test_the_index_reads_update_lines_and_lines_written_by_hand(json_store, tmp_path):
    await json_store.record_messages([msg(i) for i in range(1, 6)])
    await json_store.update_message(3, {"reactions": 7})
    path = month_file(json_store)
    # a valid record whose message_id is not first: not our writer's, but not corrupt either
    by_hand = {k: v for k, v in msg(9).items() if k != "message_id"} | {"message_id": "9"}
    with path.open("ab") as f:
        f.write(orjson.dumps(by_hand) + b"\n")
    assert await json_store.record_messages([msg(9), msg(8)]) == 1  # the line by hand is now in the middle
    other = await storage.open_store(backend="json", path=str(tmp_path / "data"))
    try:
        assert await other.record_messages([msg(i) for i in range(1, 11)]) == 3  # 6, 7, 10
        assert sorted(map(int, other._messages._index)) == list(range(1, 11))
        assert await other.update_message(9, {"reactions": 2})
        assert (await scan(other))["9"]["reactions"] == 2
    finally:
        await other.close()


# ---------------------------------------------------------------------------------------------------------------
# updates find the record's latest line by searching backwards
async def test_updates_find_records_anywhere_in_a_large_file(json_store):
    padding = "x" * 400  # ~5000 lines of ~600 bytes: the file spans several 1 MiB search blocks
    n = 5000
    for start in range(1, n + 1, 1000):
        await json_store.record_messages([msg(i, note=padding) for i in range(start, start + 1000)])
    assert month_file(json_store).stat().st_size > 2 * (1 << 20)
    targets = [1, 2, 1700, 1750, 2500, n - 1, n]  # the very first line (no newline before it), block edges, the end
    for t in targets:
        assert await json_store.update_message(t, {"reactions": t % 97 + 1})
    assert await json_store.update_message(1, {"reactions": 99})  # the update line is now the latest version
    assert await json_store.update_message(1, {"analysis": {"sentiment": "negative"}})
    stored = await scan(json_store)
    assert stored["1"]["reactions"] == 99 and stored["1"]["analysis"] == {"sentiment": "negative"}
    for t in targets[1:]:
        assert stored[str(t)]["reactions"] == t % 97 + 1
    assert stored["3"]["reactions"] == 0
    assert await json_store.update_message(n + 1, {"reactions": 1}) is False


async def test_an_id_that_is_a_prefix_of_another_is_not_confused_with_it(json_store):
    await json_store.record_messages([msg(12), msg(123), msg(1234)])
    assert await json_store.update_message(12, {"reactions": 5})
    assert await json_store.update_message(123, {"reactions": 6})
    stored = await scan(json_store)
    assert [stored[m]["reactions"] for m in ("12", "123", "1234")] == [5, 6, 0]


# ---------------------------------------------------------------------------------------------------------------
# group commit
async def test_concurrent_inserts_count_each_message_once(store):
    """Callers that arrive together are written together; each id is still new for exactly one of them."""
    ids = list(range(1, 201))
    singles = [store.record_message(msg(i)) for i in ids for _ in range(2)]  # every id sent twice, concurrently
    batches = [store.record_messages([msg(i) for i in ids[k:k + 30]]) for k in range(0, 200, 20)]  # overlapping
    results = await asyncio.gather(*singles, *batches)
    single_results, batch_results = results[:len(singles)], results[len(singles):]
    assert sum(single_results) + sum(batch_results) == len(ids)
    assert await store.message_counts(GUILD) == len(ids)


async def test_a_cancelled_insert_is_written_or_not_but_never_twice(json_store):
    tasks = [asyncio.ensure_future(json_store.record_messages([msg(i), msg(i + 1000)])) for i in range(1, 41)]
    await asyncio.sleep(0)
    for task in tasks[::3]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    stored = await scan(json_store)
    for i, result in enumerate(done, start=1):
        if isinstance(result, asyncio.CancelledError):
            assert (str(i) in stored) == (str(i + 1000) in stored)  # a batch is all or nothing
        else:
            assert result == 2 and str(i) in stored
    again = await json_store.record_messages([msg(i) for i in range(1, 41)])
    assert again == 40 - sum(1 for i in range(1, 41) if str(i) in stored)
    assert await json_store.message_counts(GUILD) == len(stored) + again


# ---------------------------------------------------------------------------------------------------------------
# a failed write changes nothing, the index included
async def test_a_failed_append_forgets_the_ids_it_was_writing(json_store):
    await json_store.record_messages([msg(1)])
    blocker = month_file(json_store, month="2024-02")
    blocker.mkdir()  # the February file cannot be opened for writing: the whole batch must fail
    batch = [msg(2), msg(3, timestamp="2024-02-10T00:00:00Z"), msg(4)]
    january = month_file(json_store).read_bytes()
    with pytest.raises(DatabaseError):
        await json_store.record_messages(batch)
    assert month_file(json_store).read_bytes() == january  # cut back
    assert set(await scan(json_store)) == {"1"}
    blocker.rmdir()
    assert await json_store.record_messages(batch) == 3  # not mistaken for stored ones
    assert set(await scan(json_store)) == {"1", "2", "3", "4"}
