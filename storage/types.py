"""Typed shapes of the seed's two records, so an IDE and mypy know ``member["statistics"]["message_count"]``.

These are :class:`typing.TypedDict` s: at run time a ``Member`` is the plain ``dict`` the store returns (nothing is
converted or checked here; :mod:`storage.models` does the checking). Every key is optional (``total=False``):
``get_member_data`` returns ``{}`` for a member that has no record, and a bot may store only some fields. Extra
fields of your own are allowed by the store; mypy reports them as unknown keys on these types (annotate with
``dict[str, Any]`` or subclass the TypedDict to add yours).

Timestamps are text in the one canonical form of :func:`storage.models.iso_utc`:
``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (UTC; the fraction only when non-zero, then six digits).
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["Member", "MemberStatistics", "MessageRecord", "MessageAnalysis"]


class MemberStatistics(TypedDict, total=False):
    """``member["statistics"]``: kept up to date by ``refresh_member_statistics`` or by the bot itself."""

    message_count: int
    #: canonical UTC text, or None for a member without messages (what ``refresh_member_statistics`` writes)
    last_active: str | None


class Member(TypedDict, total=False):
    """A member record (collection ``members``, key ``f"{guild_id}_{user_id}"``, see
    :func:`storage.models.member_key`), as ``get_member_data`` returns it."""

    #: as the bot gave it: a decimal string or an int (the store checks it is the key's snowflake)
    user_id: str | int
    guild_id: str | int
    #: canonical UTC text (a datetime or any ISO 8601 text given to ``save_member_data`` is stored in this form)
    join_date: str
    roles: list[str]
    preferences: dict[str, Any]
    statistics: MemberStatistics


class MessageAnalysis(TypedDict, total=False):
    """``record["analysis"]``: whatever the bot's analysis found; both fields are optional."""

    sentiment: str
    topics: list[str]


class MessageRecord(TypedDict, total=False):
    """A message-analytics record as stored (``scan_messages`` yields these): ids as canonical decimal text, the
    timestamp canonical UTC text, counters ints (0 when not given). ``record_message`` also accepts ints for the
    ids and a datetime or any ISO 8601 text for the timestamp."""

    message_id: str
    guild_id: str
    channel_id: str
    author_id: str
    timestamp: str
    content_length: int
    attachments: int
    reactions: int
    analysis: MessageAnalysis
