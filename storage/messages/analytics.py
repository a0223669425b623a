"""Message analytics, written once for every backend: validation, idempotent ingest, and the reference queries.

Message records are the highest-volume data a bot writes (a busy guild produces millions), so they are not
documents in a collection: each backend keeps them in its own append-friendly form behind four primitives::

    _insert_messages(records) -> int         normalized, unique records; existing message ids are skipped
    _modify_message(message_id, fn) -> bool  fn(record) -> new record, atomically; False if there is none
    _delete_messages_before(before) -> int   timestamp < before
    _scan_messages(guild_id, since, until)   records in [since, until) by (timestamp, message_id); None = all guilds

Everything here checks its input first (so both backends reject exactly the same input and write nothing), then
either calls a write primitive or computes a query by streaming over the records. The queries read them as column
blocks (:class:`MessageColumns`: one sequence per field, so that ``Counter`` counts in C), from the optional
primitive ``_scan_message_columns``, whose default here builds the blocks from ``_scan_messages`` (the JSON
backend serves them from a cache instead). These generic queries are the reference: a backend may override one
with something faster (SQL), and the conformance tests prove that both give the same answers. Likewise
``record_messages`` goes through the optional ``_ingest(records, size_hint)``, whose default checks the whole
batch and then calls ``_insert_messages``; PostgreSQL overrides it to write while it checks, in a transaction
(storage/backends/postgres/ingest.py). Both check with :func:`checked_chunks`, so they accept and refuse the same.

Decisions, stated once:

* **Idempotent by message_id.** A duplicate id, within a batch or against stored data, is never counted twice.
  Within a batch the *first* record with an id wins (the later ones are what a retry would resend); against stored
  data the stored record wins: use :meth:`AnalyticsMixin.update_message` to change a record.
* **Immutable fields.** ``message_id``, ``guild_id``, ``channel_id``, ``author_id`` (who said what where) and
  ``timestamp`` cannot be changed by an update. Discord never changes when a message was sent (it is encoded in
  its id), and the timestamp is what the backends partition and order the log by.
* **Missing sentiment** is counted as ``"unknown"``, so a breakdown always sums to the message count.
* **Topics** are counted once per message: ``["music", "music"]`` is one message about music.
* **Bounds** are half-open ``[since, until)``, in UTC; naive datetimes and texts without an offset are UTC.
"""

from __future__ import annotations

import abc
import asyncio
import sys
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from ..codec import canonical_numbers, encode_doc, shown
from ..errors import ValidationError
from ..models import MEMBERS, MESSAGE_FIELDS, canonical_time, iso_utc, parse_timestamp, snowflake, validate_message
from ..protocol import Document, TimeBound, Transaction

__all__ = [
    "AnalyticsMixin",
    "IMMUTABLE_FIELDS",
    "UNKNOWN_SENTIMENT",
    "BY_CHOICES",
    "timestamp_key",
    "bound_key",
    "normalize_messages",
    "message_chunks",
    "message_records",
    "checked_chunks",
    "checked_message",
    "usual_fields",
    "UsualFields",
    "MessageColumns",
    "ColumnsBuilder",
    "micros",
    "micros_text",
    "time_bound",
    "check_limit",
]

#: Fields an update may repeat but not change.
IMMUTABLE_FIELDS = ("message_id", "guild_id", "channel_id", "author_id", "timestamp")
#: The ``sentiment_breakdown`` key of messages without ``analysis.sentiment``.
UNKNOWN_SENTIMENT = "unknown"
BY_CHOICES = (None, "channel", "author", "day")
_TS_CANONICAL_LENGTHS = (20, 27)  # YYYY-MM-DDTHH:MM:SSZ and YYYY-MM-DDTHH:MM:SS.ffffffZ
VALIDATE_IN_THREAD = 2000  # records: bigger batches are validated in a worker thread
INGEST_CHUNK = 1000  # records per chunk of message_chunks: about 5 ms of checks between two awaits
_PLAIN_FIELDS = frozenset((*MESSAGE_FIELDS, "guild_id"))
_PLAIN_ANALYSIS = frozenset(("sentiment", "topics"))
_U64 = 2**64 - 1

