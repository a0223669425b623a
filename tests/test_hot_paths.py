"""The get and batch fast paths of issue 15 against the code they replace, on random input.

* ``check_key``'s fast path for the usual key and ``member_key``'s for two ints against the checks spelled out
  (the previous functions, written out here): same key text, or the same error and field;
* :func:`storage.codec.dumps_each` (one ``orjson.dumps`` for a whole batch, split at a NUL separator) against
  ``dumps_kept`` per document: the same bytes, exact-size copies, or None, never other bytes;
* the members fast path with whole random batches where one document spoils the shared ``dumps`` (a set, a huge
  int, a Fragment holding the separator, a document nested to the depth limit): each member still decided like the
  full rule;
* the journal's ``changed()`` (a ``pread`` of the byte where the reader stopped: a record, or end of file or the
  preallocated filler) on a real journal: it sees what another writer wrote, and a read-only follower after it;
* the guards kept on the shortened read path: a closed store, a transaction open in the task, and a document that
  expired all still answer as before.
"""

from __future__ import annotations

import asyncio
import random
import string
import sys
from typing import Any

import orjson
import pytest

import storage
from storage import StoreClosedError, TransactionError, ValidationError, codec
from storage.backends.json.journal import Journal
from storage.codec import _DUMPS_OPTS, MAX_DEPTH, MAX_KEY_LENGTH, check_key, dumps_each, dumps_kept, shown
from storage.member_fast import encode_member, encode_members, encode_members_ids, time_text
from storage.models import member_key, snowflake
from storage.rules import member_rule_checked

SEEDS = range(6)


class Str(str):
    pass


class Int(int):
    pass


def previous_check_key(key: object) -> str:
    """``check_key`` as it was before its fast path."""
    if type(key) is not str:
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            return str(int(key))
        raise ValidationError(f"document key must be a str or a non-negative int (a snowflake id), got "
                              f"{shown(key) if isinstance(key, int) else type(key).__name__}", field="key")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValidationError(f"document key must be 1-{MAX_KEY_LENGTH} characters, got {len(key)}", field="key")
    if "\x00" in key:
        raise ValidationError("document key must not contain NUL characters", field="key")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("document key must be valid Unicode (no lone surrogates)", field="key") from None
    return key


def previous_member_key(user_id: Any, guild_id: Any) -> str:
    return f"{snowflake(guild_id, 'guild_id')}_{snowflake(user_id, 'user_id')}"


def outcome(fn: Any, *args: Any) -> tuple[str, Any, Any]:
    try:
        result = fn(*args)
    except ValidationError as exc:
        return ("error", str(exc), exc.field)
    return ("ok", result, type(result))


def random_key(rnd: random.Random) -> Any:
    kind = rnd.randrange(10)
    if kind == 0:
        return rnd.choice([0, 1, 2**63, 2**64 - 1, 2**64, -1, True, False, Int(5), 1.5, None, b"k", ("a",)])
    if kind == 1:
        return rnd.choice(["", "\x00", "a\x00b", "\ud800", "é", "\u2028", "😀", Str("abc"), " ", "a" * MAX_KEY_LENGTH,
                           "a" * (MAX_KEY_LENGTH + 1), "é" * MAX_KEY_LENGTH, "é" * (MAX_KEY_LENGTH + 1)])
    alphabet = string.printable + "é\x00\x7f\x80"
    return "".join(rnd.choice(alphabet) for _ in range(rnd.choice([1, 2, 5, 20, 511, 512, 513])))


