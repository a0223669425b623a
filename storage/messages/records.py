"""Message records: the checks and the normalized form every backend stores, and the time keys of their files.

Shared by both layers: the feature layer (:mod:`storage.messages.queries`) checks what callers give it with these
functions, and the backends use the same ones where they check while they write (the PostgreSQL ingest builds its
``COPY`` rows from :func:`usual_fields` and :func:`checked_chunks`) or order records by time (:func:`timestamp_key`,
:func:`bound_key` in the JSON message log). Nothing here touches a store.

Decisions, stated once:

* **Idempotent by message_id.** A duplicate id, within a batch or against stored data, is never counted twice.
  Within a batch the *first* record with an id wins (the later ones are what a retry would resend); against stored
  data the stored record wins: ``update_message`` changes a record (:func:`checked_changes`, :func:`merged_record`).
* **Immutable fields.** ``message_id``, ``guild_id``, ``channel_id``, ``author_id`` (who said what where) and
  ``timestamp`` cannot be changed by an update. Discord never changes when a message was sent (it is encoded in
  its id), and the timestamp is what the backends partition and order the log by.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

from ..codec import canonical_numbers, encode_doc, shown
from ..errors import ValidationError
from ..models import MESSAGE_FIELDS, canonical_time, iso_utc, snowflake, validate_message

__all__ = [
    "IMMUTABLE_FIELDS",
    "INGEST_CHUNK",
    "VALIDATE_IN_THREAD",
    "MessageRecord",
    "UsualFields",
    "timestamp_key",
    "bound_key",
    "normalize_messages",
    "message_chunks",
    "message_records",
    "normalized_chunks",
    "joined",
    "checked_chunks",
    "checked_message",
    "checked_record",
    "checked_changes",
    "merged_record",
    "usual_fields",
]

#: Fields an update may repeat but not change.
IMMUTABLE_FIELDS = ("message_id", "guild_id", "channel_id", "author_id", "timestamp")
_TS_CANONICAL_LENGTHS = (20, 27)  # YYYY-MM-DDTHH:MM:SSZ and YYYY-MM-DDTHH:MM:SS.ffffffZ
INGEST_CHUNK = 1000  # records per chunk of message_chunks: the event loop gets a turn between two chunks
VALIDATE_IN_THREAD = 2000  # records: bigger batches are checked in a worker thread (the checks cost per record)
_PLAIN_FIELDS = frozenset((*MESSAGE_FIELDS, "guild_id"))
_PLAIN_ANALYSIS = frozenset(("sentiment", "topics"))
_U64 = 2**64 - 1

MessageRecord = dict[str, Any]
#: What :func:`usual_fields` returns: message_id, channel_id, author_id, guild_id, timestamp (canonical texts),
#: content_length, attachments, reactions, analysis, and the timestamp as an aware datetime.
UsualFields = tuple[str, str, str, str, str, int, int, int, dict[str, Any], datetime]
T = TypeVar("T")



def timestamp_key(ts: str) -> str:
    """A stored (canonical) timestamp as fixed-width text, so that string order is time order.

    The canonical form omits a zero fraction, and ``"...:00Z" > "...:00.5Z"`` as strings: always compare keys.
    """
    return ts if len(ts) == 27 else ts[:19] + ".000000Z"


def bound_key(dt: datetime) -> str:
    """The :func:`timestamp_key` of an aware UTC datetime (``isoformat`` pads the year, ``strftime`` may not)."""
    return dt.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _invalid(exc: ValidationError | OverflowError, index: int | None) -> ValidationError:
    """The error of ``validate_message``, naming the record's position in the batch (if any)."""
    where = "" if index is None else f"record #{index}: "
    if isinstance(exc, OverflowError):  # an offset pushing the time past year 9999 when converted to UTC
        return ValidationError(f"{where}timestamp is out of range: {exc}", field="timestamp")
    return ValidationError(f"{where}{exc}", field=exc.field)


def checked_record(record: Any, index: int | None = None) -> MessageRecord:
    """One record validated and normalized, or a ValidationError naming its position in the batch (if any)."""
    try:
        out = validate_message(record)
    except (OverflowError, ValidationError) as exc:
        raise _invalid(exc, index) from exc
    return _check_rest(out, index, set())


def _check_rest(out: MessageRecord, index: int | None, known: set[str]) -> MessageRecord:
    """What ``validate_message`` leaves to us: a four-digit year, and fields that round-trip on every backend."""
    if len(out["timestamp"]) not in _TS_CANONICAL_LENGTHS:
        where = "" if index is None else f"record #{index}: "
        raise ValidationError(f"{where}timestamp must have a four-digit year, got {out['timestamp']!r}",
                              field="timestamp")
    if not _plain(out, known):
        try:
            encode_doc(out, what="record")  # extra fields must round-trip on every backend (no NaN, no NUL...)
        except ValidationError as exc:
            where = "" if index is None else f"record #{index}: "
            raise ValidationError(f"{where}{exc}", field=exc.field) from exc
        out = canonical_numbers(out)  # -0.0, big floats: stored as PostgreSQL gives them back (see codec.py)
    return out