MessageRecord = dict[str, Any]
#: What :func:`usual_fields` returns: message_id, channel_id, author_id, guild_id, timestamp (canonical texts),
#: content_length, attachments, reactions, analysis, and the timestamp as an aware datetime.
UsualFields = tuple[str, str, str, str, str, int, int, int, dict[str, Any], datetime]
ModifyFn = Callable[[MessageRecord], MessageRecord]
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


def _message(record: Any, index: int | None) -> MessageRecord:
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
    return _joined(message_chunks(records, sys.maxsize))


def message_chunks(records: Iterable[Mapping[str, Any]], size: int = INGEST_CHUNK) -> Iterator[list[MessageRecord]]:
    """:func:`normalize_messages` a chunk at a time: lists of up to ``size`` normalized records, new ids only.

    Whether ``records`` is iterable at all is checked now, each record as its chunk is asked for.
    """
    return _chunks(message_records(records), size)


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


def _chunks(iterator: Iterator[Any], size: int) -> Iterator[list[MessageRecord]]:
    return checked_chunks(iterator, size, _record_of, _same)


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


def _joined(chunks: Iterator[list[MessageRecord]]) -> list[MessageRecord]:
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


# -------------------------------------------------------------------------------------------------------------------
# column blocks: what the aggregate queries read
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_MICRO = timedelta(microseconds=1)
DAY_MICROS = 86_400_000_000
COLUMN_BLOCK = 10_000
_NEVER = -(2**63)


def micros(dt: datetime) -> int:
    """An aware datetime as microseconds since 1970-01-01 UTC (exact, unlike a float timestamp)."""
    return (dt - EPOCH) // _MICRO


def text_micros(ts: str) -> int:
    """A stored (canonical, UTC) timestamp as microseconds since 1970-01-01."""
    return (datetime.fromisoformat(ts[:-1]) - _EPOCH_NAIVE) // _MICRO


def micros_text(value: int) -> str:
    """Back to the canonical text of a stored timestamp."""
    return iso_utc(EPOCH + timedelta(microseconds=value))


def day_text(day: int) -> str:
    """Days since 1970-01-01 as ``YYYY-MM-DD``."""
    return (EPOCH + timedelta(days=day)).date().isoformat()


@dataclass(frozen=True)
class MessageColumns:
    """A block of message records reduced to what the aggregate queries read, one sequence per field.

    Counting a column with :class:`collections.Counter` runs in C; counting dicts one by one does not. Topics are
    the distinct topics of each message, as a tuple (so that equal combinations can be counted together).
    """

    micros: Sequence[int]
    authors: Sequence[str]
    channels: Sequence[str]
    sentiments: Sequence[str | None]
    topics: Sequence[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.authors)


class ColumnsBuilder:
    """Grows column blocks record by record; also the JSON backend's per-file cache."""

    __slots__ = ("_combos", "authors", "channels", "micros", "sentiments", "topics")

    def __init__(self) -> None:
        self.micros: array[int] = array("q")  # 8 bytes a message
        self.authors: list[str] = []
        self.channels: list[str] = []
        self.sentiments: list[str | None] = []
        self.topics: list[tuple[str, ...]] = []
        self._combos: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per distinct combination

    def __len__(self) -> int:
        return len(self.authors)

    def _row(self, rec: MessageRecord) -> tuple[int, str, str, str | None, tuple[str, ...]]:
        analysis = rec["analysis"]
        topics = analysis.get("topics")
        combo = tuple(dict.fromkeys(topics)) if topics else ()
        combo = self._combos.setdefault(combo, combo)
        sentiment = analysis.get("sentiment")
        return (text_micros(rec["timestamp"]), sys.intern(rec["author_id"]), sys.intern(rec["channel_id"]),
                sentiment if sentiment is None else sys.intern(sentiment), combo)

    def add(self, rec: MessageRecord) -> None:
        m, author, channel, sentiment, combo = self._row(rec)
        self.micros.append(m)
        self.authors.append(author)
        self.channels.append(channel)
        self.sentiments.append(sentiment)
        self.topics.append(combo)

    def replace(self, row: int, rec: MessageRecord) -> None:
        """A newer version of the record in ``row`` (an update)."""
        m, author, channel, sentiment, combo = self._row(rec)
        self.micros[row] = m
        self.authors[row] = author
        self.channels[row] = channel
        self.sentiments[row] = sentiment
        self.topics[row] = combo

    def snapshot(self, lo: int | None = None, hi: int | None = None) -> MessageColumns:
        """A copy (later appends and updates do not show in it), of the rows with time in ``[lo, hi)`` if given."""
        if lo is None and hi is None:
            return MessageColumns(self.micros[:], self.authors[:], self.channels[:], self.sentiments[:],
                                  self.topics[:])
        low = _NEVER if lo is None else lo
        high = -_NEVER if hi is None else hi
        keep = [i for i, m in enumerate(self.micros) if low <= m < high]
        return MessageColumns(array("q", [self.micros[i] for i in keep]), [self.authors[i] for i in keep],
                              [self.channels[i] for i in keep], [self.sentiments[i] for i in keep],
                              [self.topics[i] for i in keep])