@pytest.mark.parametrize("seed", SEEDS)
def test_check_key_fast_path_agrees_with_the_checks_spelled_out(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(3000):
        key = random_key(rnd)
        assert outcome(check_key, key) == outcome(previous_check_key, key), repr(key)


def random_id(rnd: random.Random) -> Any:
    return rnd.choice([
        0, 1, rnd.randrange(2**64), 2**64 - 1, 2**64, 2**63, -1, -(2**64), 2**70, True, Int(7), "12", "012", "",
        rnd.randrange(10**17, 10**19), str(rnd.randrange(2**64)), 1.0, None,
    ])


@pytest.mark.parametrize("seed", SEEDS)
def test_member_key_fast_path_agrees_with_two_snowflakes(seed: int) -> None:
    rnd = random.Random(100 + seed)
    for _ in range(3000):
        user, guild = random_id(rnd), random_id(rnd)
        assert outcome(member_key, user, guild) == outcome(previous_member_key, user, guild), (user, guild)


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(14 if depth < 4 else 9)
    if kind == 0:
        return rnd.choice([0, -1, 2**63, 2**64 - 1, -(2**63), 10**30, True, None])
    if kind == 1:
        return rnd.choice([0.5, -0.0, 1e16, 1e300, float("nan"), float("inf"), 2.5e-8])
    if kind == 2:
        return rnd.choice(["", "a,b", "\x00", ",\x00,", "null", "é\u2028", "\\u0000", "x+y", "-0.0", "\ud800"])
    if kind == 3:
        return rnd.choice([{1, 2}, b"bytes", object(), Str("s"), Int(3)])
    if kind == 4:
        return orjson.Fragment(rnd.choice([b"1", b'"x"', b",\x00,", b"\x00", codec._SPLIT]))
    if kind in (5, 6, 7, 8):
        return "".join(rnd.choice(string.ascii_letters + ',"{}[]:') for _ in range(rnd.randrange(8)))
    if kind in (9, 10, 11):
        keys = ["a", "b", "c", "d,e", "\x00"]
        return {rnd.choice(keys): random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))}
    return [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth - 1):
        doc = {"n": doc}
    return doc


def one_by_one(doc: Any) -> bytes | None:
    try:
        return dumps_kept(doc, _DUMPS_OPTS, time_text)
    except (orjson.JSONEncodeError, TypeError):
        return None


@pytest.mark.parametrize("seed", SEEDS)
def test_dumps_each_equals_dumps_per_document_or_declines(seed: int) -> None:
    rnd = random.Random(200 + seed)
    split = declined = 0
    for _ in range(400):
        docs: list[Any] = [random_value(rnd) if rnd.random() < 0.2 else
                           {"k": random_value(rnd), "l": [random_value(rnd)]} for _ in range(rnd.randrange(0, 12))]
        if docs and rnd.random() < 0.05:
            docs[rnd.randrange(len(docs))] = nested(rnd.choice([MAX_DEPTH - 1, MAX_DEPTH]))
        each = [one_by_one(doc) for doc in docs]
        got = dumps_each(docs, _DUMPS_OPTS, time_text)
        if got is None:
            declined += 1
            # declined only when some document fails alone, sits at the depth limit, or holds the separator
            assert None in each or any(b"\x00" in out for out in each if out is not None) or any(
                out is not None and out.count(b"{") >= MAX_DEPTH for out in each), docs
            continue
        split += 1
        pieces, whole = got
        assert pieces == each
        separated = [x for doc in docs for x in (doc, codec._SEPARATOR)][:-1]
        assert whole == (orjson.dumps(separated, time_text, _DUMPS_OPTS) if docs else b"")
        for piece in pieces:
            assert type(piece) is bytes and sys.getsizeof(piece) < len(piece) + 64  # an exact-size copy
    assert split > 60 and declined > 20, (split, declined)


def test_dumps_each_of_nothing_and_of_one() -> None:
    assert dumps_each([], _DUMPS_OPTS, time_text) == ([], b"")
    assert dumps_each([{"a": 1}], _DUMPS_OPTS, time_text) == ([b'{"a":1}'], b'[{"a":1}]')


def usual_member(rnd: random.Random) -> tuple[str, dict[str, Any]]:
    guild, user = str(rnd.randrange(1, 10**18)), str(rnd.randrange(1, 10**18))
    stats = {"message_count": rnd.randrange(100), "last_active": "2024-06-01T10:00:00Z"}
    return f"{guild}_{user}", {"user_id": user, "guild_id": guild, "join_date": "2024-01-31T12:00:00Z",
                               "roles": ["a"], "preferences": {"lang": "en"}, "statistics": stats}


