"""The Store contract, run unchanged on every backend in ``BACKENDS`` (see conftest.py)."""

from __future__ import annotations

import asyncio
import math

import pytest

import storage
from storage import DatabaseError, StoreClosedError, TransactionError, ValidationError

MEMBER = {
    "user_id": "123456789",
    "guild_id": "987654321",
    "join_date": "2024-01-01T00:00:00Z",
    "roles": ["role1", "role2"],
    "preferences": {"notifications": True, "language": "ja"},
    "statistics": {"message_count": 150, "last_active": "2024-01-15T12:00:00Z"},
}


# -- basic documents ------------------------------------------------------------------------------------------------
async def test_put_get_roundtrip(store):
    await store.put("things", "a", {"x": 1, "nested": {"list": [1, 2.5, "three", None, True]}})
    assert await store.get("things", "a") == {"x": 1, "nested": {"list": [1, 2.5, "three", None, True]}}


async def test_get_missing_returns_default(store):
    assert await store.get("things", "nope") is None
    assert await store.get("things", "nope", {"d": 1}) == {"d": 1}


async def test_get_returns_a_fresh_dict(store):
    await store.put("things", "a", {"list": [1]})
    first = await store.get("things", "a")
    first["list"].append(2)
    first["new"] = True
    assert await store.get("things", "a") == {"list": [1]}


async def test_put_does_not_keep_a_reference_to_the_callers_dict(store):
    doc = {"n": 1}
    await store.put("things", "a", doc)
    doc["n"] = 2
    assert await store.get("things", "a") == {"n": 1}


async def test_put_replaces_whole_document(store):
    await store.put("things", "a", {"x": 1, "y": 2})
    await store.put("things", "a", {"z": 3})
    assert await store.get("things", "a") == {"z": 3}


async def test_delete(store):
    await store.put("things", "a", {"x": 1})
    assert await store.delete("things", "a") is True
    assert await store.delete("things", "a") is False
    assert await store.get("things", "a") is None
    assert await store.count("things") == 0


async def test_get_many(store):
    await store.put_many("things", {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3}})
    assert await store.get_many("things", ["a", "c", "missing"]) == {"a": {"n": 1}, "c": {"n": 3}}
    assert await store.get_many("things", []) == {}


async def test_put_many_mapping_and_pairs(store):
    assert await store.put_many("things", {"a": {"n": 1}, "b": {"n": 2}}) == 2
    assert await store.put_many("things", [("c", {"n": 3}), ("a", {"n": 10})]) == 2
    assert await store.get_many("things", ["a", "b", "c"]) == {"a": {"n": 10}, "b": {"n": 2}, "c": {"n": 3}}


async def test_put_many_is_all_or_nothing_on_bad_item(store):
    await store.put("things", "a", {"n": 1})
    with pytest.raises(ValidationError) as info:
        await store.put_many("things", [("a", {"n": 2}), ("b", {"n": 3}), ("c", {"bad": float("nan")})])
    assert "#2" in str(info.value)
    assert await store.get("things", "a") == {"n": 1}
    assert await store.get("things", "b") is None


async def test_items_sorted_and_prefix(store):
    await store.put_many("members", {"2_1": {"v": 1}, "1_2": {"v": 2}, "1_1": {"v": 3}, "10_1": {"v": 4}})
    assert [k async for k, _ in store.items("members")] == ["10_1", "1_1", "1_2", "2_1"]
    assert [(k, d) async for k, d in store.items("members", prefix="1_")] == [("1_1", {"v": 3}), ("1_2", {"v": 2})]
    assert [k async for k, _ in store.items("members", prefix="3")] == []


async def test_items_prefix_is_literal(store):
    await store.put_many("things", {"a%b": {}, "a_b": {}, "axb": {}, "a\\b": {}})
    assert [k async for k, _ in store.items("things", prefix="a%")] == ["a%b"]
    assert [k async for k, _ in store.items("things", prefix="a_")] == ["a_b"]
    assert [k async for k, _ in store.items("things", prefix="a\\")] == ["a\\b"]


async def test_items_unicode_order_matches_python(store):
    keys = ["b", "B", "a", "é", "Z", "日本", "😀", "a-b", "a b"]
    await store.put_many("things", {k: {"k": k} for k in keys})
    assert [k async for k, _ in store.items("things")] == sorted(keys)


async def test_count_and_collections(store):
    assert await store.collections() == []
    await store.put("b_things", "a", {})
    await store.put_many("a_things", {"x": {}, "y": {}})
    assert await store.count("a_things") == 2
    assert await store.count("nothing_here") == 0
    assert await store.collections() == ["a_things", "b_things"]
    await store.delete("b_things", "a")
    assert await store.collections() == ["a_things"]