def time_bound(value: TimeBound, name: str) -> datetime | None:
    """A query bound (``since``/``until``/``before``) as an aware UTC datetime; None stays None (unbounded)."""
    if value is None:
        return None
    try:
        return parse_timestamp(value, name)
    except OverflowError as exc:
        raise ValidationError(f"{name} is out of range: {exc}", field=name) from exc


def check_limit(limit: Any) -> int:
    """A ``top_*`` query's ``limit``: a non-negative int (a bool is refused, though Python counts it as one)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValidationError(f"limit must be a non-negative integer, got {limit!r}", field="limit")
    return limit


def _top(counter: Counter[str], limit: int) -> list[tuple[str, int]]:
    """Count descending, then id ascending (as strings), so that ties have one answer on every backend."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def _changes(message_id: str, changes: Any) -> dict[str, Any]:
    """Check what can be checked before the stored record is known."""
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


def _merge(current: MessageRecord, changes: dict[str, Any]) -> MessageRecord:
    """``current`` with ``changes`` shallowly merged in, identity kept, re-validated."""
    for name in IMMUTABLE_FIELDS:
        if name in changes and changes[name] != current.get(name):
            raise ValidationError(f"{name} cannot be changed by an update ({shown(current.get(name))} -> "
                                  f"{shown(changes[name])}); record a new message instead", field=name)
    return _message({**current, **changes}, None)