def rule_outcome(key: str, doc: Any) -> tuple[str, Any]:
    try:
        return ("ok", member_rule_checked(key, doc, "document"))
    except ValidationError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("seed", SEEDS)
def test_a_spoiler_in_a_batch_leaves_every_member_decided_like_the_rule(seed: int) -> None:
    """Usual members with one that makes the shared ``dumps`` fail or split wrongly: the batch falls back to one
    ``dumps`` per member, and each member is still taken (the rule's bytes) or declined, as alone."""
    rnd = random.Random(300 + seed)
    spoilers = [{1, 2}, 2**64, orjson.Fragment(codec._SPLIT), nested(MAX_DEPTH - 1), float("nan"), None, -0.0, 1e16]
    for _ in range(60):
        pairs: list[Any] = [usual_member(rnd) for _ in range(rnd.randrange(1, 15))]
        at = rnd.randrange(len(pairs))
        _key, doc = pairs[at]
        doc["preferences"]["x"] = rnd.choice(spoilers)
        fast = encode_members(pairs)
        rows = [(k.partition("_")[0], k.partition("_")[2], d) for k, d in pairs]
        assert encode_members_ids(rows) == fast
        for (k, d), out in zip(pairs, fast, strict=True):
            alone = encode_member(k, d)
            assert out == alone
            if out is not None:
                assert rule_outcome(k, d) == ("ok", out)
        assert all(out is not None for i, out in enumerate(fast) if i != at)


def test_changed_sees_appends_by_another_writer(tmp_path) -> None:
    path = tmp_path / "storage.journal"
    Journal.create(path, 1)
    reader, writer = Journal(path), Journal(path)
    reader.open()
    writer.open()
    assert not reader.changed()
    writer.append(b'[["p","c","k",{}]]\n')
    assert reader.changed()
    assert [op for record in reader.read_new(end=None, locked=False) for op in record] == [("p", "c", "k", b"{}")]
    assert not reader.changed()
    writer.append(b'[["d","c","k"]]\n')
    assert reader.changed()  # written over the filler after the first record
    assert reader.read_new(end=None, locked=False) == [[("d", "c", "k")]]
    reader.close()
    writer.close()


async def test_the_shortened_read_path_keeps_its_guards(store) -> None:
    await store.put("members", member_key(1, 2), {"user_id": "1"})
    assert await store.get_member_data(1, 2) == {"user_id": "1"}
    assert await store.get_member_data("1", "2") == {"user_id": "1"}
    with pytest.raises(ValidationError):
        await store.get_member_data(-1, 2)
    with pytest.raises(ValidationError):
        await store.get_member_data(1, 2**64)
    await store.put("settings", "short", {"v": 1}, ttl=0.05)
    assert await store.get("settings", "short") == {"v": 1}
    await asyncio.sleep(0.3)
    assert await store.get("settings", "short") is None
    async with store.transaction() as tx:
        assert await tx.get_member_data(1, 2) == {"user_id": "1"}
        with pytest.raises(TransactionError):
            await store.get_member_data(1, 2)
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.get_member_data(1, 2)


async def test_a_json_get_sees_what_another_process_committed(tmp_path) -> None:
    """The read path's freshness check (one pread) still notices another store's commit on the same folder."""
    first = await storage.open_store(backend="json", path=tmp_path / "data")
    second = await storage.open_store(backend="json", path=tmp_path / "data")
    try:
        assert await first.get_member_data(1, 2) == {}
        await second.save_member_data(1, 2, {"user_id": "1", "statistics": {"message_count": 3}})
        assert (await first.get_member_data(1, 2))["statistics"]["message_count"] == 3
        await second.put_many("members", {member_key(1, 2): {"roles": ["x"]}})
        assert await first.get_member_data(1, 2) == {"roles": ["x"]}
    finally:
        await first.close()
        await second.close()