async def test_awkward_keys_and_values_roundtrip(store):
    nasty = "'); DROP TABLE documents; --"
    docs = {
        nasty: {"q": nasty, "quote": "\"'`", "bs": "\\\\", "nl": "a\nb\tc", "uni": "日本語 😀 ∑"},
        "key with spaces": {"empty": "", "zero": 0, "neg": -5, "big": 2**63 - 1, "float": 1.5e-300},
        "\\": {"deep": {"a": {"b": {"c": [[[]]]}}}},
        "😀": {"": "empty key inside"},
    }
    await store.put_many("things", docs)
    for key, doc in docs.items():
        assert await store.get("things", key) == doc
    assert await store.count("things") == len(docs)


# -- update ---------------------------------------------------------------------------------------------------------
async def test_update_creates_from_default(store):
    result = await store.update("counters", "c", lambda d: {**d, "n": d["n"] + 1}, default={"n": 0})
    assert result == {"n": 1}
    assert await store.get("counters", "c") == {"n": 1}


async def test_update_missing_without_default_gets_empty_dict(store):
    seen = []

    def fn(doc):
        seen.append(dict(doc))
        doc["made"] = True

    assert await store.update("counters", "c", fn) == {"made": True}
    assert seen == [{}]


async def test_update_in_place_mutation_returning_none(store):
    await store.put("counters", "c", {"n": 1})

    def bump(doc):
        doc["n"] += 1

    assert await store.update("counters", "c", bump) == {"n": 2}


async def test_update_does_not_mutate_default(store):
    default = {"n": 0, "tags": []}

    def fn(doc):
        doc["tags"].append("x")
        doc["n"] += 1
        return doc

    await store.update("counters", "c", fn, default=default)
    assert default == {"n": 0, "tags": []}


async def test_concurrent_updates_lose_nothing(store):
    async def bump():
        await store.update("counters", "c", lambda d: {"n": d.get("n", 0) + 1})

    await asyncio.gather(*(bump() for _ in range(200)))
    assert await store.get("counters", "c") == {"n": 200}


async def test_update_fn_exception_changes_nothing(store):
    await store.put("counters", "c", {"n": 1})

    def boom(doc):
        doc["n"] = 999
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.update("counters", "c", boom)
    assert await store.get("counters", "c") == {"n": 1}


async def test_update_returning_invalid_doc_raises_and_changes_nothing(store):
    await store.put("counters", "c", {"n": 1})
    with pytest.raises(ValidationError):
        await store.update("counters", "c", lambda d: {"n": float("inf")})
    with pytest.raises(ValidationError):
        await store.update("counters", "c", lambda d: ["not", "a", "dict"])
    assert await store.get("counters", "c") == {"n": 1}


async def test_failing_update_does_not_affect_concurrent_writers(store):
    def boom(doc):
        raise KeyError("nope")

    results = await asyncio.gather(
        store.put("things", "a", {"n": 1}),
        store.update("things", "b", boom),
        store.put("things", "c", {"n": 3}),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], KeyError)
    assert await store.get_many("things", ["a", "b", "c"]) == {"a": {"n": 1}, "c": {"n": 3}}


# -- transactions ---------------------------------------------------------------------------------------------------
async def test_transaction_commits_together(store):
    async with store.transaction() as tx:
        await tx.put("accounts", "alice", {"balance": 10})
        await tx.put("accounts", "bob", {"balance": 5})
        assert await tx.get("accounts", "alice") == {"balance": 10}  # read-your-writes
        await tx.update("accounts", "alice", lambda d: {"balance": d["balance"] - 3})
        await tx.update("accounts", "bob", lambda d: {"balance": d["balance"] + 3})
        assert await tx.count("accounts") == 2
        assert [k async for k, _ in tx.items("accounts")] == ["alice", "bob"]
    assert await store.get_many("accounts", ["alice", "bob"]) == {"alice": {"balance": 7}, "bob": {"balance": 8}}


async def test_transaction_rolls_back_on_exception(store):
    await store.put("accounts", "alice", {"balance": 10})
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.put("accounts", "alice", {"balance": 0})
            await tx.put("accounts", "carol", {"balance": 1})
            await tx.delete("accounts", "alice")
            raise RuntimeError("abort")
    assert await store.get("accounts", "alice") == {"balance": 10}
    assert await store.get("accounts", "carol") is None


async def test_transaction_delete_and_get_many(store):
    await store.put_many("things", {"a": {"n": 1}, "b": {"n": 2}})
    async with store.transaction() as tx:
        assert await tx.delete("things", "a") is True
        assert await tx.delete("things", "a") is False
        assert await tx.get("things", "a") is None
        assert await tx.get_many("things", ["a", "b"]) == {"b": {"n": 2}}
        await tx.put_many("things", {"c": {"n": 3}})
        assert await tx.count("things") == 2
    assert [k async for k, _ in store.items("things")] == ["b", "c"]