def _plain(out: MessageRecord, known: set[str]) -> bool:
    """True when ``validate_message`` already pinned down the JSON form of every field (the usual record), so
    that the full encoding check can be skipped: it costs more than a quarter of ingest time.

    ``known`` holds the strings found plain so far in the batch: sentiments and topics repeat, and a set lookup
    (the hash is cached in the string) is cheaper than looking at the characters again.
    """
    if not _PLAIN_FIELDS.issuperset(out):
        return False
    analysis = out["analysis"]
    if analysis:
        if not _PLAIN_ANALYSIS.issuperset(analysis):
            return False
        sentiment = analysis.get("sentiment")
        if sentiment is not None and sentiment not in known and not _plain_text(sentiment, known):
            return False
        topics = analysis.get("topics")
        if topics and not known.issuperset(topics):
            for topic in topics:
                if topic not in known and not _plain_text(topic, known):
                    return False
    counters: int = out["content_length"] | out["attachments"] | out["reactions"]  # non-negative ints
    return counters <= _U64  # the OR of non-negative ints fits in 64 bits when each of them does


def _plain_text(text: str, known: set[str]) -> bool:
    """ASCII without NUL: no lone surrogate, nothing PostgreSQL rejects (anything else: the full check decides)."""
    if text.isascii() and "\x00" not in text:
        known.add(text)
        return True
    return False


def normalize_messages(records: Iterable[Mapping[str, Any]]) -> list[MessageRecord]:
    """Validate a whole batch first (the first bad record raises, naming its index), then drop repeated ids.

    The first record with a given ``message_id`` wins: a retried or replayed event must not replace what was
    recorded first, or the result would depend on how often a batch was sent.
    """
    return joined(message_chunks(records, sys.maxsize))


def message_chunks(records: Iterable[Mapping[str, Any]], size: int = INGEST_CHUNK) -> Iterator[list[MessageRecord]]:
    """:func:`normalize_messages` a chunk at a time: lists of up to ``size`` normalized records, new ids only.

    Whether ``records`` is iterable at all is checked now, each record as its chunk is asked for.
    """
    return normalized_chunks(message_records(records), size)


def message_records(records: Iterable[Mapping[str, Any]]) -> Iterator[Any]:
    """An iterator over what ``record_messages`` was given, refusing at once what is not a batch of records."""
    if isinstance(records, (str, bytes, Mapping)):
        raise ValidationError("records must be an iterable of message records (for one record use "
                              "record_message)", field="records")
    try:
        return iter(records)
    except TypeError:
        raise ValidationError(f"records must be an iterable of message records, got {type(records).__name__}",
                              field="records") from None


def checked_message(record: Any, index: int, known: set[str]) -> MessageRecord:
    """The full checks of one record of a batch (what :func:`usual_fields` leaves to them): its normalized form,
    or a ValidationError naming ``index``. ``known``: see :func:`_plain`."""
    try:
        out = validate_message(record)
    except (OverflowError, ValidationError) as exc:
        raise _invalid(exc, index) from exc
    if len(out["timestamp"]) not in _TS_CANONICAL_LENGTHS or not _plain(out, known):
        out = _check_rest(out, index, known)
    return out


def normalized_chunks(records: Iterator[Any], size: int) -> Iterator[list[MessageRecord]]:
    """The caller's records checked, deduplicated and normalized, ``size`` a chunk (see :func:`checked_chunks`)."""
    return checked_chunks(records, size, _record_of, _same)


def checked_chunks(records: Iterator[Any], size: int, usual: Callable[[UsualFields], T],
                   other: Callable[[MessageRecord], T]) -> Iterator[list[T]]:
    """The caller's records checked and deduplicated (the first of an id wins), each made into a ``T``, ``size``
    a chunk: ``usual(fields)`` for a record :func:`usual_fields` accepts, ``other(record)`` for the normalized
    form of any other. A bad record raises ValidationError (naming its index) when its chunk is asked for.

    The ingest's hot loop, shared by the generic ingest (normalized dicts) and the PostgreSQL one (COPY rows).
    """
    seen: set[str] = set()
    known: set[str] = set()
    chunk: list[T] = []
    for index, raw in enumerate(records):
        fields = usual_fields(raw, known)
        if fields is not None:
            mid = fields[0]
            if mid in seen:
                continue
            seen.add(mid)
            chunk.append(usual(fields))
        else:
            record = checked_message(raw, index, known)
            mid = record["message_id"]
            if mid in seen:
                continue
            seen.add(mid)
            chunk.append(other(record))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _same(record: MessageRecord) -> MessageRecord:
    return record


def joined(chunks: Iterator[list[MessageRecord]]) -> list[MessageRecord]:
    """The chunks' records in one list."""
    return [record for chunk in chunks for record in chunk]


