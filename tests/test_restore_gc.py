"""A restore's message passes hold few decoded records at a time (issue 15: loop stalls at scale).

Checking, staging (JSON) and encoding for ``COPY`` (PostgreSQL) walk every backed-up record in a worker thread.
Held 2,000-10,000 at a time as dicts, the records lived long enough to reach the collector's oldest generation,
and the full collections that set off (38-85 in a restore of 1M messages, 18-48 ms each) held the GIL the event
loop needs. They are now decoded ``DECODE_GROUP`` at a time and only bytes are kept: no full collection at all.
Counted, not timed: the full collections during each pass, and the results against the unchunked reference.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from storage.backends.json import restore as json_restore
from storage.backends.postgres.ingest import RowEncoder
from storage.backends.postgres.store import _next_copy_data
from storage.backup.format import MESSAGES_FILE, JsonlWriter
from storage.backup.messages import DECODE_GROUP, ROW_GROUP, MessageOps
from storage.messages.records import normalize_messages


def _records(n: int, seed: int = 5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return normalize_messages([
        {"message_id": str(10_000 + i), "guild_id": str(100 + i % 3), "channel_id": str(rng.choice([5, 6, 8])),
         "author_id": str(rng.randrange(1, 400)),
         "timestamp": f"2024-0{1 + i % 4}-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:00:00Z",
         "content_length": rng.randrange(50),
         "analysis": {"sentiment": rng.choice(["positive", "negative"]),
                      "topics": rng.sample(["a", "b", "c", "d"], rng.randrange(3))}} for i in range(n)])


def _backup_file(root: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    writer = JsonlWriter(root, MESSAGES_FILE)
    for record in records:
        writer.write(orjson.dumps(record) + b"\n")
    entry: dict[str, Any] = writer.close()
    return entry


def _promoted(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """How many objects reached the oldest generation during ``fn()`` (what, once a quarter of the heap, sets
    off a full collection), how many full collections ran, and ``fn()``'s result."""
    counter = _Promotions()
    with counter:
        result = fn()
    return counter.promoted, counter.full, result


async def _promoted_async(work: Awaitable[Any]) -> tuple[int, int, Any]:
    """:func:`_promoted` of awaiting ``work`` (every thread's collections count: the worker threads' too)."""
    counter = _Promotions()
    with counter:
        result = await work
    return counter.promoted, counter.full, result


