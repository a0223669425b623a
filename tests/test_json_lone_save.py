"""The JSON backend's lone-save path (issue 15): ``save_member_data`` and ``get_member_data`` one coroutine deep,
the journal line spliced by hand, ``Tables.apply`` of a lone put, against what they replace.

* :func:`storage.member_fast.encode_member_save` against ``member_key`` + the full member rule (a plain-Python
  reference: the checks spelled out), on random ids and random members, valid and invalid: it may only decline;
* the JSON store's ``save_member_data`` against the generic one (``MembersMixin``, through ``put``): the same
  bytes on disk, journal line for journal line, and the same errors with nothing written;
* the guards (closed, read-only, a transaction open in the task), the change feed, a second store on the folder,
  a reopen;
* ``Tables.apply`` of one put against the per-operation loop, expiries and lazy collections included.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from storage import ReadOnlyError, StoreClosedError, StoreConfig, TransactionError, ValidationError
from storage.backends.json import group_commit, lease
from storage.backends.json import store as json_store
from storage.backends.json.journal import encode_record
from storage.member_calls import MembersMixin
from storage.member_fast import encode_member_save
from storage.models import member_key
from storage.stores import JsonStore
from tests.test_member_fast import SEEDS, _tables, outcome, previous_apply, previous_rule, random_id, random_member


def cfg(folder: Path, **kw: Any) -> StoreConfig:
    return StoreConfig(backend="json", path=str(folder), source="tests", **kw)


def random_ids(rnd: random.Random) -> tuple[Any, Any]:
    """(user_id, guild_id): usually two ints as discord.py gives them, sometimes anything ``save_member_data``
    may be called with."""
    if rnd.random() < 0.8:
        return rnd.choice([0, 1, 2**63, 2**64 - 1, rnd.randrange(10**17, 10**19)]), rnd.randrange(1, 10**19)
    return random_id(rnd), random_id(rnd)


def reference_save(user_id: Any, guild_id: Any, doc: Any) -> tuple[str, bytes]:
    """What the generic ``save_member_data`` stores: ``member_key``, then the full rule (no fast path)."""
    key = member_key(user_id, guild_id)
    return key, previous_rule(key, doc)


@pytest.mark.parametrize("seed", SEEDS)
def test_encode_member_save_accepts_only_what_the_rule_accepts_and_stores_the_same_bytes(seed: int) -> None:
    rnd = random.Random(1500 + seed)
    taken = refused = 0
    for _ in range(3000):
        _key, doc, _guild, _user = random_member(rnd)
        user_id, guild_id = random_ids(rnd)
        if rnd.random() < 0.6 and isinstance(doc, dict):  # the record's own ids agree with the key's, as usual
            doc["user_id"], doc["guild_id"] = str(user_id), str(guild_id)
        before = outcome(reference_save, user_id, guild_id, doc)
        fast = encode_member_save(user_id, guild_id, doc)
        if fast is not None:
            assert before == ("ok", fast, None), (user_id, guild_id, doc)
            taken += 1
        refused += before[0] == "error"
    assert taken > 500 and refused > 300


def test_encode_member_save_declines_what_is_not_two_plain_ints() -> None:
    doc = {"statistics": {"message_count": 1}}
    assert encode_member_save(5, 7, doc) == ("7_5", b'{"statistics":{"message_count":1}}')
    for user_id, guild_id in [(True, 7), (5, False), ("5", 7), (5, 2**64), (-1, 7), (5.0, 7)]:
        assert encode_member_save(user_id, guild_id, doc) is None


def journal_lines(folder: Path) -> list[bytes]:
    """The records of ``storage.journal`` (its header line and the filler after the records left out)."""
    raw = (folder / "storage.journal").read_bytes()
    return [line + b"\n" for line in raw.split(b"\n")[1:] if line.startswith(b"[")]


async def test_the_fast_save_writes_what_the_generic_save_writes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Random members saved by the JSON store's ``save_member_data`` and by ``MembersMixin``'s (through ``put``)
    in two stores: the same journal lines (each equal to ``encode_record`` of its put), the same documents, the
    same errors, and a refused save changes nothing on disk."""
    # a loaded machine must not end the lease, nor send the appends to a thread, by the clock here
    monkeypatch.setattr(lease, "BUDGET", 30.0)
    monkeypatch.setattr(group_commit, "SOLO_TURN_BUDGET", 30.0)
    monkeypatch.setattr(json_store, "INLINE_SYNC_BUDGET", 30.0)
    rnd = random.Random(77)
    fast_dir, generic_dir = tmp_path / "fast", tmp_path / "generic"
    fast, generic = await JsonStore.open(cfg(fast_dir)), await JsonStore.open(cfg(generic_dir))
    spliced: list[bytes] = []  # the lines save_member_data built itself, committed synchronously
    commit_now = fast._commit_now

    def counted(ops: Any, record: bytes | None = None, *, claims: bool = False) -> None:
        if record is not None:
            spliced.append(record)
        commit_now(ops, record, claims=claims)

    fast._commit_now = counted  # type: ignore[method-assign]
    try:
        cases = []
        for _ in range(400):
            _key, doc, _guild, _user = random_member(rnd)
            user_id, guild_id = random_ids(rnd)
            if rnd.random() < 0.7 and isinstance(doc, dict):
                doc["user_id"], doc["guild_id"] = str(user_id), str(guild_id)
            cases.append((user_id, guild_id, doc))
        outcomes: dict[str, list[tuple[Any, ...]]] = {"fast": [], "generic": []}
        for name, store in (("fast", fast), ("generic", generic)):  # each store's saves back to back (the lease)
            for user_id, guild_id, doc in cases:
                size = (store.path / "storage.journal").stat().st_size, len(journal_lines(store.path))
                try:
                    if name == "fast":
                        outcomes[name].append(("ok", await store.save_member_data(user_id, guild_id, doc), None))
                    else:
                        outcomes[name].append(("ok", await MembersMixin.save_member_data(store, user_id, guild_id,
                                                                                       doc), None))
                except ValidationError as exc:
                    outcomes[name].append(("error", str(exc), exc.field))
                    assert ((store.path / "storage.journal").stat().st_size, len(journal_lines(store.path))) == size
        assert outcomes["fast"] == outcomes["generic"]
        saved = sum(1 for outcome in outcomes["fast"] if outcome[0] == "ok")
        errors = len(cases) - saved
        usual = sum(1 for case in cases if encode_member_save(*case) is not None)
        assert saved > 100 and errors > 50 and usual > 50
        assert len(spliced) >= usual - 2  # every usual save but the first ones (no lease yet) committed at once
        lines = journal_lines(fast_dir)
        assert lines == journal_lines(generic_dir) and len(lines) == saved
        for line in lines:
            [[op, collection, key, doc]] = orjson.loads(line)
            assert line == encode_record([(op, collection, key, orjson.dumps(doc))])
        assert fast._tables.sizes == generic._tables.sizes
        assert dict(fast._tables.data["members"].items()) == dict(generic._tables.data["members"].items())
    finally:
        await fast.close()
        await generic.close()
    again = await JsonStore.open(cfg(fast_dir))
    try:
        assert await again.get_member_data(5, 7) == await again.get("members", "7_5", {})
        assert await again.count("members") > 0
    finally:
        await again.close()