def _record_of(fields: UsualFields) -> MessageRecord:
    """The normalized record of :func:`usual_fields`' fields, in the order of :data:`storage.models.MESSAGE_FIELDS`,
    which the JSON message log likes: ``message_id`` first."""
    mid, cid, aid, gid, ts, content_length, attachments, reactions, analysis, _when = fields
    return {"message_id": mid, "channel_id": cid, "author_id": aid, "guild_id": gid, "timestamp": ts,
            "content_length": content_length, "attachments": attachments, "reactions": reactions,
            "analysis": analysis}


def usual_fields(record: Any, known: set[str]) -> UsualFields | None:
    """The usual record checked in one pass, as its normalized fields and its time (an aware UTC datetime); None
    for anything else (the full checks of :func:`checked_message` then decide, and name what is wrong).

    "Usual" is what a bot's event handler sends: the documented fields only, ids as canonical decimal text, a
    canonical timestamp, counters that are small non-negative ints, an ``analysis`` of a text sentiment and text
    topics seen before (in ``known``, see :func:`_plain`) or plain ASCII. For that record the fields are exactly
    what ``validate_message`` + ``_check_rest`` give, in a fraction of the time; tests/test_message_fast_path.py
    holds the two to that. Everything here is inlined on purpose: it runs once per message.
    """
    if type(record) is not dict or not _PLAIN_FIELDS.issuperset(record):
        return None
    get = record.get
    mid, cid, aid, gid, ts = get("message_id"), get("channel_id"), get("author_id"), get("guild_id"), get("timestamp")
    if not (type(mid) is str and type(cid) is str and type(aid) is str and type(gid) is str and type(ts) is str):
        return None
    # each id: 1-19 digits without a leading zero (so below 2**63); a lone "0" is left to the full check
    if not (0 < len(mid) < 20 and 0 < len(cid) < 20 and 0 < len(aid) < 20 and 0 < len(gid) < 20):
        return None
    if mid[0] == "0" or cid[0] == "0" or aid[0] == "0" or gid[0] == "0":
        return None
    digits = mid + cid + aid + gid
    if not (digits.isdigit() and digits.isascii()):
        return None
    when = canonical_time(ts)
    if when is None:
        return None
    content_length, attachments, reactions = get("content_length", 0), get("attachments", 0), get("reactions", 0)
    if not (type(content_length) is int and type(attachments) is int and type(reactions) is int):
        return None
    if not 0 <= (content_length | attachments | reactions) <= _U64 or content_length < 0 or attachments < 0 \
            or reactions < 0:
        return None
    analysis = get("analysis")
    if analysis is None:
        analysis = {}
    elif type(analysis) is not dict:
        return None
    elif analysis:
        if not _PLAIN_ANALYSIS.issuperset(analysis):
            return None
        sentiment = analysis.get("sentiment")
        if sentiment is not None and (type(sentiment) is not str
                                      or (sentiment not in known and not _plain_text(sentiment, known))):
            return None
        topics = analysis.get("topics")
        if topics is not None:
            if type(topics) is not list:
                return None
            try:  # ``known`` holds only plain str: a topic in it is one
                seen_all = known.issuperset(topics)
            except TypeError:  # an unhashable topic: not a string either
                return None
            if not seen_all:
                for topic in topics:
                    if type(topic) is not str or (topic not in known and not _plain_text(topic, known)):
                        return None
    return mid, cid, aid, gid, ts, content_length, attachments, reactions, analysis, when


def checked_changes(message_id: str, changes: Any) -> dict[str, Any]:
    """``update_message``'s changes, checked as far as they can be before the stored record is known."""
    if not isinstance(changes, Mapping):
        raise ValidationError(f"changes must be a mapping of fields, got {type(changes).__name__}", field="changes")
    out = dict(changes)
    for name in out:
        if not isinstance(name, str):
            raise ValidationError(f"field names must be strings, got {shown(name)}", field="changes")
    for name in ("message_id", "guild_id", "channel_id", "author_id"):
        if name in out:
            out[name] = snowflake(out[name], name)
    if out.get("message_id", message_id) != message_id:
        raise ValidationError(f"message_id cannot be changed ({message_id} -> {out['message_id']})",
                              field="message_id")
    if "timestamp" in out:
        try:
            out["timestamp"] = iso_utc(out["timestamp"], "timestamp")
        except OverflowError as exc:
            raise ValidationError(f"timestamp is out of range: {exc}", field="timestamp") from exc
    return out


def merged_record(current: MessageRecord, changes: dict[str, Any]) -> MessageRecord:
    """``current`` with ``changes`` shallowly merged in, identity kept, re-validated."""
    for name in IMMUTABLE_FIELDS:
        if name in changes and changes[name] != current.get(name):
            raise ValidationError(f"{name} cannot be changed by an update ({shown(current.get(name))} -> "
                                  f"{shown(changes[name])}); record a new message instead", field=name)
    return checked_record({**current, **changes})

