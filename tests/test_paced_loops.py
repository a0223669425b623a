"""The worker loops of copies, restores and backup checks pause for the event loop (issue 15, ``offload.Pacer``).

Each of these loops ran in a worker thread without a pause: a thread running Python (or short C calls between
system calls) beside the loop holds the GIL for whole switch intervals, so the loop waited 15-30 ms at a time
(benchmarks/bench_stalls.py: a JSON copy, a restore and its dry run). With ``Pacer.WORK`` at 0 every tick pauses, so
the pauses are counted (deterministic; the timing is the benchmark's): at least one per item of each loop, all in
the worker thread, and what each loop returns is byte for byte what it returns unpaced.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import storage
from storage.backends.json import message_files
from storage.backends.json import messages as json_messages
from storage.backends.json.journal import Op, encode_in_slices, encode_record
from storage.backends.json.message_files import list_months
from storage.backup import copy as backup_copy
from storage.backup import format as backup_format
from storage.backup import operations
from storage.backup.format import ContentDigest
from storage.errors import CorruptDataError
from storage.offload import Pacer
from tests.test_backup import json_config, populate
from tests.test_pacer import Pauses, pauses  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("pauses")


async def _paced_and_plain(pauses: Pauses, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                           run: Callable[[], Any]) -> tuple[Any, Any, int]:
    """``run()`` in a worker thread unpaced, then with a pause at every tick: both results and the pauses made."""
    monkeypatch.setattr(Pacer, "WORK", 3600.0)
    pauses.clear()
    plain = await asyncio.to_thread(run)
    assert pauses.made == []
    monkeypatch.setattr(Pacer, "WORK", 0.0)
    paced = await asyncio.to_thread(run)
    made = len(pauses.made)
    assert threading.get_ident() not in {thread for _w, _s, thread in pauses.made}
    pauses.clear()
    return plain, paced, made


@pytest.fixture
async def filled(tmp_path: Path) -> Any:
    async with storage.open_store(config=json_config(tmp_path / "data", tmp_path / "backups")) as store:
        await populate(store, members=50, messages=240)
        info = await store.create_backup()
        yield store, tmp_path / "backups", info.id


async def test_a_json_scan_loads_a_month_with_pauses(filled: Any, pauses: Pauses,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy from a JSON store reads its messages a month at a time: a pause per line parsed."""
    store = filled[0]
    root = store._messages.root
    months = list_months(root, None, None, None)
    paths = [root / guild / f"{month}.jsonl" for month, guilds in months for guild in guilds]
    plain, paced, made = await _paced_and_plain(pauses, monkeypatch,
                                                lambda: json_messages._load_month(paths, None, None))
    assert len(plain) == 240 and paced == plain
    assert made >= len(plain)


async def test_a_copys_and_a_restores_document_loops_pause(filled: Any, pauses: Pauses,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The documents of a copy and a restore (``stored_pairs``), the copy's verification (``_digest_view``) and
    the restore's freeing of what it read (``_free``): a pause per document, per 1,000 freed."""
    store = filled[0]
    raws = {key: orjson.dumps(doc) async for key, doc in store.items("members")}
    keys = list(raws)

    def pairs() -> tuple[list[tuple[str, bytes]], dict[str, str]]:
        digest = ContentDigest()
        return operations.stored_pairs("members", keys, raws, digest), digest.hexdigests()

    plain, paced, made = await _paced_and_plain(pauses, monkeypatch, pairs)
    assert paced == plain and len(plain[0]) == 50 and made >= 50

    def view() -> tuple[int, dict[str, str]]:
        digest = ContentDigest()
        return backup_copy._digest_view(digest, "members", raws), digest.hexdigests()

    plain, paced, made = await _paced_and_plain(pauses, monkeypatch, view)
    assert paced == plain and plain[0] == 50 and made >= 50

    def free() -> list[Any]:
        held: list[Any] = [{str(i): b"x" for i in range(3500)}, tuple(keys)]
        operations._free(held)
        return held

    plain, paced, made = await _paced_and_plain(pauses, monkeypatch, free)
    assert plain == paced == [] and made >= 4


async def test_a_backup_check_pauses_per_chunk(filled: Any, pauses: Pauses,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore's and ``verify_backup``'s check (hash and count every file): a pause per chunk read; a damaged
    file is reported the same way paced."""
    _store, backups, backup_id = filled
    monkeypatch.setattr(backup_format, "_CHUNK", 256)  # many chunks from a small backup

    def check() -> tuple[bool, list[str], dict[str, int]]:
        report = backup_format.verify_backup_dir(backups, backup_id)
        return report.ok, report.problems, report.counts

    plain, paced, made = await _paced_and_plain(pauses, monkeypatch, check)
    assert plain == paced and plain[0]
    files = [p for p in (backups / backup_id).rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert made >= len(files) + 2
    damaged = next(p for p in files if p.name.startswith("messages"))
    damaged.write_bytes(damaged.read_bytes()[:-40])
    plain, paced, made = await _paced_and_plain(pauses, monkeypatch, check)
    assert plain == paced and not plain[0] and plain[1] and made >= 1


async def test_a_large_record_is_encoded_with_pauses(pauses: Pauses,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A large journal record (a restore's, a forget's, a large commit's) encoded a slice at a time: a pause per
    slice, the same bytes as one ``encode_record``."""
    ops: list[Op] = [("put", "members", f"k{i}", orjson.dumps({"n": i})) for i in range(21)]
    ops.append(("delete", "members", "k3"))
    plain, paced, made = await _paced_and_plain(pauses, monkeypatch, lambda: encode_in_slices(ops, 4))
    assert plain == paced == encode_record(ops)
    assert made >= 6


async def test_a_month_loaded_a_piece_at_a_time_keeps_its_lines_and_its_errors(
        filled: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The month's files are split a piece at a time (not one ``split`` of a whole file): the same lines with pieces
    of any size; a bad last complete line is left for later (being written, or torn), a bad line before it is
    corruption, with its byte offset."""
    store = filled[0]
    root = store._messages.root
    month, guilds = list_months(root, None, None, None)[0]
    paths = [root / guild / f"{month}.jsonl" for guild in guilds]
    whole = json_messages._load_month(paths, None, None)
    for piece in (1, 64, 1000):
        monkeypatch.setattr(message_files, "PIECE", piece)
        assert json_messages._load_month(paths, None, None) == whole
    data = paths[0].read_bytes()
    bad = tmp_path / f"{month}.jsonl"
    bad.write_bytes(data + b'{"message_id": "torn\n{"message_id":')  # a bad last line, then an incomplete one
    assert json_messages._load_month([bad, *paths[1:]], None, None) == whole
    first = data.index(b"\n") + 1
    bad.write_bytes(data[:first] + b"not json\n" + data[first:])
    with pytest.raises(CorruptDataError, match=f"byte {first}|offset {first}|{first}"):
        json_messages._load_month([bad], None, None)


async def test_a_backups_sort_of_a_collections_keys_pauses(pauses: Pauses,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup writes a collection in key order (``_write_view``): its runs sorted and merged with a pause after
    each run and every ``_MERGE_TICK`` keys merged (an unpaced merge of 100k keys held the GIL 17 ms at a time),
    to the same order as one ``sorted``."""
    keys = [f"k{(i * 7919) % 30011}" for i in range(30011)]
    plain, paced, made = await _paced_and_plain(pauses, monkeypatch, lambda: operations._sorted_keys(keys))
    assert plain == paced == sorted(keys)
    assert made >= len(keys) // 64 + len(keys) // 8192
