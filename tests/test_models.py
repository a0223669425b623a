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