async def test_another_store_on_the_folder_sees_each_save(tmp_path: Path) -> None:
    writer, reader = await JsonStore.open(cfg(tmp_path)), await JsonStore.open(cfg(tmp_path))
    try:
        for n in range(50):  # back to back: the lease is on, the saves commit synchronously
            await writer.save_member_data(11, 22, {"statistics": {"message_count": n}})
            assert (await reader.get_member_data(11, 22))["statistics"]["message_count"] == n
            assert (await reader.get_member_data(11, 22, {"extra": 1}))["extra"] == 1
    finally:
        await writer.close()
        await reader.close()


async def test_the_change_feed_and_an_expiry_see_the_fast_save(tmp_path: Path) -> None:
    store = await JsonStore.open(cfg(tmp_path))
    try:
        await store.put("members", "2_1", {"statistics": {"message_count": 0}}, ttl=3600)
        assert "2_1" in store._tables.expires["members"]
        async with store.watch("members") as watch:
            await store.save_member_data(1, 2, {"statistics": {"message_count": 1}})
            change = await asyncio.wait_for(watch.__anext__(), 30)
            assert (change.collection, change.key, change.op, change.doc) == \
                ("members", "2_1", "put", {"statistics": {"message_count": 1}})
        assert "members" not in store._tables.expires  # the save made the member permanent, as put does
    finally:
        await store.close()


async def test_the_guards_of_the_fast_calls(tmp_path: Path) -> None:
    store = await JsonStore.open(cfg(tmp_path))
    await store.save_member_data(1, 2, {"roles": ["a"]})
    async with store.transaction():
        with pytest.raises(TransactionError):
            await store.save_member_data(1, 2, {})
        with pytest.raises(TransactionError):
            await store.get_member_data(1, 2)
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.save_member_data(1, 2, {})
    with pytest.raises(StoreClosedError):
        await store.get_member_data(1, 2)
    reader = await JsonStore.open(cfg(tmp_path, read_only=True))
    try:
        assert await reader.get_member_data(1, 2) == {"roles": ["a"]}
        assert await reader.get_member_data(3, 2) == {}
        with pytest.raises(ReadOnlyError):
            await reader.save_member_data(1, 2, {"roles": ["b"]})
    finally:
        await reader.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_apply_of_a_lone_put_equals_the_per_operation_loop(seed: int) -> None:
    rnd = random.Random(900 + seed)
    keys = [f"k{i}" for i in range(6)]
    for _ in range(200):
        data = {"c": {k: b'{"n":%d}' % i for i, k in enumerate(keys) if rnd.random() < 0.5}, "d": {}}
        expires = {"c": {k: 5 for k in keys if rnd.random() < 0.3}} if rnd.random() < 0.5 else {}
        expires = {name: e for name, e in expires.items() if e}
        mine = _tables({n: dict(c) for n, c in data.items()}, {n: dict(e) for n, e in expires.items()})
        reference = _tables({n: dict(c) for n, c in data.items()}, {n: dict(e) for n, e in expires.items()})
        for _ in range(4):
            raw = b'{"v":%d}' % rnd.randrange(10 ** rnd.randrange(1, 8))
            op = ("p", rnd.choice(["c", "d", "new"]), rnd.choice(keys), raw)
            mine.apply([op])
            previous_apply(reference, [op])
            assert (mine.data, mine.sizes, mine.expires, mine.dirty, mine.feed.seen) == \
                (reference.data, reference.sizes, reference.expires, reference.dirty, reference.feed.seen)
