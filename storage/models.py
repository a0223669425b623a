"""Checks for the seed's two record shapes: members and message-analytics records.

The seed stored whatever it was handed; a typo'd id or a string counter then surfaced weeks later as a crash in a
stats command. We check at the door instead, name the field that is wrong, and write nothing. Checks are
deliberately about *shape*, not business rules: unknown extra fields are kept as they are.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .codec import shown
from .errors import ValidationError

__all__ = [
    "snowflake",
    "parse_timestamp",
    "time_bound",
    "prune_bound",
    "iso_utc",
    "is_canonical",
    "canonical_time",
    "member_key",
    "validate_member",
    "check_member",
    "validate_message",
    "MESSAGE_FIELDS",
    "MEMBERS",
]

#: The collection of the seed's member records, keyed ``f"{guild_id}_{user_id}"`` (see :func:`member_key`).
MEMBERS = "members"

_U64_MAX = 2**64 - 1
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
        raise ValidationError(f"{field} must be 1-20 decimal digits, got {shown(value)}", field=field)
    if len(text) > 1 and text[0] == "0":
        raise ValidationError(f"{field} must not have leading zeros, got {shown(value)}", field=field)
    if int(text) > _U64_MAX:
        raise ValidationError(f"{field} does not fit in 64 bits: {shown(value)}", field=field)
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
            raise ValidationError(f"{field} must be an ISO 8601 timestamp, got {shown(value)}", field=field) from None
    else:
        raise ValidationError(f"{field} must be an ISO 8601 string or datetime, got {type(value).__name__}",
                              field=field)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def time_bound(value: Any, name: str) -> datetime | None:
    """A query bound (``since``/``until``/``before``) as an aware UTC datetime; None stays None (unbounded)."""
    if value is None:
        return None
    try:
        return parse_timestamp(value, name)
    except OverflowError as exc:
        raise ValidationError(f"{name} is out of range: {exc}", field=name) from exc


def prune_bound(before: Any, guild_id: Any) -> tuple[datetime, str | None]:
    """``prune_messages(before, guild_id=)``'s arguments checked (stores and transactions share them): the bound
    as an aware UTC datetime, the guild as canonical text or None."""
    bound = time_bound(before, "before")
    if bound is None:
        raise ValidationError("before is required: prune_messages(before)", field="before")
    return bound, None if guild_id is None else snowflake(guild_id, "guild_id")


def iso_utc(value: Any, field: str = "timestamp") -> str:
    """Canonical text form used in stored records: ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (UTC, the fraction only when
    non-zero and then always six digits, the year always four digits): ``2024-05-01T12:00:06Z``,
    ``2024-05-01T12:00:06.283000Z``. Accepts ISO 8601 text (any offset, ``Z``, naive = UTC) or a datetime.
    Public: the form the library writes for message timestamps, ``join_date`` and ``last_active``.

    One canonical form means equal instants are equal strings on every backend. It does *not* make string order
    time order (``"...:00Z"`` sorts after ``"...:00.5Z"``): compare parsed times, or pad the fraction first.
    """
    if type(value) is str and is_canonical(value):
        return value  # already canonical: the usual case, 10x cheaper than parsing and formatting
    try:
        dt = parse_timestamp(value, field)
    except OverflowError:
        raise ValidationError(f"{field} is out of range once converted to UTC: {shown(value)}", field=field) from None
    return dt.replace(tzinfo=None).isoformat() + "Z"


def is_canonical(text: str) -> bool:
    """Whether ``text`` is a timestamp in the canonical form of :func:`iso_utc` (a real date and time)."""
    return canonical_time(text) is not None


def canonical_time(text: str) -> datetime | None:
    """The time (aware, UTC) of a timestamp in the canonical form of :func:`iso_utc`; None for any other text.

    Written for speed (it runs for every timestamp written): the separators of ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``
    are every third character from the fifth, one slice; ``fromisoformat`` then accepts the rest only if it is
    ASCII digits of a real date and time (no 2024-02-30) with ``Z`` as the only offset. A regular expression for
    the shape plus the calendar check cost three times as much.
    """
    if len(text) == 20:
        if text[4:20:3] != "--T::Z":
            return None
    elif len(text) != 27 or text[4:20:3] != "--T::." or text[26] != "Z" or text.endswith(".000000Z"):
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is timezone.utc else None


def member_key(user_id: Any, guild_id: Any) -> str:
    """The seed's key of a member document in collection ``members``: ``f"{guild_id}_{user_id}"``, the ids in
    canonical form (ints or decimal strings accepted; anything else raises :class:`ValidationError`). Public: use
    it for ``store.get("members", member_key(user, guild))`` or a ``find`` over members."""
    # Two ints (discord.py's ids), the usual case of every get_member_data: formatted as they are, without two
    # snowflake() calls (a quarter of a JSON get_member_data; issue 15). Anything else: the checked way.
    # (u | g) >> 64 is 0 exactly when both are in 0..2**64-1 (a negative one makes it negative); "%d" formats faster
    # than an f-string here (236 -> 178 ns).
    if type(user_id) is int and type(guild_id) is int and not (user_id | guild_id) >> 64:
        return "%d_%d" % (guild_id, user_id)  # noqa: UP031 - measured faster, see above
    return f"{snowflake(guild_id, 'guild_id')}_{snowflake(user_id, 'user_id')}"


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{field} must be a non-negative integer, got {shown(value)}", field=field)
    return value


def validate_member(data: Any, *, user_id: Any = None, guild_id: Any = None) -> dict[str, Any]:
    """Check a member record; the fields the seed documents are checked when present, others kept as-is
    (timestamps are put in canonical form: see :func:`check_member`).

    When ``user_id``/``guild_id`` are given (the key being written), ids inside the record must agree with them:
    a record that says it is someone else would be filed under the wrong key.
    """
    return check_member(data, None if user_id is None else snowflake(user_id, "user_id"),
                        None if guild_id is None else snowflake(guild_id, "guild_id"))


def check_member(data: Any, user_id: str | None, guild_id: str | None) -> dict[str, Any]:
    """:func:`validate_member` with the key's ids already canonical (as :func:`member_key` made them).

    Returns ``data`` itself, or, when ``join_date`` or ``statistics.last_active`` is a valid timestamp in another
    form (``+00:00``, ``.000Z``, a ``datetime`` such as discord.py's ``member.joined_at``), a copy with it in the
    canonical form of :func:`iso_utc`.

    Runs for every member of a ``batch_update_members``, so the usual record (ids as the key's text, canonical
    timestamps, roles a list of str) is recognized with the fewest steps; anything else goes the long way.
    """
    if type(data) is not dict:
        raise ValidationError(f"member data must be a dict, got {type(data).__name__}", field="data")
    if "user_id" in data:
        _same_id(data["user_id"], user_id, "user_id")
    if "guild_id" in data:
        _same_id(data["guild_id"], guild_id, "guild_id")
    join_date = data.get("join_date")
    if join_date is not None and not (type(join_date) is str and is_canonical(join_date)):
        # the one canonical form (a copy: the caller's dict is not changed), so that equal instants are equal text
        # and refresh_member_statistics' comparison (text, on both backends) sees no change where there is none
        data = {**data, "join_date": iso_utc(join_date, "join_date")}
    if "roles" in data:
        roles = data["roles"]
        try:  # str.join takes nothing but str (and subclasses), checked in C: the usual list costs ~50 ns
            ok = isinstance(roles, list) and isinstance("".join(roles), str)
        except TypeError:
            ok = False
        if not ok:
            raise ValidationError("roles must be a list of strings", field="roles")
    if "preferences" in data and not isinstance(data["preferences"], dict):
        raise ValidationError("preferences must be an object", field="preferences")
    if "statistics" in data:
        stats = data["statistics"]
        if not isinstance(stats, dict):
            raise ValidationError("statistics must be an object", field="statistics")
        if "message_count" in stats:
            count = stats["message_count"]
            if type(count) is not int or count < 0:
                _count(count, "statistics.message_count")
        last_active = stats.get("last_active")
        if last_active is not None and not (type(last_active) is str and is_canonical(last_active)):
            data = {**data, "statistics": {**stats, "last_active": iso_utc(last_active, "statistics.last_active")}}
    checked: dict[str, Any] = data
    return checked


def _same_id(value: Any, expected: str | None, name: str) -> None:
    """An id inside a record: a snowflake, and the key's own when the key is known."""
    if value == expected and type(value) is str:
        return  # the key's canonical text, so a valid id (the usual case)
    got = snowflake(value, name)
    if expected is not None and got != expected:
        raise ValidationError(f"{name} in the record ({got}) differs from the key's ({expected})", field=name)


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