async def test_transaction_validation_error_inside_rolls_back(store):
    with pytest.raises(ValidationError):
        async with store.transaction() as tx:
            await tx.put("things", "a", {"ok": 1})
            await tx.put("things", "b", {"bad": float("nan")})
    assert await store.get("things", "a") is None


async def test_transaction_objects_are_unusable_after_exit(store):
    async with store.transaction() as tx:
        await tx.put("things", "a", {})
    with pytest.raises(DatabaseError):
        await tx.put("things", "b", {})
    with pytest.raises(DatabaseError):
        await tx.get("things", "a")


async def test_writing_to_store_inside_its_transaction_is_refused(store):
    with pytest.raises(TransactionError):
        async with store.transaction() as tx:
            await tx.put("things", "a", {})
            await store.put("things", "b", {})
    assert await store.get("things", "a") is None
    assert await store.get("things", "b") is None


async def test_concurrent_transactions_serialize(store):
    await store.put("accounts", "total", {"n": 0})

    async def add():
        async with store.transaction() as tx:
            doc = await tx.get("accounts", "total")
            await asyncio.sleep(0)
            await tx.put("accounts", "total", {"n": doc["n"] + 1})

    await asyncio.gather(*(add() for _ in range(10)))
    assert await store.get("accounts", "total") == {"n": 10}


async def test_transaction_visible_to_other_store_after_commit(store, reopen):
    other = await reopen()
    try:
        async with store.transaction() as tx:
            await tx.put("things", "a", {"n": 1})
        assert await other.get("things", "a") == {"n": 1}
    finally:
        await other.close()


# -- the seed's calls -----------------------------------------------------------------------------------------------
async def test_member_roundtrip_seed_shape(store):
    assert await store.get_member_data(123456789, 987654321) == {}
    assert await store.save_member_data(123456789, 987654321, MEMBER) is True
    assert await store.get_member_data("123456789", "987654321") == MEMBER
    assert await store.get("members", "987654321_123456789") == MEMBER


async def test_member_data_may_omit_ids(store):
    await store.save_member_data(1, 2, {"roles": []})
    assert await store.get_member_data(1, 2) == {"roles": []}


async def test_batch_update_members_skips_malformed(store, caplog):
    updates = [
        {"user_id": 1, "guild_id": 10, "data": {"roles": ["a"]}},
        {"user_id": 2, "guild_id": 10},  # no data
        {"user_id": "x", "guild_id": 10, "data": {}},  # bad id
        "not a dict",
        {"user_id": 3, "guild_id": 10, "data": {"statistics": {"message_count": -1}}},  # bad counter
        {"user_id": 4, "guild_id": 10, "data": {"v": float("nan")}},  # not JSON
        {"user_id": 5, "guild_id": 10, "data": {"user_id": "6"}},  # disagrees with the key
        {"user_id": 7, "guild_id": 10, "data": {"roles": ["b"]}},
    ]
    with caplog.at_level("ERROR", logger="storage.members"):
        assert await store.batch_update_members(updates) == 2
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 6
    assert await store.get_member_data(1, 10) == {"roles": ["a"]}
    assert await store.get_member_data(7, 10) == {"roles": ["b"]}
    assert await store.count("members") == 2


async def test_batch_update_members_empty_and_all_bad(store):
    assert await store.batch_update_members([]) == 0
    assert await store.batch_update_members([{"user_id": 1}]) == 0
    assert await store.count("members") == 0


@pytest.mark.parametrize(
    "user_id, guild_id, data, field",
    [
        ("abc", 1, {}, "user_id"),
        (1, "12x", {}, "guild_id"),
        (2**64, 1, {}, "user_id"),  # past 64 bits
        ("123456789012345678901", 1, {}, "user_id"),  # 21 digits
        ("", 1, {}, "user_id"),
        (True, 1, {}, "user_id"),
        (-5, 1, {}, "user_id"),
        (1, 1, ["not", "a", "dict"], "data"),
        (1, 1, {"join_date": "yesterday"}, "join_date"),
        (1, 1, {"roles": "admin"}, "roles"),
        (1, 1, {"statistics": {"message_count": "150"}}, "statistics.message_count"),
        (1, 1, {"statistics": {"message_count": 1.5}}, "statistics.message_count"),
        (1, 1, {"statistics": {"last_active": "soon"}}, "statistics.last_active"),
        (1, 1, {"guild_id": "2"}, "guild_id"),
    ],
)
async def test_save_member_rejects_bad_input(store, user_id, guild_id, data, field):
    with pytest.raises(ValidationError) as info:
        await store.save_member_data(user_id, guild_id, data)
    assert info.value.field == field
    assert await store.count("members") == 0


