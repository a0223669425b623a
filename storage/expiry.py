"""Expiring documents: the ``ttl=`` / ``expires_at=`` arguments of the writes, and the clock they are measured by.

Cooldowns, temporary mutes and reminders are documents that stop existing at an instant (python-discord/bot#393,
diskcache's ``expire``). The rules, the same on both backends:

* ``put(..., ttl=seconds)`` or ``put(..., expires_at=datetime)`` (also ``put_many``, one expiry for the whole
  batch, and ``update``); never both. ``ttl`` is a number of seconds > 0; ``expires_at`` an *aware* datetime: a
  naive one is refused, since ``datetime.now()`` (local time, naive) is the classic way a cooldown ends hours off.
* A document is **visible** while ``now < expires_at``; from the instant itself on it reads as absent everywhere
  (get, get_many, items, count, find, update, delete, collections, backups, copies), and it is purged later (JSON:
  at compaction; PostgreSQL: by a sweep in small batches).
* Expiry is part of each write, explicitly: a write without ``ttl``/``expires_at`` stores a permanent document,
  also over one that was expiring (``update(key, fn)`` without ``ttl`` makes the document permanent again; pass
  ``ttl=`` to ``update`` to keep it expiring, counted from the update).
* "Now" comes from ``StoreConfig.clock`` (a function returning an aware datetime) when one is given, else the
  system's UTC time. PostgreSQL compares with that same now, sent as a parameter (never SQL's ``now()``), so a
  test's clock drives both backends alike, and the database server's clock plays no part.

Instants are kept to the microsecond (what PostgreSQL's ``timestamptz`` and Python's datetime hold); the JSON
backend keeps them in memory as integer microseconds since the epoch (:func:`to_micros`) and on disk as canonical
ISO text (:func:`storage.models.iso_utc`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from .errors import ValidationError

__all__ = ["Clock", "utc_now", "checked_now", "expiry_of", "to_micros", "from_micros"]

#: Returns the current instant as an aware datetime.
Clock = Callable[[], datetime]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICRO = timedelta(microseconds=1)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def checked_now(clock: Clock | None) -> datetime:
    """The clock's now (the system's without one), checked: a clock must give aware datetimes."""
    if clock is None:
        return datetime.now(timezone.utc)
    now = clock()
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValidationError(f"StoreConfig.clock must return an aware datetime, got {now!r}", field="clock")
    return now


def expiry_of(now: Callable[[], datetime], ttl: object, expires_at: object) -> datetime | None:
    """The instant a write's document expires (UTC), or None for a permanent one; bad arguments raise
    :class:`ValidationError` before anything is written. ``now`` is only called for a ``ttl``."""
    if ttl is None and expires_at is None:
        return None
    if ttl is not None and expires_at is not None:
        raise ValidationError("give ttl or expires_at, not both", field="ttl")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
            raise ValidationError(f"ttl must be a number of seconds > 0, got {ttl!r}", field="ttl")
        try:
            return (now() + timedelta(seconds=ttl)).astimezone(timezone.utc)
        except OverflowError:
            raise ValidationError(f"ttl is too large: {ttl!r}", field="ttl") from None
    if not isinstance(expires_at, datetime):
        raise ValidationError(f"expires_at must be a datetime, got {type(expires_at).__name__}", field="expires_at")
    if expires_at.tzinfo is None or expires_at.utcoffset() is None:
        raise ValidationError("expires_at must be an aware datetime (e.g. datetime.now(timezone.utc) + ...): a "
                              "naive one is ambiguous", field="expires_at")
    try:
        return expires_at.astimezone(timezone.utc)
    except OverflowError:
        raise ValidationError(f"expires_at is out of range: {expires_at!r}", field="expires_at") from None


def to_micros(when: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (exact; what the JSON backend compares)."""
    return (when - _EPOCH) // _MICRO


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)
