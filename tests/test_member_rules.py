"""The ``members`` rule on every write path, datetimes stored as canonical text, ``get_member_data(default=)`` and
the member calls inside transactions, on both backends."""

from __future__ import annotations

import copy as copymod
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import storage
from storage import StoreConfig, ValidationError
from storage.backup.copy import copy
from storage.migrations import Migration, MigrationFailedError, Migrator

GOOD = {"user_id": "2", "guild_id": "1", "roles": ["mod"], "statistics": {"message_count": 3}}
#: (key, document) pairs the members rule refuses, and the field it names.
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("1_2", {"statistics": {"message_count": -1}}, "statistics.message_count"),
    ("1_2", {"statistics": {"message_count": "3"}}, "statistics.message_count"),
    ("1_2", {"roles": "mod"}, "roles"),
    ("1_2", {"user_id": "3"}, "user_id"),
    ("1_2", {"join_date": "yesterday"}, "join_date"),
    ("not-a-member", {}, "key"),
    ("1_02", {}, "key"),
    ("1_2_3", {}, "key"),
    ("1", {}, "key"),
    ("1_18446744073709551616", {}, "key"),
]


async def everything(s: Any) -> dict[str, dict[str, Any]]:
    """What the store holds, read back by scanning every collection."""
    out: dict[str, dict[str, Any]] = {}
    for name in await s.collections():
        out[name] = {k: d async for k, d in s.items(name)}
    return out


class Writes(Migration):
    """A migration that writes one member through its context."""

    def __init__(self, version: str, key: str, doc: dict[str, Any]) -> None:
        super().__init__(version, "writes a member")
        self.key, self.doc = key, doc

    async def up(self, store: Any) -> None:
        await store.put("members", self.key, self.doc)

    async def down(self, store: Any) -> None:
        await store.delete("members", self.key)


@pytest.mark.parametrize("key, doc, field", BAD)
async def test_every_write_path_applies_the_member_rule_and_writes_nothing(store, key, doc, field):
    await store.put("members", "1_2", GOOD)
    await store.put("other", "k", {"v": 1})
    before = await everything(store)

    def set_to(value: dict[str, Any]) -> Any:
        return lambda _doc: copymod.deepcopy(value)

    paths = [
        lambda: store.put("members", key, doc),
        lambda: store.put("members", key, doc, ttl=60),
        lambda: store.put_many("members", [("1_5", GOOD | {"user_id": "5"}), (key, doc)]),
        lambda: store.update("members", key, set_to(doc)),
        lambda: store.update("members", "1_9", lambda d: d, default=doc) if key == "1_2" else
        store.update("members", key, lambda d: {}),
    ]
    if key == "1_2":
        paths.append(lambda: store.save_member_data(2, 1, doc))
    for write in paths:
        with pytest.raises(ValidationError) as info:
            await write()
        assert info.value.field == field
    for tx_write in (lambda tx: tx.put("members", key, doc), lambda tx: tx.put_many("members", {key: doc}),
                     lambda tx: tx.update("members", key, set_to(doc))):
        with pytest.raises(ValidationError):
            async with store.transaction() as tx:
                await tx.put("other", "k", {"v": 2})  # rolled back with the refused write
                await tx_write(tx)
    with pytest.raises(MigrationFailedError) as failed:  # a migration's context writes through the same rule
        await Migrator(store, [Writes("1.0.0", key, doc)]).upgrade()
    assert isinstance(failed.value.__cause__, ValidationError)
    assert await store.batch_update_members([{"user_id": 2, "guild_id": 1, "data": doc}] if key == "1_2" else []) == 0
    after = await everything(store)
    after.pop("_migration_state", None)
    after.pop("_migration_log", None)
    assert after == before


async def test_valid_members_are_accepted_on_every_path(store):
    await store.put("members", "1_2", GOOD)
    await store.put_many("members", {"1_3": {"roles": []}, "18446744073709551615_0": {}})
    await store.update("members", "1_4", lambda d: {**d, "statistics": {"message_count": 0}})
    async with store.transaction() as tx:
        await tx.put("members", "1_5", {"preferences": {}})
    assert sorted([k async for k, _ in store.items("members")]) == ["18446744073709551615_0", "1_2", "1_3", "1_4",
                                                                     "1_5"]
    await store.put("notes", "anything goes", {"statistics": {"message_count": -1}})  # no rule on other collections


async def test_datetimes_in_a_member_are_stored_as_canonical_text(store):
    paris = timezone(timedelta(hours=2))
    joined = datetime(2024, 5, 6, 9, 30, 0, 250000, tzinfo=paris)
    data = {"joined_at": joined, "join_date": datetime(2024, 5, 6, 7, 30), "roles": [],
            "history": [{"at": datetime(2024, 1, 1, tzinfo=timezone.utc)}], "statistics": {"last_active": joined}}
    original = copymod.deepcopy(data)
    assert await store.save_member_data(2, 1, data)
    assert data == original  # the caller's dict is not changed
    expected = {"joined_at": "2024-05-06T07:30:00.250000Z", "join_date": "2024-05-06T07:30:00Z", "roles": [],
                "history": [{"at": "2024-01-01T00:00:00Z"}],
                "statistics": {"last_active": "2024-05-06T07:30:00.250000Z"}}
    assert await store.get_member_data(2, 1) == expected
    await store.update("members", "1_3", lambda d: {"joined_at": joined})
    await store.put_many("members", {"1_4": {"joined_at": joined}})
    assert await store.batch_update_members([{"user_id": 5, "guild_id": 1, "data": {"joined_at": joined}}]) == 1
    for user in (3, 4, 5):
        assert await store.get_member_data(user, 1) == {"joined_at": "2024-05-06T07:30:00.250000Z"}
    with pytest.raises(ValidationError):  # other collections still refuse what is not JSON
        await store.put("notes", "k", {"at": joined})


