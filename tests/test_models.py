"""storage.models: the seed's member and message shapes, checked field by field."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from storage import ValidationError
from storage.models import iso_utc, member_key, parse_timestamp, snowflake, validate_member, validate_message

MESSAGE = {
    "message_id": "123456789",
    "channel_id": "987654321",
    "author_id": "456789123",
    "guild_id": "111",
    "timestamp": "2024-01-01T12:00:00Z",
    "content_length": 50,
    "attachments": 0,
    "reactions": 3,
    "analysis": {"sentiment": "positive", "topics": ["gaming", "discussion"]},
}


@pytest.mark.parametrize("value, expected", [(1, "1"), ("18446744073709551615", "18446744073709551615"),
                                             (123456789012345678, "123456789012345678"), ("0", "0")])
def test_snowflake_accepts(value, expected):
    assert snowflake(value) == expected


@pytest.mark.parametrize(
    "value", ["", "01", "1.0", "1e5", " 1", "١٢٣", 2**64, -1, True, 1.0, None, "18446744073709551616"])
def test_snowflake_rejects(value):
    with pytest.raises(ValidationError):
        snowflake(value, "user_id")


def test_member_key_is_the_seeds():
    assert member_key(123456789, "987654321") == "987654321_123456789"


def test_timestamps_normalize_to_utc():
    assert iso_utc("2024-01-01T09:00:00+09:00") == "2024-01-01T00:00:00Z"
    assert iso_utc("2024-01-01T00:00:00.250Z") == "2024-01-01T00:00:00.250000Z"
    assert iso_utc(datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=-5)))) == "2024-01-01T05:00:00Z"
    assert parse_timestamp("2024-01-01T00:00:00").tzinfo is timezone.utc  # naive = UTC
    with pytest.raises(ValidationError):
        parse_timestamp("2024-13-01T00:00:00Z")
    with pytest.raises(ValidationError):
        parse_timestamp(1704067200)


def test_validate_member_keeps_unknown_fields():
    data = {"user_id": "1", "custom": {"anything": [1, 2]}}
    assert validate_member(data, user_id=1, guild_id=2) is data


def test_validate_message_normalizes():
    out = validate_message({**MESSAGE, "message_id": 123456789, "timestamp": "2024-01-01T21:00:00+09:00"})
    assert out["message_id"] == "123456789"
    assert out["timestamp"] == "2024-01-01T12:00:00Z"
    minimal = validate_message({k: MESSAGE[k] for k in ("message_id", "channel_id", "author_id", "guild_id",
                                                         "timestamp")})
    assert (minimal["content_length"], minimal["attachments"], minimal["reactions"], minimal["analysis"]) == (
        0, 0, 0, {})


@pytest.mark.parametrize("field, value", [
    ("message_id", "abc"), ("channel_id", None), ("author_id", 2**64), ("guild_id", ""),
    ("timestamp", "noon"), ("content_length", -1), ("attachments", "1"), ("reactions", 1.5),
    ("analysis", "positive"), ("analysis", {"sentiment": 1}), ("analysis", {"topics": "gaming"}),
])
def test_validate_message_rejects(field, value):
    with pytest.raises(ValidationError) as info:
        validate_message({**MESSAGE, field: value})
    assert info.value.field.startswith(field)


def test_validate_message_requires_ids_and_timestamp():
    for field in ("message_id", "channel_id", "author_id", "guild_id", "timestamp"):
        with pytest.raises(ValidationError):
            validate_message({k: v for k, v in MESSAGE.items() if k != field})


def test_canonical_fast_path_still_checks_the_calendar_and_normalizes():
    assert iso_utc("2024-02-29T23:59:59Z") == "2024-02-29T23:59:59Z"
    assert iso_utc("2024-01-01T00:00:00.000000Z") == "2024-01-01T00:00:00Z"  # a zero fraction is dropped
    assert iso_utc("0999-01-01T00:00:00Z") == "0999-01-01T00:00:00Z"  # four-digit year, always
    for bad in ("2023-02-29T00:00:00Z", "2024-01-01T24:00:00Z", "2024-13-01T00:00:00Z"):
        with pytest.raises(ValidationError):
            iso_utc(bad)
    with pytest.raises(ValidationError):
        iso_utc("9999-12-31T23:00:00-05:00")  # past year 9999 once in UTC


def test_snowflake_fast_and_slow_paths_agree():
    assert snowflake("1234567890123456789") == "1234567890123456789"  # 19 digits: fast path
    assert snowflake("12345678901234567890") == "12345678901234567890"  # 20 digits: checked against 2**64
    with pytest.raises(ValidationError):
        snowflake("98765432109876543210")  # 20 digits, past 2**64
    assert snowflake(0) == "0" and snowflake("0") == "0"


# -- the member checks' fast paths agree with the plain rules ---------------------------------------------------
def canonical_member(data: dict) -> dict:
    """``data`` with ``join_date`` and ``statistics.last_active`` as ``iso_utc`` text (what a store keeps)."""
    out = dict(data)
    if out.get("join_date") is not None:
        out["join_date"] = iso_utc(out["join_date"])
    stats = out.get("statistics")
    if isinstance(stats, dict) and stats.get("last_active") is not None:
        out["statistics"] = {**stats, "last_active": iso_utc(stats["last_active"])}
    return out


def plain_member_check(data: object, user_id: object, guild_id: object) -> str | None:
    """The member rules written the obvious way (the field of the first error, or None when valid)."""
    if not isinstance(data, dict):
        return "data"
    for name, expected in (("user_id", user_id), ("guild_id", guild_id)):
        if name in data:
            try:
                got = snowflake(data[name], name)
            except ValidationError:
                return name
            if expected is not None and got != snowflake(expected, name):
                return name
    if data.get("join_date") is not None:
        try:
            parse_timestamp(data["join_date"])
        except (ValidationError, OverflowError):
            return "join_date"
    if "roles" in data and not (isinstance(data["roles"], list) and all(isinstance(r, str) for r in data["roles"])):
        return "roles"
    if "preferences" in data and not isinstance(data["preferences"], dict):
        return "preferences"
    if "statistics" in data:
        stats = data["statistics"]
        if not isinstance(stats, dict):
            return "statistics"
        count = stats.get("message_count", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return "statistics.message_count"
        if stats.get("last_active") is not None:
            try:
                parse_timestamp(stats["last_active"])
            except (ValidationError, OverflowError):
                return "statistics.last_active"
    return None


class Name(str):
    pass


def test_member_checks_agree_with_the_plain_rules():
    import random

    rnd = random.Random(7)
    base = {"user_id": "300000000000000000", "guild_id": "800000000000000000", "join_date": "2024-01-01T00:00:00Z",
            "roles": ["a", "b"], "preferences": {"x": 1},
            "statistics": {"message_count": 5, "last_active": "2024-06-01T05:05:00.250000Z"}}
    odd = [None, True, 0, -1, 7, 2**64, 1.5, "", "0", "07", "300000000000000000", 300000000000000000,
           "800000000000000000", "2024-02-30T00:00:00Z", "2024-02-29T00:00:00Z", "2024-01-01T00:00:00.000000Z",
           "2024-01-01 00:00:00", "2024-01-01T00:00:00+02:00", "2024-01-01T00:00:00,5Z", [], ["a", 1], [Name("n")],
           ("a",), {}, {"a": 1}, "x"]
    for _ in range(3000):
        data = {**base, "statistics": dict(base["statistics"])}
        field = rnd.choice(["user_id", "guild_id", "join_date", "roles", "preferences", "statistics",
                            "statistics.message_count", "statistics.last_active", "drop"])
        if field == "drop":
            del data[rnd.choice(list(base))]
        elif field.startswith("statistics."):
            data["statistics"][field.split(".")[1]] = rnd.choice(odd)
        else:
            data[field] = rnd.choice(odd)
        user_id = rnd.choice([300000000000000000, "300000000000000000", None])
        guild_id = rnd.choice([800000000000000000, "800000000000000000", None])
        expected = plain_member_check(data, user_id, guild_id)
        try:
            checked = validate_member(data, user_id=user_id, guild_id=guild_id)
            assert checked == canonical_member(data)  # the same record, its timestamps in canonical form
            assert checked is data or checked != data  # a copy only when a timestamp was rewritten
            got = None
        except ValidationError as exc:
            got = exc.field
        assert got == expected, (data, user_id, guild_id)