async def test_snowflake_edges_accepted(store):
    await store.save_member_data(2**64 - 1, "1", {})
    assert await store.get_member_data(str(2**64 - 1), 1) == {}


# -- bad input on the generic API -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "doc",
    [
        ["a", "list"],
        "a string",
        None,
        42,
        {"nan": float("nan")},
        {"inf": float("inf")},
        {"deep": [{"x": -math.inf}]},
        {1: "non-str key"},
        {"set": {1, 2}},
        {"bytes": b"raw"},
        {"obj": object()},
        {"big": 2**64},
        {"nul": "a\x00b"},
        {"nul in a key\x00": 1},
        {"escaped": "a\\b\"c", "nul": ["\x00"]},
        {"surrogate": "\ud800"},
    ],
    ids=lambda d: repr(d)[:30],
)
async def test_put_rejects_non_json_documents(store, doc):
    await store.put("things", "keep", {"n": 1})
    with pytest.raises(ValidationError):
        await store.put("things", "a", doc)
    assert await store.get("things", "a") is None
    assert await store.count("things") == 1


async def test_datetime_values_are_rejected_not_silently_stringified(store):
    import datetime

    with pytest.raises(ValidationError):
        await store.put("things", "a", {"when": datetime.datetime.now()})


# an int such as 5 is a valid key (a snowflake, stored as "5"); a negative one, a bool or a float is not
@pytest.mark.parametrize("key", ["", "x" * 513, "nul\x00key", -5, True, 5.0, None, b"bytes"], ids=repr)
async def test_bad_keys_rejected(store, key):
    with pytest.raises(ValidationError):
        await store.put("things", key, {})
    assert await store.count("things") == 0


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x.json", "sp ace", "x" * 129, 5], ids=repr)
async def test_bad_collection_names_rejected(store, name):
    with pytest.raises(ValidationError):
        await store.put(name, "k", {})
    assert await store.collections() == []


async def test_validation_error_is_also_value_error(store):
    with pytest.raises(ValueError):
        await store.put("things", "a", {"x": float("nan")})


async def test_update_requires_callable(store):
    with pytest.raises(ValidationError):
        await store.update("things", "a", "not callable")


# -- lifecycle ------------------------------------------------------------------------------------------------------
async def test_every_call_after_close_raises(store):
    await store.put("things", "a", {})
    await store.close()
    await store.close()  # idempotent
    calls = [
        store.get("things", "a"),
        store.put("things", "a", {}),
        store.delete("things", "a"),
        store.get_many("things", ["a"]),
        store.put_many("things", {"b": {}}),
        store.update("things", "a", lambda d: d),
        store.count("things"),
        store.collections(),
        store.get_member_data(1, 2),
        store.save_member_data(1, 2, {}),
    ]
    for call in calls:
        with pytest.raises(StoreClosedError):
            await call
    with pytest.raises(DatabaseError):
        [x async for x in store.items("things")]
    with pytest.raises(DatabaseError):
        async with store.transaction():
            pass


async def test_data_survives_reopen(store, reopen):
    await store.put_many("things", {"a": {"n": 1}, "b": {"n": 2}})
    await store.delete("things", "b")
    await store.close()
    again = await reopen()
    try:
        assert [(k, d) async for k, d in again.items("things")] == [("a", {"n": 1})]
    finally:
        await again.close()


async def test_second_store_sees_first_stores_writes(store, reopen):
    other = await reopen()
    try:
        await store.put("things", "a", {"n": 1})
        assert await other.get("things", "a") == {"n": 1}
        await other.update("things", "a", lambda d: {"n": d["n"] + 1})
        assert await store.get("things", "a") == {"n": 2}
        await store.delete("things", "a")
        assert await other.get("things", "a") is None
        assert await other.count("things") == 0
    finally:
        await other.close()


async def test_two_stores_interleaved_updates_lose_nothing(store, reopen):
    other = await reopen()
    try:
        async def bump(s):
            for _ in range(25):
                await s.update("counters", "c", lambda d: {"n": d.get("n", 0) + 1})

        await asyncio.gather(bump(store), bump(other), bump(store), bump(other))
        assert await store.get("counters", "c") == {"n": 100}
        assert await other.get("counters", "c") == {"n": 100}
    finally:
        await other.close()


async def test_async_with_open_store_closes(store_config):
    async with storage.open_store(config=store_config) as s:
        await s.put("things", "a", {})
    with pytest.raises(StoreClosedError):
        await s.get("things", "a")
