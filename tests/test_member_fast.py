"""The batch write fast paths (issue 15) against the code they replace, on random input.

* the member rule's fast path (storage/member_fast.py) against the full rule as it was before it existed (the
  checks spelled out in ``rules.member_rule_checked``, which is the previous ``member_rule``), on random members,
  valid and invalid: the fast path may only decline (None), never accept what the rule refuses or store other bytes;
* ``normalize_items`` (put_many's encoding) against the previous loop, written out here: same pairs, or the same
  error message and field;
* ``batch_update_members`` on both backends against a reference built with the full rule;
* the journal record built with ``orjson.Fragment`` against the previous concatenation, byte for byte;
* ``Tables.apply`` (per run of one collection) against the previous per-operation loop, written out here.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from storage import ValidationError
from storage.backends.json import journal
from storage.backends.json.snapshot import OVERHEAD
from storage.backends.json.tables import Tables
from storage.codec import check_key, encode_doc, shown
from storage.documents import normalize_items
from storage.member_fast import encode_member, encode_member_ids, encode_members, encode_members_ids
from storage.models import snowflake
from storage.rules import member_rule, member_rule_checked

SEEDS = range(8)


class Str(str):
    """A str subclass: the full rule treats it like a str in places; the fast path must decline it."""


class Dict(dict):  # type: ignore[type-arg]
    pass


class List(list):  # type: ignore[type-arg]
    pass


def random_id(rnd: random.Random) -> Any:
    return rnd.choice([
        "1", "0", "42", "123456789012345678", "9223372036854775807", "9223372036854775808",  # 2**63 (20 digits)
        "18446744073709551615", "18446744073709551616", "012", "", "-1", " 1", "1 ", "1_2", "١٢", "1\x00",
        12, 0, -5, 2**64, True, None, 1.0, Str("7"),
    ])


def random_time(rnd: random.Random) -> Any:
    return rnd.choice([
        "2024-01-31T12:00:00Z", "2024-02-29T23:59:59.123456Z", "2023-02-29T00:00:00Z", "2024-02-30T00:00:00Z",
        "2024-01-01T00:00:00.000000Z", "2024-01-01T00:00:00+00:00", "2024-01-01 00:00:00Z", "2024-01-01T00:00:00z",
        "2024-01-01T00:00:00.5Z", "2024-01-01T24:00:00Z", "20240101T000000Z", "0001-01-01T00:00:00Z",
        "2024-01-01T00:00:00.123456+01:00", "yesterday", "", "2024-01-01T00:00:00Z ", Str("2024-01-31T12:00:00Z"),
        datetime(2024, 5, 1, 12, 0), datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))), 1700000000, None,
        "2024-0\uff11-01T00:00:00Z",  # a fullwidth digit
    ])


def random_extra(rnd: random.Random) -> Any:
    return rnd.choice([
        1, -0.0, 0.5, 1e16, 1e300, float("nan"), float("inf"), 2**64, -(2**63) - 1, "a+b", "x\x00y", "\\u0000",
        None, True, [1, "2"], (1, 2), {"nested": datetime(2024, 1, 1)}, {1: 2}, {"k\x00": 1}, {1, 2},
        b"bytes", "é\u2028", {"deep": {"er": [None, 3.25]}},
    ])


def random_member(rnd: random.Random) -> tuple[Any, Any, str, str]:
    """(key, doc, guild, user): usually a valid member, with a few random things wrong or unusual."""
    guild = str(rnd.randrange(1, 10**18))
    user = str(rnd.randrange(1, 10**18))
    usual = rnd.random() < 0.5  # half the cases: the usual shape, at most one thing changed
    doc: dict[str, Any] = {"user_id": user, "guild_id": guild, "join_date": "2024-01-31T12:00:00Z",
                           "roles": ["mod", "vip"], "preferences": {"lang": "en"},
                           "statistics": {"message_count": 5, "last_active": "2024-06-01T10:00:00Z"}}
    changes = 1 if usual else rnd.randrange(0, 5)
    for _ in range(changes if rnd.random() < 0.8 else 0):
        what = rnd.randrange(12)
        if what == 0:
            field, own = ("user_id", user) if rnd.random() < 0.5 else ("guild_id", guild)
            doc[field] = rnd.choice([random_id(rnd), Str(own), f"{own} ", int(own) if str(own).isdigit() else own])
        elif what == 1:
            doc.pop(rnd.choice(list(doc) or ["x"]), None)
        elif what == 2:
            doc["join_date"] = random_time(rnd)
        elif what == 3:
            doc["roles"] = rnd.choice([[], ["a", 1], ("a",), "mod", List(["a"]), None, [Str("a")], ["a", None]])
        elif what == 4:
            doc["preferences"] = rnd.choice([[], None, Dict(a=1), "x", {"nan": float("nan")}])
        elif what == 5:
            doc["statistics"] = rnd.choice([[], None, Dict(message_count=1), {}, {"message_count": 1}])
        elif what == 6 and isinstance(doc.get("statistics"), dict):
            doc["statistics"]["message_count"] = rnd.choice([0, -1, True, 3.0, 2**64, 2**63, "3", None, 10**30])
        elif what == 7 and isinstance(doc.get("statistics"), dict):
            doc["statistics"]["last_active"] = random_time(rnd)
        elif what == 8:
            doc[rnd.choice(["extra", "nickname", "e"])] = random_extra(rnd)
        elif what == 9:
            guild = random_id(rnd) if rnd.random() < 0.7 else guild
        elif what == 10:
            user = random_id(rnd) if rnd.random() < 0.7 else user
        else:
            doc["statistics"] = {"message_count": 1, "x": random_extra(rnd)}
    key: Any = f"{guild}_{user}"
    if rnd.random() < 0.05:
        key = rnd.choice([guild, f"{guild}_{user}_1", 12, None, f"{guild}-{user}", f"{guild}_{user}\n", "_"])
    body: Any = doc if rnd.random() > 0.03 else rnd.choice([None, [], "doc", Dict(doc)])
    return key, body, str(guild), str(user)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any, Any]:
    """What ``fn(*args)`` gives: ("ok", result, None) or ("error", message, field)."""
    try:
        return ("ok", fn(*args), None)
    except ValidationError as exc:
        return ("error", str(exc), exc.field)


def previous_rule(key: Any, doc: Any, what: str = "document") -> bytes:
    """The members rule as a write applied it before the fast path: the key checked, then the full rule."""
    return member_rule_checked(check_key(key), doc, what)


def _member_rule(key: str, doc: Any) -> bytes:
    """The rule as ``put`` applies it now (its fast path first)."""
    return member_rule(check_key(key), doc, "document")


@pytest.mark.parametrize("seed", SEEDS)
def test_the_fast_path_accepts_only_what_the_rule_accepts_and_stores_the_same_bytes(seed: int) -> None:
    rnd = random.Random(seed)
    taken = declined = refused = 0
    for _ in range(3000):
        key, doc, guild, user = random_member(rnd)
        before = outcome(previous_rule, key, doc)
        fast = encode_member(key, doc)
        if fast is not None:
            assert before == ("ok", fast, None), (key, doc)
            taken += 1
        else:
            declined += 1
        refused += before[0] == "error"
        # the rule with its fast path (what put() and save_member_data run) decides exactly as before
        if isinstance(key, str):
            assert outcome(_member_rule, key, doc) == before, (key, doc)
        # batch_update_members' form (ids already canonical; the key built from them)
        if type(guild) is str and type(user) is str and f"{guild}_{user}" == key and before[0] == "ok":
            by_ids = encode_member_ids(guild, user, doc)
            assert by_ids is None or by_ids == before[1]
    # the generator covers all three cases
    assert taken > 500 and refused > 300 and declined - refused > 50


@pytest.mark.parametrize("seed", SEEDS)
def test_the_batch_fast_path_decides_each_member_like_the_rule(seed: int) -> None:
    """encode_members / encode_members_ids search the joined outputs once: a batch with one output that needs
    a look (a None, a NaN, a -0.0, a big float) must still decline exactly the outputs that need it."""
    rnd = random.Random(50 + seed)
    for _ in range(60):
        members = [random_member(rnd) for _ in range(rnd.randrange(0, 40))]
        pairs: list[Any] = [(key, doc) for key, doc, _g, _u in members]
        if pairs and rnd.random() < 0.2:
            pairs[rnd.randrange(len(pairs))] = rnd.choice([None, "x", ("1_2",), ["1_2", {}], ("1_2", {}, 3)])
        for pair, fast in zip(pairs, encode_members(pairs), strict=True):
            if fast is not None:
                assert outcome(previous_rule, *pair) == ("ok", fast, None)
                assert encode_member(*pair) == fast
            elif type(pair) is tuple and len(pair) == 2:
                assert encode_member(*pair) is None
        rows = [(guild, user, doc) for _key, doc, guild, user in members if _canonical_ids(guild, user)]
        for (guild, user, doc), fast in zip(rows, encode_members_ids(rows), strict=True):
            assert fast == encode_member_ids(guild, user, doc)
            if fast is not None:
                assert outcome(previous_rule, f"{guild}_{user}", doc) == ("ok", fast, None)


def _canonical_ids(guild: str, user: str) -> bool:
    """Whether both ids are canonical snowflakes (what encode_member(s)_ids expects)."""
    try:
        return snowflake(guild, "guild_id") == guild and snowflake(user, "user_id") == user
    except ValidationError:
        return False


def previous_normalize(items: Any, collection: str) -> list[tuple[str, bytes]]:
    """``normalize_items`` of the members collection as it was before the fast path."""
    out = []
    for index, pair in enumerate(items.items() if isinstance(items, dict) else items):
        try:
            key, doc = pair
        except (TypeError, ValueError):
            raise ValidationError(f"item #{index} must be a (key, doc) pair", field=f"items[{index}]") from None
        try:
            out.append((check_key(key), previous_rule(key, doc) if collection == "members" else encode_doc(doc)))
        except ValidationError as exc:
            raise ValidationError(f"item #{index} ({shown(key)}): {exc}", field=exc.field) from exc
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_put_many_encoding_equals_the_previous_loop(seed: int) -> None:
    rnd = random.Random(100 + seed)
    for _ in range(300):
        items: list[Any] = []
        for _ in range(rnd.randrange(0, 12)):
            key, doc, _g, _u = random_member(rnd)
            while rnd.random() < 0.9 and outcome(previous_rule, key, doc)[0] == "error":
                key, doc, _g, _u = random_member(rnd)  # mostly valid batches, so that whole batches get encoded
            items.append((key, doc) if rnd.random() > 0.02 else rnd.choice([(key,), key, None]))
        for collection in ("members", "other"):
            expected = outcome(previous_normalize, items, collection)
            got = outcome(normalize_items, items, collection)
            assert got == expected, items


async def test_batch_update_members_stores_what_the_full_rule_would(store, caplog) -> None:
    rnd = random.Random(5)
    updates: list[Any] = []
    for _ in range(400):
        _key, doc, guild, user = random_member(rnd)
        updates.append({"user_id": user, "guild_id": guild, "data": doc})
    updates[7] = {"user_id": "1", "data": {}}  # malformed updates are skipped too, and logged in order
    updates[300] = ["not", "a", "mapping"]
    expected = {key: orjson.loads(encoded) for key, encoded in filter(None, map(_previous, updates))}
    caplog.set_level("ERROR", logger="storage.members")
    written = await store.batch_update_members(updates)
    assert written == sum(1 for u in updates if _previous(u) is not None)
    skipped = [int(r.getMessage().split("#")[1].split(":")[0]) for r in caplog.records
               if "batch_update_members: skipping update" in r.getMessage()]
    assert skipped == [i for i, u in enumerate(updates) if _previous(u) is None]
    assert {k: d async for k, d in store.items("members")} == expected


def _previous(update: Any) -> tuple[str, bytes] | None:
    """What the previous batch_update_members wrote for ``update`` (None: skipped)."""
    if not isinstance(update, dict) or not {"user_id", "guild_id", "data"} <= update.keys():
        return None
    try:
        user, guild = snowflake(update["user_id"], "user_id"), snowflake(update["guild_id"], "guild_id")
        return f"{guild}_{user}", member_rule_checked(f"{guild}_{user}", update["data"], "data")
    except ValidationError:
        return None


def previous_encode_record(ops: list[Any]) -> bytes:
    parts = []
    for op in ops:
        head = b'["' + op[0].encode() + b'",' + orjson.dumps(op[1]) + b"," + orjson.dumps(op[2])
        if op[0] != "p":
            parts.append(head + b"]")
        elif len(op) == 5:
            parts.append(head + b"," + op[3] + b"," + journal.expiry_text(op[4]) + b"]")
        else:
            parts.append(head + b"," + op[3] + b"]")
    return b"[" + b",".join(parts) + b"]\n"


def random_ops(rnd: random.Random, n: int) -> list[Any]:
    ops: list[Any] = []
    for _ in range(n):
        coll = rnd.choice(["members", "a", "b.c"])
        key = rnd.choice(["k1", "k2", 'q"uote', "back\\slash", "é\u2028", "\x01", "1_2"])
        doc = orjson.dumps({"v": rnd.random(), "s": key})
        kind = rnd.randrange(3)
        ops.append(("p", coll, key, doc) if kind == 0 else ("d", coll, key) if kind == 1
                   else ("p", coll, key, doc, rnd.randrange(0, 2**52)))
    return ops


@pytest.mark.parametrize("seed", SEEDS)
def test_journal_records_are_byte_for_byte_the_previous_ones(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(200 + seed)
    for _ in range(200):
        ops = random_ops(rnd, rnd.randrange(0, 8))
        expected = previous_encode_record(ops)
        assert journal.encode_record(ops) == expected
        with monkeypatch.context() as m:
            m.setattr(journal, "_FRAGMENT", None)  # orjson without Fragment
            assert journal.encode_record(ops) == expected


class _NoIndexes:
    live = False


class _Feed:
    """A change feed that records what apply() publishes."""

    active = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, bytes | None]] = []

    def publish(self, collection: str, key: str, kind: str, raw: bytes | None) -> None:
        self.seen.append((collection, key, kind, raw))


def _tables(data: dict[str, dict[str, bytes]], expires: dict[str, dict[str, int]]) -> Tables:
    tables = Tables.__new__(Tables)  # only what apply() touches
    tables.data, tables.expires = data, expires
    tables.sizes = {name: 2 + sum(len(k) + len(v) + OVERHEAD for k, v in coll.items()) for name, coll in data.items()}
    tables.dirty = set()
    tables.indexes = _NoIndexes()  # type: ignore[assignment]
    tables.feed = _Feed()  # type: ignore[assignment]
    return tables


def previous_apply(tables: Tables, ops: list[Any]) -> None:
    data, sizes, expires = tables.data, tables.sizes, tables.expires
    for op in ops:
        coll_name, key = op[1], op[2]
        coll = data.get(coll_name)
        if coll is None:
            coll = data[coll_name] = {}
            sizes[coll_name] = 2
        old = coll.get(key)
        if old is not None:
            sizes[coll_name] -= len(key) + len(old) + OVERHEAD
        if op[0] == "p":
            coll[key] = op[3]
            sizes[coll_name] += len(key) + len(op[3]) + OVERHEAD
            tables.feed.publish(coll_name, key, "put", op[3])
        elif old is not None:
            del coll[key]
            tables.feed.publish(coll_name, key, "delete", None)
        if len(op) == 5:
            expires.setdefault(coll_name, {})[key] = op[4]
        elif coll_name in expires:
            expiring = expires[coll_name]
            if expiring.pop(key, None) is not None and not expiring:
                del expires[coll_name]
        tables.dirty.add(coll_name)


@pytest.mark.parametrize("seed", SEEDS)
def test_tables_apply_equals_the_previous_per_operation_loop(seed: int) -> None:
    rnd = random.Random(300 + seed)
    for _ in range(200):
        start = random_ops(rnd, rnd.randrange(0, 10))
        mine, reference = _tables({}, {}), _tables({}, {})
        for tables in (mine, reference):
            previous_apply(tables, start)
            tables.dirty = set()
        for _ in range(3):
            ops = random_ops(rnd, rnd.randrange(0, 12))
            if rnd.random() < 0.5:  # runs of one collection, as a batch writes them
                ops.sort(key=lambda op: op[1])
            mine.apply(ops)
            previous_apply(reference, ops)
            assert (mine.data, mine.sizes, mine.expires, mine.dirty, mine.feed.seen) == \
                (reference.data, reference.sizes, reference.expires, reference.dirty, reference.feed.seen)


def varied_usual_member(rnd: random.Random) -> tuple[str, dict[str, Any]]:
    """A member the fast path takes, in its several usual forms (fields absent or null, the microsecond timestamp,
    empty roles, the key's ids left out of the record)."""
    guild, user = str(rnd.randrange(0, 10**18)), str(rnd.randrange(0, 10**18))
    doc: dict[str, Any] = {"user_id": user, "guild_id": guild,
                           "join_date": rnd.choice(["2024-01-31T12:00:00Z", "2024-02-29T23:59:59.123456Z"]),
                           "roles": rnd.choice([[], ["a"], ["mod", "vip", Str("sub")]]),
                           "preferences": rnd.choice([{}, {"lang": "en"}, {"deep": {"x": [1, "2"]}}]),
                           "statistics": {"message_count": rnd.randrange(100), "last_active": "2024-06-01T10:00:00Z"}}
    for field in ("user_id", "guild_id", "join_date", "roles", "preferences", "statistics"):
        if rnd.random() < 0.05:
            del doc[field]
    if rnd.random() < 0.05 and "statistics" in doc:
        doc["statistics"] = rnd.choice([{}, {"message_count": 0}, {"last_active": "2023-12-31T23:59:59Z"}])
    return f"{guild}_{user}", doc


@pytest.mark.parametrize("seed", SEEDS)
def test_a_batch_checked_a_field_at_a_time_decides_each_member_like_alone(seed: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_members / encode_members_ids first check a whole batch a field at a time (member_fast._all_usual,
    C-level passes): batches of usual members with one random member among them (usual, or with one thing wrong
    or unusual, or not even a pair) decide every member exactly as encode_member alone, taken by the column check
    or not."""
    from storage import member_fast

    rnd = random.Random(400 + seed)
    outcomes: list[bool] = []
    real = member_fast._all_usual

    def spy(guilds: list[str], users: list[str], docs: list[Any]) -> bool:
        outcomes.append(real(guilds, users, docs))
        return outcomes[-1]

    monkeypatch.setattr(member_fast, "_all_usual", spy)
    for _ in range(150):
        pairs: list[Any] = [varied_usual_member(rnd) for _ in range(rnd.randrange(member_fast.COLUMNS_FROM, 30))]
        if rnd.random() < 0.7:
            key, doc, _g, _u = random_member(rnd)
            pairs[rnd.randrange(len(pairs))] = (key, doc) if rnd.random() < 0.95 else rnd.choice([None, ("1_2",)])
        if rnd.random() < 0.05:  # two usual keys in one: the batch's keys are joined by newlines for one regex run
            at = rnd.randrange(len(pairs))
            if type(pairs[at]) is tuple and len(pairs[at]) == 2 and isinstance(pairs[at][1], dict):
                no_ids = {k: v for k, v in pairs[at][1].items() if k not in ("user_id", "guild_id")}
                pairs[at] = (f"1_2\n{pairs[at][0]}", no_ids)  # (with the ids in the record, those differ)
        expected = [encode_member(*pair) if type(pair) is tuple and len(pair) == 2 else None for pair in pairs]
        assert encode_members(pairs) == expected
        rows = [(k.partition("_")[0], k.partition("_")[2], d) for k, d in (p for p in pairs if type(p) is tuple
                                                                           and len(p) == 2)
                if type(k) is str and "_" in k and _canonical_ids(k.partition("_")[0], k.partition("_")[2])]
        assert encode_members_ids(rows) == [encode_member_ids(*row) for row in rows]
        for pair, out in zip(pairs, expected):
            if out is not None:
                assert outcome(previous_rule, *pair) == ("ok", out, None)
    assert outcomes.count(True) > 50 and outcomes.count(False) > 50  # both ways, many times


@pytest.mark.parametrize("seed", SEEDS)
def test_put_many_of_a_mapping_encodes_like_the_previous_loop(seed: int) -> None:
    """``put_many`` of a dict hands its keys and documents to the column check as they are (rules.FAST_COLUMNS);
    the pairs, or the error, are those of the previous loop, usual batches and batches with one odd member."""
    rnd = random.Random(500 + seed)
    for _ in range(120):
        items: dict[Any, Any] = dict(varied_usual_member(rnd) for _ in range(rnd.randrange(0, 30)))
        if rnd.random() < 0.5:
            key, doc, _g, _u = random_member(rnd)
            items[key] = doc
        if rnd.random() < 0.05:
            items[12345] = {"user_id": "1"}  # an int key: its text, then the rule (the key and the record differ)
        expected = outcome(previous_normalize, items, "members")
        assert outcome(normalize_items, items, "members") == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_the_batch_key_pattern_is_the_per_key_pattern_on_every_line(seed: int) -> None:
    """member_fast._MEMBER_KEYS (possessive digit runs where Python has them) matches a text of keys, each followed
    by a newline, exactly when the per-key pattern matches every key: same language as the backtracking form."""
    import re

    from storage import member_fast

    plain = re.compile(r"(?:(?:0|[1-9][0-9]{0,18})_(?:0|[1-9][0-9]{0,18})\n)*\Z")
    rnd = random.Random(600 + seed)
    pieces = ["0", "1", "7", "00", "01", "10", "1" * 18, "9" * 19, "1" + "0" * 19, "", "_", "\n", "a", "12_", "_3"]
    taken = declined = 0
    for _ in range(800):
        keys = [rnd.choice(pieces) + rnd.choice(["_", "__", "", "\n", "_\n"]) + rnd.choice(pieces)
                for _ in range(rnd.randrange(0, 6))]
        if rnd.random() < 0.5:  # mostly usual keys, so that matches happen
            keys = [f"{rnd.randrange(1, 10**18)}_{rnd.randrange(1, 10**18)}" for _ in range(rnd.randrange(1, 6))] + \
                keys[:1]
        text = "".join(key + "\n" for key in keys)
        alone = all(member_fast._MEMBER_KEY.match(key) is not None and "\n" not in key for key in keys)
        assert (member_fast._MEMBER_KEYS.match(text) is not None) == (plain.match(text) is not None) == alone, keys
        taken += alone
        declined += not alone
    assert taken > 100 and declined > 100