def reference_merge(default: Any, stored: Any) -> Any:
    """The merge get_member_data promises, written plainly: dicts merge key by key, anything else is replaced."""
    if isinstance(default, dict) and isinstance(stored, dict):
        out = {k: copymod.deepcopy(v) for k, v in default.items()}
        for k, v in stored.items():
            out[k] = reference_merge(out[k], v) if k in out else copymod.deepcopy(v)
        return out
    return copymod.deepcopy(stored)


def random_value(rnd: random.Random, depth: int) -> Any:
    kind = rnd.randrange(6 if depth < 4 else 4)
    if kind == 0:
        return rnd.randrange(-5, 100)
    if kind == 1:
        return rnd.choice(["a", "ü", "", "日本"])
    if kind == 2:
        return rnd.choice([None, True, False, 1.5])
    if kind == 3:
        return [rnd.randrange(3) for _ in range(rnd.randrange(3))]
    return random_dict(rnd, depth + 1)


def random_dict(rnd: random.Random, depth: int = 0) -> dict[str, Any]:
    keys = ["settings", "language", "xp", "nested", "x", "roles"]
    return {rnd.choice(keys): random_value(rnd, depth) for _ in range(rnd.randrange(5))}


def scribble(value: Any) -> None:
    """Change every dict and list inside ``value``."""
    if isinstance(value, dict):
        for inner in list(value.values()):
            scribble(inner)
        value["scribbled"] = 1
    elif isinstance(value, list):
        for inner in value:
            scribble(inner)
        value.append("scribbled")


async def test_get_member_data_deep_merges_the_stored_member_over_the_default(store):
    rnd = random.Random(1414)
    for i in range(60):
        default, stored = random_dict(rnd), random_dict(rnd)
        stored.pop("roles", None)  # roles must be a list of str in a member: not what this test is about
        default_before = copymod.deepcopy(default)
        if i % 5:
            await store.put("members", f"7_{i}", stored)
        got = await store.get_member_data(i, 7, default=default)
        assert got == reference_merge(default, stored if i % 5 else {})
        assert default == default_before  # never mutated
        scribble(got)  # the result shares nothing with the default
        assert default == default_before
    assert await store.count("members") == 48  # nothing written by the reads
    assert await store.get_member_data(999, 7) == {}  # without a default: as the seed
    with pytest.raises(ValidationError):
        await store.get_member_data(1, 7, default=[1])  # type: ignore[arg-type]


async def test_transactions_carry_the_member_calls_and_commit_or_roll_back_with_them(store):
    await store.save_member_data(1, 9, {"roles": ["a"]})
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            assert await tx.save_member_data(2, 9, {"roles": ["b"]})
            assert await tx.batch_update_members([{"user_id": 3, "guild_id": 9, "data": {}},
                                                  {"user_id": "x", "guild_id": 9, "data": {}}]) == 1
            assert await tx.get_member_data(2, 9) == {"roles": ["b"]}  # its own uncommitted write
            assert await tx.get_member_data(4, 9, default={"xp": 0}) == {"xp": 0}
            await tx.put("other", "k", {})
            raise RuntimeError("nothing of this is written")
    assert await everything(store) == {"members": {"9_1": {"roles": ["a"]}}}
    async with store.transaction() as tx:
        await tx.save_member_data(2, 9, {"roles": ["b"]})
        await tx.batch_update_members([{"user_id": 3, "guild_id": 9, "data": {"xp": 5}}])
        assert await tx.get_member_data(1, 9, default={"xp": 0, "roles": []}) == {"xp": 0, "roles": ["a"]}
        with pytest.raises(ValidationError):
            await tx.save_member_data(5, 9, {"statistics": {"message_count": -2}})
    assert await everything(store) == {"members": {"9_1": {"roles": ["a"]}, "9_2": {"roles": ["b"]},
                                                   "9_3": {"xp": 5}}}


async def test_restore_and_copy_keep_an_odd_member_stored_by_an_older_version(store, tmp_path, store_config):
    """Data already stored is carried over as it is: a backup must restore, a copy must copy, even when the
    member rule would refuse a document written by an older version (see storage/rules.py)."""
    odd = {"1_2": {"statistics": {"message_count": -4}}, "legacy": {"note": "not a member key"}}
    await store._put_stored("members", odd)
    await store.save_member_data(3, 1, {"roles": []})
    info = await store.create_backup()
    await store.delete("members", "legacy")
    await store.restore_backup(info.id)
    assert await everything(store) == {"members": {**odd, "1_3": {"roles": []}}}
    target = StoreConfig(backend="json", path=str(tmp_path / "twin"), source="tests")
    async with storage.open_store(config=target) as twin:
        await copy(store, twin)
        assert await everything(twin) == await everything(store)
    with pytest.raises(ValidationError):  # but a new write of such a member is refused
        await store.update("members", "1_2", lambda d: d)