class AnalyticsMixin(abc.ABC):
    """The public analytics API of every store (mixed into :class:`storage.backends.base.BaseStore`)."""

    # -- what the store provides ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def _guard_read(self) -> None: ...

    @abc.abstractmethod
    def _guard_write(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    # -- the backend primitives ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def _insert_messages(self, records: list[MessageRecord]) -> int:
        """Store normalized records with distinct ids, skipping ids already stored; returns how many were new.

        All of them durably, or none (a crash may leave a prefix, which re-sending the batch completes).
        """

    @abc.abstractmethod
    async def _modify_message(self, message_id: str, fn: ModifyFn) -> bool:
        """Replace the record with ``fn(record)`` atomically (no lost update); False if it does not exist.

        If ``fn`` raises, nothing is written and the exception propagates.
        """

    @abc.abstractmethod
    async def _delete_messages_before(self, before: datetime) -> int:
        """Delete every record with a timestamp strictly before ``before``; returns how many."""

    @abc.abstractmethod
    def _scan_messages(self, guild_id: str | None = None, since: datetime | None = None,
                       until: datetime | None = None) -> AsyncIterator[MessageRecord]:
        """Records of a guild (every guild when None) in ``[since, until)``, by (timestamp, message_id).

        Called with no arguments by backups: every record of every guild.
        """

    # -- ingest and changes --------------------------------------------------------------------------------------
    async def record_messages(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Record a batch (the fast path); returns how many were new.

        Every record is validated before anything is committed: one bad record raises :class:`ValidationError`
        naming its index and the field, and nothing is stored. Duplicates are not double-counted (see the module
        doc for which version wins).
        """
        self._guard_write()
        return await self._ingest(message_records(records), len(records) if isinstance(records, list) else 0)

    async def _ingest(self, records: Iterator[Any], size_hint: int) -> int:
        """Check and write the caller's records (``size_hint`` of them, when known), all or nothing.

        This default checks everything first (:func:`message_chunks`) and then calls ``_insert_messages`` once; a
        backend that can undo a write (a transaction) overrides it to write while it checks.
        """
        chunks = _chunks(records, INGEST_CHUNK)
        if size_hint > VALIDATE_IN_THREAD:
            # several us a record: a big batch would hold the event loop (and the bot's heartbeat) for 100 ms or more
            unique = await asyncio.to_thread(_joined, chunks)
        else:
            unique = _joined(chunks)
        if not unique:
            return 0
        return await self._insert_messages(unique)

    async def record_message(self, record: Mapping[str, Any]) -> bool:
        """Record one message; False when its ``message_id`` was already recorded (nothing changes then)."""
        self._guard_write()
        return await self._insert_messages([_message(record, None)]) == 1

    async def update_message(self, message_id: int | str, changes: Mapping[str, Any]) -> bool:
        """Merge ``changes`` into a stored record (shallowly: ``analysis`` is replaced as a whole).

        For what changes after a message was recorded: reaction counts, a later analysis. The identity fields
        and the timestamp cannot change (:class:`ValidationError`). Returns False when there is no such message.
        """
        self._guard_write()
        mid = snowflake(message_id, "message_id")
        checked = _changes(mid, changes)
        encode_doc(checked, what="changes")
        checked = canonical_numbers(checked)  # numbers as every backend gives them back (see codec.py)
        return await self._modify_message(mid, lambda current: _merge(current, checked))

    async def prune_messages(self, before: str | datetime) -> int:
        """Delete messages older than ``before`` (timestamp < before); returns how many were deleted."""
        self._guard_write()
        bound = time_bound(before, "before")
        if bound is None:
            raise ValidationError("before is required: prune_messages(before)", field="before")
        return await self._delete_messages_before(bound)

    # -- queries -------------------------------------------------------------------------------------------------
    async def _scan_message_columns(self, guild_id: str | None, since: datetime | None,
                                    until: datetime | None) -> AsyncIterator[MessageColumns]:
        """The records of ``_scan_messages`` as column blocks (what the aggregate queries read).

        This default builds them from ``_scan_messages``; a backend may provide the blocks from a cache instead
        (the JSON backend does). Blocks may come in any order.
        """
        block = ColumnsBuilder()
        async for rec in self._scan_messages(guild_id, since, until):
            block.add(rec)
            if len(block) >= COLUMN_BLOCK:
                yield block.snapshot()
                block = ColumnsBuilder()
        if len(block):
            yield block.snapshot()

    def _columns(self, guild_id: Any, since: TimeBound, until: TimeBound) -> AsyncIterator[MessageColumns]:
        """Checked arguments -> the column blocks of the matching records."""
        self._guard_read()
        guild = snowflake(guild_id, "guild_id")
        return self._scan_message_columns(guild, time_bound(since, "since"), time_bound(until, "until"))

    async def message_counts(self, guild_id: int | str, by: str | None = None, *, since: TimeBound = None,
                             until: TimeBound = None) -> int | dict[str, int]:
        """How many messages; ``by`` = ``"channel"``/``"author"``/``"day"`` (UTC ``YYYY-MM-DD``) groups them.

        A grouped result has one sorted key per group that has messages.
        """
        if by not in BY_CHOICES:
            raise ValidationError(f"by must be None, 'channel', 'author' or 'day', got {by!r}", field="by")
        blocks = self._columns(guild_id, since, until)
        if by is None:
            total = 0
            async for block in blocks:
                total += len(block)
            return total
        if by == "day":
            days: Counter[int] = Counter()
            async for block in blocks:
                days.update(m // DAY_MICROS for m in block.micros)
            return dict(sorted((day_text(day), n) for day, n in days.items()))
        counts: Counter[str] = Counter()
        async for block in blocks:
            counts.update(block.channels if by == "channel" else block.authors)
        return dict(sorted(counts.items()))

    async def top_authors(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                          until: TimeBound = None) -> list[tuple[str, int]]:
        """The ``limit`` most active authors as ``(author_id, messages)``."""
        limit = check_limit(limit)
        counts: Counter[str] = Counter()
        async for block in self._columns(guild_id, since, until):
            counts.update(block.authors)
        return _top(counts, limit)

    async def top_channels(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                           until: TimeBound = None) -> list[tuple[str, int]]:
        """The ``limit`` busiest channels as ``(channel_id, messages)``."""
        limit = check_limit(limit)
        counts: Counter[str] = Counter()
        async for block in self._columns(guild_id, since, until):
            counts.update(block.channels)
        return _top(counts, limit)

    async def top_topics(self, guild_id: int | str, limit: int = 10, *, since: TimeBound = None,
                         until: TimeBound = None) -> list[tuple[str, int]]:
        """The ``limit`` most discussed topics as ``(topic, messages)``; a topic counts once per message."""
        limit = check_limit(limit)
        counts: Counter[str] = Counter()
        async for block in self._columns(guild_id, since, until):
            for topics, n in Counter(block.topics).items():  # few distinct combinations: count those first
                for topic in topics:
                    counts[topic] += n
        return _top(counts, limit)

    async def sentiment_breakdown(self, guild_id: int | str, *, since: TimeBound = None,
                                  until: TimeBound = None) -> dict[str, int]:
        """Messages per ``analysis.sentiment``, sorted by key; no sentiment counts as ``"unknown"``."""
        counts: Counter[str] = Counter()
        async for block in self._columns(guild_id, since, until):
            for sentiment, n in Counter(block.sentiments).items():
                counts[UNKNOWN_SENTIMENT if sentiment is None else sentiment] += n
        return dict(sorted(counts.items()))

    async def last_activity(self, guild_id: int | str, author_id: int | str, *, since: TimeBound = None,
                            until: TimeBound = None) -> str | None:
        """The timestamp (canonical ISO text) of the author's latest message in the guild, or None."""
        author = snowflake(author_id, "author_id")
        latest: int | None = None
        async for block in self._columns(guild_id, since, until):
            found = max((m for m, a in zip(block.micros, block.authors) if a == author), default=None)
            if found is not None and (latest is None or found > latest):
                latest = found
        return None if latest is None else micros_text(latest)

    async def refresh_member_statistics(self, guild_id: int | str, *, since: TimeBound = None,
                                        until: TimeBound = None) -> int:
        """Recompute ``statistics.message_count`` and ``statistics.last_active`` of the guild's members.

        The numbers come from the messages stored now (in ``[since, until)`` when given; after a prune, from what
        is left). Every other field of a member document, and every other ``statistics`` field, is kept.
        Members without messages get ``message_count`` 0 and ``last_active`` None; an author without a member
        document gets a minimal one (``user_id``, ``guild_id``, ``statistics``), so that ``get_member_data``
        agrees with ``message_counts``. Only documents whose statistics change are written, all in one
        transaction; returns how many were written.
        """
        guild = snowflake(guild_id, "guild_id")
        counts: Counter[str] = Counter()
        latest: dict[str, int] = {}  # author -> time of the latest message
        async for block in self._columns(guild, since, until):
            counts.update(block.authors)
            for m, author in zip(block.micros, block.authors):
                if m > latest.get(author, _NEVER):
                    latest[author] = m

        def fresh(user: str) -> dict[str, Any]:
            last = micros_text(latest[user]) if user in latest else None
            return {"message_count": counts.get(user, 0), "last_active": last}

        prefix = f"{guild}_"
        async with self.transaction() as tx:
            writes: list[tuple[str, Document]] = []
            seen: set[str] = set()
            async for key, doc in tx.items(MEMBERS, prefix=prefix):
                user = key[len(prefix):]
                try:
                    snowflake(user, "user_id")
                except ValidationError:
                    continue  # not a member key (``<guild>_<user>``): not ours to touch
                seen.add(user)
                old = doc.get("statistics")
                if old is None:
                    old = {}
                if not isinstance(old, dict):
                    raise ValidationError(f"members/{key}: statistics is a {type(old).__name__}, not an object; "
                                          "nothing was written", field="statistics")
                new = fresh(user)
                if "statistics" in doc and all(old.get(name) == value for name, value in new.items()):
                    continue
                writes.append((key, {**doc, "statistics": {**old, **new}}))
            for user in sorted(counts.keys() - seen):
                writes.append((f"{prefix}{user}", {"user_id": user, "guild_id": guild, "statistics": fresh(user)}))
            if writes:
                await tx.put_many(MEMBERS, writes)
        return len(writes)