class _Promotions:
    """Counts, from ``gc.callbacks``, the objects moved to the oldest generation and the full collections."""

    def __init__(self) -> None:
        self.promoted = self.full = 0
        self._before = 0

    def __enter__(self) -> None:
        gc.collect()
        gc.callbacks.append(self._seen)

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._seen)

    def _seen(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            self.full += phase == "start"
        elif info["generation"] == 1:  # survivors of a middle-generation collection move to the oldest
            if phase == "start":
                self._before = len(gc.get_objects(generation=2))
            else:
                self.promoted += len(gc.get_objects(generation=2)) - self._before


def test_commit_groups_run_every_batch_once_in_runs_of_at_least_the_bound() -> None:
    def runs(sizes: list[int], bound: int) -> list[list[int]]:
        batches = [[i] * size for i, size in enumerate(sizes)]
        got = [list(run) for run in json_restore.commit_groups(iter(batches), bound)]
        assert [batch for run in got for batch in run] == batches  # each batch once, in order, none split
        return [[len(batch) for batch in run] for run in got]

    assert runs([3, 3, 3, 5, 1, 3, 2], 6) == [[3, 3], [3, 5], [1, 3, 2]]  # exactly at the bound, over it
    assert runs([3, 3, 3, 5, 1, 3, 2, 4], 6) == [[3, 3], [3, 5], [1, 3, 2], [4]]  # a shorter last run
    assert runs([9], 6) == [[9]] and runs([2], 6) == [[2]] and runs([], 6) == []
    assert runs([1] * 5, 1) == [[1]] * 5


def _staged_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def test_staging_in_small_batches_writes_the_files_one_batch_writes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Small batches appended several to a commit (STAGE_COMMIT records), commit boundaries falling inside and
    between files, give the files staging everything at once gives; an id in two batches is kept once (the first),
    also across commits."""
    records = _records(500)
    one = tmp_path / "one"
    one.mkdir()
    staged_one, count_one = json_restore.stage_messages(one, [records])
    monkeypatch.setattr(json_restore, "STAGE_COMMIT", 50)
    small = tmp_path / "small"
    small.mkdir()
    batches = [records[i:i + 7] for i in range(0, len(records), 7)]
    staged_small, count_small = json_restore.stage_messages(small, [*batches, records[:3], records[60:64]])
    assert count_one == count_small == len(records)
    assert _staged_files(staged_small) == _staged_files(staged_one) and len(_staged_files(staged_one)) == 12


def test_copy_data_from_small_batches_is_each_run_sorted_by_id() -> None:
    """PostgreSQL's restore: ``_next_copy_data`` over small batches gives, run after run, the rows of at least
    ``rows`` records in id order (what one sorted encoding of those records gives), then None."""
    records = _records(100)
    random.Random(3).shuffle(records)
    batches = iter([records[i:i + 7] for i in range(0, len(records), 7)])
    encoder = RowEncoder()
    got = []
    while (data := _next_copy_data(batches, encoder, 20)) is not None:
        got.append(data)
    reference = RowEncoder()
    expected = [b"".join(row for _, row in sorted(reference.record(r) for r in records[start:start + 21]))
                for start in range(0, 100, 21)]  # three batches of 7 reach 20
    assert got == expected and len(got) == 5


@pytest.mark.parametrize("what", ["check", "stage", "copy rows"])
def test_a_restores_message_passes_set_off_no_full_collection(tmp_path: Path, what: str) -> None:
    """30k records through each pass: next to none of them reaches the oldest generation, so no full collection
    runs. (Decoded 2,000 at a time, the check moved ~110k objects there and the staging ~86k; 10,000 at a time, the
    COPY encoding ~89k: measured with this test's counting, 0, 0 and ~600 now.)"""
    records = _records(30_000)
    entry = _backup_file(tmp_path, records)
    del records
    passes: dict[str, Callable[[], Any]] = {
        "check": lambda: MessageOps.check_backup(tmp_path, entry),
        "stage": lambda: json_restore.stage_messages(tmp_path, MessageOps.backup_batches(tmp_path, entry,
                                                                                        DECODE_GROUP))[1],
        "copy rows": lambda: _copy_rows(MessageOps.backup_batches(tmp_path, entry, ROW_GROUP)),
    }
    promoted, full, count = _promoted(passes[what])
    assert count == 30_000
    assert promoted < 3000 and full == 0, f"{what}: {promoted} objects promoted, {full} full collections"


def test_copy_rows_held_as_bytes_promote_nothing(tmp_path: Path) -> None:
    """PostgreSQL's restore encodes its ``COPY`` rows from ROW_GROUP records at a time and holds them as keyed
    bytes. The collector runs when the count of live tracked containers grows (allocations minus frees): with
    ``(id, row)`` tuples held, 10k more a ``COPY`` ran young collections, each moving what was alive then (the
    group being decoded; in a store, the loop's handles and futures) to the oldest generation (100k records:
    293 objects at ROW_GROUP, 2,151 at DECODE_GROUP; 10k in a restore at 1M messages). Held as bytes, decoded
    records are freed as fast as they are made, whatever the group: nothing is promoted."""
    entry = _backup_file(tmp_path, _records(30_000))
    small = _promoted(lambda: _copy_rows(MessageOps.backup_batches(tmp_path, entry, ROW_GROUP)))[0]
    large = _promoted(lambda: _copy_rows(MessageOps.backup_batches(tmp_path, entry, DECODE_GROUP)))[0]
    assert ROW_GROUP < DECODE_GROUP and small < 50 and large < 50, (small, large)


def _copy_rows(batches: Iterator[list[dict[str, Any]]]) -> int:
    """The records ``_next_copy_data`` encoded from ``batches`` (every one of them, as asserted)."""
    seen = 0

    def counted() -> Iterator[list[dict[str, Any]]]:
        nonlocal seen
        for batch in batches:
            seen += len(batch)
            yield batch

    encoder, source, runs = RowEncoder(), counted(), 0
    while _next_copy_data(source, encoder) is not None:
        runs += 1
    assert runs == 3  # 10,048 + 10,048 + the rest
    return seen


@pytest.mark.parametrize("through", ["view", "items"])
async def test_a_copy_holds_no_batch_of_decoded_documents(tmp_path: Path, through: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy holds no batch of decoded documents: a JSON source's are read from its encoded view (decoded,
    hashed and encoded for the target a few dozen at a time in a worker thread); a source without one (``items``,
    PostgreSQL's way, forced here) has each document encoded as it comes, and the verification hashes canonical
    bytes made as each comes. Held decoded, 5,000 members a batch (and 2,000 a verification chunk) reached the
    collector's oldest generation: ~128k objects moved there in this test, under 3k now either way. Same copy,
    expiries included."""
    import storage
    from storage.backends.json.transaction import JsonTransaction
    from storage.backup.copy import copy

    if through == "items":
        monkeypatch.setattr(JsonTransaction, "encoded_documents", lambda self, collection: None)
    n = 12_000
    async with storage.open_store(backend="json", path=str(tmp_path / "src")) as source:
        for start in range(0, n, 2000):
            await source.put_many("people", {f"p{i:05d}": {"name": f"n{i}", "roles": ["a", str(i % 7)],
                                                           "stats": {"count": i, "tags": [i]}}
                                             for i in range(start, start + 2000)})
        await source.put("people", "brief", {"short": True}, ttl=3600)
        async with storage.open_store(backend="json", path=str(tmp_path / "dst")) as target:
            promoted, _full, report = await _promoted_async(copy(source, target))
            assert report.counts == {"people": n + 1}
            assert {k: d async for k, d in target.items("people")} == {k: d async for k, d in source.items("people")}
            assert await target._expiries("people", ["brief"]) == await source._expiries("people", ["brief"]) != {}
    assert promoted < 3000, promoted


async def test_a_restore_encodes_its_documents_in_the_thread_that_decodes_them(store: Any) -> None:
    """A restore's puts are decoded and encoded in one worker-thread pass, DECODE_GROUP at a time: no batch of
    decoded documents travels to the loop and back (2,000 at a time, they reached the collector's oldest
    generation: ~65k objects in this test, against under 3k now). The documents and their expiries come back
    exactly."""
    n = 12_000
    docs = {f"p{i:05d}": {"name": f"n{i}", "roles": ["a", str(i % 7)], "stats": {"count": i, "tags": [i]}}
            for i in range(n)}
    for start in range(0, n, 3000):
        await store.put_many("people", dict(list(docs.items())[start:start + 3000]))
    await store.put("people", "brief", {"short": True}, ttl=3600)
    expiry = await store._expiries("people", ["brief"])
    info = await store.create_backup()
    await store.delete_many("people", prefix="p")
    await store.put("people", "extra", {"gone": "after the restore"})
    promoted, _full, _report = await _promoted_async(store.restore_backup(info.id))
    assert {k: d async for k, d in store.items("people")} == {**docs, "brief": {"short": True}}
    assert await store._expiries("people", ["brief"]) == expiry != {}
    assert promoted < 3000, promoted


def test_staged_views_of_untouched_collections_are_the_committed_data() -> None:
    """A JSON transaction's view of a collection it staged nothing in is the committed mapping itself, found
    without a pass over the changes (a restore's later collections after 100k staged members: 5-10 ms on the
    loop each); views and keys of the touched ones still layer the changes, frozen copies included."""
    from storage.backends.json.tables import Staged

    base = {"a": {"x": b"1", "y": b"2"}, "b": {"z": b"3"}}
    staged = Staged(base)  # type: ignore[arg-type]
    staged.apply([("p", "a", "w", b"4"), ("d", "a", "x")])
    assert staged.view("b") is base["b"] and staged.keys("b") == {"z"} and staged.names == {"a"}
    assert dict(staged.view("a")) == {"y": b"2", "w": b"4"} and staged.keys("a") == {"y", "w"}
    frozen = staged.frozen()
    staged.apply([("p", "b", "v", b"5"), ("p", "c", "u", b"6")])
    assert dict(staged.view("b")) == {"z": b"3", "v": b"5"} and dict(staged.view("c")) == {"u": b"6"}
    assert frozen.view("b") is base["b"] and frozen.names == {"a"} and staged.names == {"a", "b", "c"}



def test_a_count_freezes_only_the_counted_collections_changes() -> None:
    """A JSON transaction's count over many staged changes copies (on the loop) the counted collection's changes
    alone: a restore counting each collection after staging 100k members copied those again for every later
    collection, 5-13 ms in one loop step each. The copy still shows that collection as staged, later changes not."""
    from storage.backends.json.tables import Staged
    from storage.backends.json.transaction import live_count

    base = {"a": {"x": b"1", "y": b"2"}, "b": {"z": b"3"}}
    staged = Staged(base)  # type: ignore[arg-type]
    staged.apply([("p", "a", f"k{i}", b"4") for i in range(50)] + [("d", "a", "x"), ("p", "b", "v", b"5", 10)])
    frozen = staged.frozen("b")
    assert frozen.changes == {"b": {"v": b"5"}} and frozen.expiring == {"b": {"v": 10}}
    staged.apply([("p", "b", "w", b"6")])
    assert live_count(frozen, "b", 5) == 2 and live_count(frozen, "b", 11) == 1 and live_count(staged, "b", 5) == 3
    assert staged.frozen().changes.keys() == {"a", "b"}

async def test_a_large_committed_transaction_is_freed_off_the_loop(tmp_path: Path) -> None:
    """A JSON transaction of more than ITEMS_INLINE operations hands its staged operations to a worker thread to
    free once committed (dropped with it on the loop, 100k took 8-11 ms in one step); a small one, or one that
    did not commit, keeps them. What was committed is all there."""
    import asyncio

    import storage
    from storage.backends.json.listing import ITEMS_INLINE

    async with storage.open_store(backend="json", path=str(tmp_path / "s")) as store:
        big = {f"k{i:05d}": {"n": i, "tags": [i]} for i in range(ITEMS_INLINE + 10)}
        async with store.transaction() as tx:
            await tx.put_many("c", big)
            await tx.put("c", "one", {"n": -1})
        assert tx._ops == [] and tx._staged.changes == {}  # handed off
        async with store.transaction() as small:
            await small.put("c", "two", {"n": -2})
        assert len(small._ops) == 1 and len(small._staged.changes) == 1
        with pytest.raises(RuntimeError):
            async with store.transaction() as failed:
                await failed.put_many("d", big)
                raise RuntimeError("abandoned")
        assert len(failed._ops) == len(big)  # not committed: kept (nothing else may still read them)
        await asyncio.sleep(0.05)
        assert {k: d async for k, d in store.items("c")} == {**big, "one": {"n": -1}, "two": {"n": -2}}
        assert await store.count("d") == 0


def test_free_staged_empties_in_slices() -> None:
    from storage.backends.json.transaction import free_staged

    ops: list[Any] = [("p", "c", str(i), b"{}") for i in range(2500)]
    inner: dict[str, bytes | None] = {str(i): b"{}" for i in range(2500)}
    changes: dict[str, dict[str, bytes | None]] = {"c": inner, "d": {"k": None}}
    free_staged(ops, changes)
    assert ops == [] and changes == {} and inner == {}


def test_staged_changes_are_not_tracked_by_the_collector() -> None:
    """A JSON transaction's staged changes are dicts of strings to bytes per collection, which the garbage
    collector does not track: a restore's 100k staged members add no referent to a full collection's walk (keyed
    by ``(collection, key)`` tuples, they were 200k, and the expiries as many again)."""
    import gc

    from storage.backends.json.tables import Staged

    staged = Staged({"a": {"x": b"1"}}, {"a": {"x": 5}})
    staged.apply([("p", "a", str(i), b"{}") for i in range(5000)] + [("d", "a", "x"), ("p", "b", "k", b"{}", 9)])
    gc.collect()
    assert all(not gc.is_tracked(mine) for mine in staged.changes.values())
    assert all(not gc.is_tracked(mine) for mine in staged.expiring.values())
    assert staged.expiring == {"a": {"x": None}, "b": {"k": 9}} and staged.size() == 5002 + 2
    assert staged.live("a", "x", 0) is None and staged.live("b", "k", 0) == b"{}" and staged.expiry("b", "k") == 9


async def test_a_copys_messages_hold_no_batch_of_decoded_records(tmp_path: Path, store: Any) -> None:
    """A copy's messages are held as lines between the source's scan and the target (each backend as the target),
    which decodes and encodes them DECODE_GROUP at a time in its worker thread, hashing them on the way. Held as
    2,000 decoded records a batch, this copy moved ~33k (JSON target) and ~40k (PostgreSQL) objects to the
    collector's oldest generation, and a copy of 1M messages ran 38-48 full collections; now under 1k and ~3.2k
    (the PostgreSQL verification's scan). Same records on both sides, same digest as a scan's."""
    import storage
    from storage.backup.copy import copy
    from storage.backup.format import MESSAGES_DIGEST_NAME

    records = _records(30_000, seed=11)
    async with storage.open_store(backend="json", path=str(tmp_path / "src")) as source:
        await source.record_messages(records)
        promoted, _full, report = await _promoted_async(copy(source, store))
        assert report.messages == 30_000
        got = [r async for r in store._scan_messages()]
        assert sorted(got, key=lambda r: int(r["message_id"])) == records
        assert report.digests[MESSAGES_DIGEST_NAME] == (await MessageOps(source).digest())[1]
    assert promoted < 5000, promoted


async def test_inserting_message_groups_skips_stored_ids_like_insert_messages(store: Any) -> None:
    """``_insert_message_groups`` (a copy's way in) stores what ``_insert_messages`` stores: ids already there are
    skipped and counted as not new, on each backend; the lines decoded by ``decoded_groups`` are the records."""
    from storage.backup.messages import decoded_groups

    records = _records(3_000, seed=12)
    assert await store._insert_messages(records[:1000]) == 1000
    lines = [orjson.dumps(r) for r in records[500:]]
    assert [r for g in decoded_groups(lines) for r in g] == records[500:]
    assert await store._insert_message_groups(decoded_groups(lines)) == 2000
    got = [r async for r in store._scan_messages()]
    assert sorted(got, key=lambda r: int(r["message_id"])) == records
