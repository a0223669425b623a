"""Checks for the seed's two record shapes: members and message-analytics records.

The seed stored whatever it was handed; a typo'd id or a string counter then surfaced weeks later as a crash in a
stats command. We check at the door instead, name the field that is wrong, and write nothing. Checks are
deliberately about *shape*, not business rules: unknown extra fields are kept as they are.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from .errors import ValidationError

__all__ = [
    "snowflake",
    "parse_timestamp",
    "iso_utc",
    "member_key",
    "validate_member",
    "validate_message",
    "MESSAGE_FIELDS",
]

_U64_MAX = 2**64 - 1
_CANONICAL_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z\Z")
MESSAGE_FIELDS = ("message_id", "channel_id", "author_id", "timestamp", "content_length", "attachments",
                  "reactions", "analysis")


def snowflake(value: Any, field: str = "id") -> str:
    """A Discord id as its canonical decimal string: an int or decimal string, 1-20 digits, fitting in 64 bits."""
    # Fast path (message ingest calls this four times per record): a str of at most 19 ASCII digits without a
    # leading zero is canonical and below 2**63, so nothing else needs checking.
    if type(value) is str:
        if 0 < len(value) < 20 and value.isascii() and value.isdigit() and (value[0] != "0" or len(value) == 1):
            return value
    elif type(value) is int and 0 <= value <= _U64_MAX:
        return str(value)
    return _snowflake_checked(value, field)


def _snowflake_checked(value: Any, field: str) -> str:
    """The slow path of :func:`snowflake`: 20-digit ids, subclasses, and every error message."""
    if isinstance(value, bool):
        raise ValidationError(f"{field} must be a snowflake id, got a bool", field=field)
    if isinstance(value, int):
        text = str(int(value))
    elif isinstance(value, str):
        text = value
    else:
        raise ValidationError(f"{field} must be a snowflake id (int or decimal string), got {type(value).__name__}",
                              field=field)
    if not (1 <= len(text) <= 20 and text.isascii() and text.isdigit()):
        raise ValidationError(f"{field} must be 1-20 decimal digits, got {value!r}", field=field)
    if len(text) > 1 and text[0] == "0":
        raise ValidationError(f"{field} must not have leading zeros, got {value!r}", field=field)
    if int(text) > _U64_MAX:
        raise ValidationError(f"{field} does not fit in 64 bits: {value!r}", field=field)
    return text


def parse_timestamp(value: Any, field: str = "timestamp") -> datetime:
    """An aware UTC datetime from an ISO 8601 string (``Z`` allowed) or a datetime; naive values are taken as UTC."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(f"{field} must be an ISO 8601 timestamp, got {value!r}", field=field) from None
    else:
        raise ValidationError(f"{field} must be an ISO 8601 string or datetime, got {type(value).__name__}",
                              field=field)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def iso_utc(value: Any, field: str = "timestamp") -> str:
    """Canonical text form used in stored records: ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (UTC, the fraction only when
    non-zero, the year always four digits).

    One canonical form means equal instants are equal strings on every backend. It does *not* make string order
    time order (``"...:00Z"`` sorts after ``"...:00.5Z"``): compare parsed times, or pad the fraction first.
    """
    if type(value) is str and _CANONICAL_RE.match(value) and not value.endswith(".000000Z"):
        try:
            datetime.fromisoformat(value[:-1])  # the shape is right; this checks the calendar (no 2024-02-30)
        except ValueError:
            raise ValidationError(f"{field} must be an ISO 8601 timestamp, got {value!r}", field=field) from None
        return value  # already canonical: the usual case at ingest, 10x cheaper than parsing and formatting
    try:
        dt = parse_timestamp(value, field)
    except OverflowError:
        raise ValidationError(f"{field} is out of range once converted to UTC: {value!r}", field=field) from None
    return dt.replace(tzinfo=None).isoformat() + "Z"


def member_key(user_id: Any, guild_id: Any) -> str:
    """The seed's key: ``f"{guild_id}_{user_id}"``."""
    return f"{snowflake(guild_id, 'guild_id')}_{snowflake(user_id, 'user_id')}"


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{field} must be a non-negative integer, got {value!r}", field=field)
    return value


def validate_member(data: Any, *, user_id: Any = None, guild_id: Any = None) -> dict[str, Any]:
    """Check a member record; the fields the seed documents are checked when present, others kept as-is.

    When ``user_id``/``guild_id`` are given (the key being written), ids inside the record must agree with them:
    a record that says it is someone else would be filed under the wrong key.
    """
    if type(data) is not dict:
        raise ValidationError(f"member data must be a dict, got {type(data).__name__}", field="data")
    for name, expected in (("user_id", user_id), ("guild_id", guild_id)):
        if name in data:
            got = snowflake(data[name], name)
            if expected is not None and got != snowflake(expected, name):
                raise ValidationError(f"{name} in the record ({got}) differs from the key's ({expected})",
                                      field=name)
    if "join_date" in data and data["join_date"] is not None:
        iso_utc(data["join_date"], "join_date")  # validates (fast for canonical text); the value is kept as given
    if "roles" in data:
        roles = data["roles"]
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValidationError("roles must be a list of strings", field="roles")
    if "preferences" in data and not isinstance(data["preferences"], dict):
        raise ValidationError("preferences must be an object", field="preferences")
    if "statistics" in data:
        stats = data["statistics"]
        if not isinstance(stats, dict):
            raise ValidationError("statistics must be an object", field="statistics")
        if "message_count" in stats:
            _count(stats["message_count"], "statistics.message_count")
        if stats.get("last_active") is not None:
            iso_utc(stats["last_active"], "statistics.last_active")
    return data


def validate_message(record: Any) -> dict[str, Any]:
    """Check a message-analytics record and return its normalized form (a new dict).

    Ids become canonical strings, the timestamp canonical UTC text, counters default to 0, ``analysis`` to
    ``{}``. ``guild_id`` is required: every analytics query is per guild. Extra fields are kept.
    """
    if type(record) is not dict:
        raise ValidationError(f"message record must be a dict, got {type(record).__name__}", field="record")
    out = dict(record)
    try:
        out["message_id"] = snowflake(record["message_id"], "message_id")
        out["channel_id"] = snowflake(record["channel_id"], "channel_id")
        out["author_id"] = snowflake(record["author_id"], "author_id")
        out["guild_id"] = snowflake(record["guild_id"], "guild_id")
        out["timestamp"] = iso_utc(record["timestamp"], "timestamp")
    except KeyError as exc:
        name = exc.args[0]
        raise ValidationError(f"message record is missing {name}", field=name) from None
    for name in ("content_length", "attachments", "reactions"):
        value = record.get(name, 0)
        if type(value) is not int or value < 0:
            _count(value, name)
        out[name] = value
    analysis = record.get("analysis")
    if analysis is None:
        analysis = {}
    elif type(analysis) is not dict:
        raise ValidationError("analysis must be an object", field="analysis")
    sentiment = analysis.get("sentiment")
    if sentiment is not None and type(sentiment) is not str:
        raise ValidationError("analysis.sentiment must be a string", field="analysis.sentiment")
    topics = analysis.get("topics")
    if topics is not None and (type(topics) is not list or not all(type(t) is str for t in topics)):
        raise ValidationError("analysis.topics must be a list of strings", field="analysis.topics")
    out["analysis"] = analysis
    return out
