"""Message ingest on PostgreSQL: from the caller's records to binary ``COPY`` rows, one pass per record.

Ingest is bound by the client's work on a machine whose cores the server shares: checking a record and encoding
its row cost about as much as the server spends inserting it. So the usual record (see
:func:`storage.messages.records.usual_fields`) is never made into a normalized dict at all: its checked fields go
straight into the row, the datetime the check parsed becomes the ``timestamptz`` (no second parse), and the row is
kept behind its id as 8 big-endian bytes (a *keyed row*: a chunk sorts in id order by plain bytes comparison,
and a chunk is a list of ``bytes``, which the garbage collector does not track: ``(id, row)`` tuples were 10k
tracked objects per call, enough to set off full collections inside ``record_messages``, issue 15). Anything else
goes through the full checks (:func:`storage.messages.records.checked_message`, which names what is wrong) and
the general encoding. Both give the same bytes for the same record: tests/test_message_fast_path.py holds them to
it.

:class:`Ingest` then sends the rows a chunk at a time inside one transaction (see its doc), so that checking and
encoding the next chunk overlaps with the server inserting the previous one.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from ...codec import encode_doc
from ...errors import ValidationError
from ...messages.records import INGEST_CHUNK, UsualFields, checked_chunks
from .copy_rows import COPY_HEADER, COPY_TRAILER, FIXED, NULL, jsonb_field, text_array_field, text_field
from .schema import ID_SHIFT

__all__ = ["Row", "KeyedRow", "KEY_SIZE", "RowEncoder", "Ingest", "checked_rows", "record_rows", "typed_columns",
           "TYPED"]

Record = dict[str, Any]
#: A message as ``COPY`` data: its id (an ``int``, for ordering) and the row's bytes.
Row = tuple[int, bytes]
#: A message as ``COPY`` data behind its id as 8 big-endian bytes (:data:`KEY_SIZE`): keyed rows sort in id order.
KeyedRow = bytes
KEY_SIZE = 8
_KEY = struct.Struct(">Q")
#: :data:`~.copy_rows.FIXED` behind the key: ``_KEYED.pack(message_id, 11, 8, message_id - ID_SHIFT, ...)``.
_KEYED = struct.Struct(">Q" + FIXED.format.lstrip(">"))
#: The fields of a normalized record that have typed columns (everything else goes to ``extra``).
TYPED = frozenset(("message_id", "guild_id", "channel_id", "author_id", "timestamp", "content_length",
                   "attachments", "reactions", "analysis"))
_TYPED_COUNT = len(TYPED)
_BIGINT_MAX = 2**63 - 1
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)  # timestamptz counts microseconds from here
_MICROSECOND = timedelta(microseconds=1)


def typed_columns(rec: Record) -> tuple[str | None, list[str] | None, bytes | None]:
    """The ``sentiment`` and ``topics`` columns of a normalized record and its encoded ``extra`` (None when the
    typed columns say everything); refuses counters that do not fit in a ``bigint``."""
    analysis = rec["analysis"]
    sentiment = analysis.get("sentiment")
    topics = analysis.get("topics")
    extra: dict[str, Any] | None = None
    if len(rec) > _TYPED_COUNT:
        extra = {k: v for k, v in rec.items() if k not in TYPED}
    # The typed columns rebuild ``analysis`` only if it holds nothing but a non-null sentiment and topics.
    if len(analysis) != (sentiment is not None) + (topics is not None):
        extra = extra or {}
        extra["analysis"] = analysis
    if rec["content_length"] > _BIGINT_MAX or rec["attachments"] > _BIGINT_MAX or rec["reactions"] > _BIGINT_MAX:
        name = next(n for n in ("content_length", "attachments", "reactions") if rec[n] > _BIGINT_MAX)
        raise ValidationError(f"message {rec['message_id']}: {name} does not fit in a signed 64-bit integer",
                              field=name)
    return sentiment, topics, encode_doc(extra, what="record") if extra else None


class RowEncoder:
    """Rows in PostgreSQL's binary ``COPY`` format (see postgres/copy_rows.py), with the caches of one
    ``record_messages``.

    Guild and channel ids convert once per call, and the usual record (no ``extra``) has its sentiment and
    topics columns encoded once per distinct combination: sentiments and topic lists repeat.
    """

    __slots__ = ("_ids", "_tails")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._tails: dict[tuple[str | None, tuple[str, ...] | None], bytes] = {}

    def usual(self, fields: UsualFields) -> Row:
        """The row of a record :func:`storage.messages.records.usual_fields` accepted."""
        return _unkeyed(self.usual_keyed(fields))

    def record(self, rec: Record) -> Row:
        """The row of a normalized record (any record ``record_messages`` accepts)."""
        return _unkeyed(self.record_keyed(rec))

    def usual_keyed(self, fields: UsualFields) -> KeyedRow:
        """:meth:`usual` as a keyed row."""
        mid, cid, aid, gid, _ts, content_length, attachments, reactions, analysis, when = fields
        sentiment = analysis.get("sentiment")
        topics = analysis.get("topics")
        if len(analysis) != (sentiment is not None) + (topics is not None):  # a null sentiment or topics: extra
            return self.record_keyed(_record(fields))
        key = (sentiment, None if topics is None else tuple(topics))
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tails[key] = text_field(sentiment) + text_array_field(topics) + NULL
        ids = self._ids
        shift = ID_SHIFT
        message_id = int(mid)
        try:
            head = _KEYED.pack(
                message_id, 11, 8, message_id - shift,
                8, ids.get(gid) or ids.setdefault(gid, int(gid) - shift),
                8, ids.get(cid) or ids.setdefault(cid, int(cid) - shift),
                8, int(aid) - shift,  # too many distinct authors in a batch for a cache to pay
                8, (when - _PG_EPOCH) // _MICROSECOND,
                8, content_length, 8, attachments, 8, reactions)
        except struct.error:  # a counter beyond bigint: the general path names it
            return self.record_keyed(_record(fields))
        return head + tail

    def record_keyed(self, rec: Record) -> KeyedRow:
        """:meth:`record` as a keyed row."""
        sentiment, topics, extra = typed_columns(rec)
        ids = self._ids
        shift = ID_SHIFT
        guild, channel = rec["guild_id"], rec["channel_id"]
        message_id = int(rec["message_id"])
        when = datetime.fromisoformat(rec["timestamp"])  # canonical: ends in Z, which 3.11 reads as UTC
        try:
            head = _KEYED.pack(
                message_id, 11, 8, message_id - shift,
                8, ids.get(guild) or ids.setdefault(guild, int(guild) - shift),
                8, ids.get(channel) or ids.setdefault(channel, int(channel) - shift),
                8, int(rec["author_id"]) - shift,
                8, (when - _PG_EPOCH) // _MICROSECOND,
                8, rec["content_length"], 8, rec["attachments"], 8, rec["reactions"])
        except struct.error as exc:  # typed_columns has refused counters beyond bigint: nothing else is left
            raise ValidationError(f"message {rec['message_id']}: {exc}") from exc
        return head + text_field(sentiment) + text_array_field(topics) + jsonb_field(extra)


def _unkeyed(row: KeyedRow) -> Row:
    return _KEY.unpack_from(row)[0], row[KEY_SIZE:]


def _record(fields: UsualFields) -> Record:
    mid, cid, aid, gid, ts, content_length, attachments, reactions, analysis, _when = fields
    return {"message_id": mid, "channel_id": cid, "author_id": aid, "guild_id": gid, "timestamp": ts,
            "content_length": content_length, "attachments": attachments, "reactions": reactions,
            "analysis": analysis}


def checked_rows(records: Iterator[Any], size: int, encoder: RowEncoder) -> Iterator[list[KeyedRow]]:
    """The caller's records checked, deduplicated (the first of an id wins) and encoded as keyed rows, ``size``
    rows a chunk.

    A bad record raises ValidationError (naming its index) when the chunk holding it is asked for.
    """
    return checked_chunks(records, size, encoder.usual_keyed, encoder.record_keyed)


def record_rows(records: list[Record], size: int, encoder: RowEncoder) -> Iterator[list[KeyedRow]]:
    """Keyed rows of records already normalized and unique (``_insert_messages``), ``size`` a chunk."""
    for start in range(0, len(records), size):
        yield [encoder.record_keyed(rec) for rec in records[start:start + size]]


class Ingest:
    """One ``record_messages`` call as ``COPY`` data, produced and sent a chunk at a time.

    A bad record found after some chunks went out must not leave them behind, so the ``COPY`` runs inside a
    transaction and a bad record *ends the data* (it is kept in :attr:`error`) instead of raising inside the
    generator: the caller raises it before the commit, and the transaction rolls back. (An exception inside the
    generator would make asyncpg abort the ``COPY`` and open a second connection to cancel it.) What was encoded
    is kept: when the ``COPY`` fails on an id that is stored already, the batch goes again through the staging
    table without being checked and encoded twice.

    Each chunk is sent in id order (see ``_insert_messages`` in postgres/messages.py for why order matters).
    """

    def __init__(self, chunks: Iterator[list[KeyedRow]], size: int = INGEST_CHUNK) -> None:
        """``chunks``: of ``size`` rows each but the last."""
        self._chunks: Iterator[list[KeyedRow]] | None = chunks
        self.encoded: list[bytes] = []
        self.rows = 0
        self.error: ValidationError | None = None
        first = next(chunks, None)  # checked now: a bad first chunk raises here, before any connection is taken
        if first is not None:
            first.sort()  # keyed rows: in id order (ids are unique: rows compare by their key alone)
        else:
            self._chunks = None
        self.first = self._next = first
        #: whether the first chunk is the whole batch (chunks are full but the last)
        self.whole = first is None or len(first) < size

    @property
    def first_ids(self) -> tuple[int, int]:
        """The lowest and highest id of the first chunk."""
        assert self.first
        return _KEY.unpack_from(self.first[0])[0], _KEY.unpack_from(self.first[-1])[0]

    def step(self) -> bytes | None:
        """The next chunk's rows, or None at the end (or at a bad record: see :attr:`error`)."""
        chunk, self._next = self._next, None
        if chunk is None:
            if self._chunks is None:
                return None
            try:
                chunk = next(self._chunks, None)  # checks and encodes it
            except ValidationError as exc:
                self.error = exc
                chunk = None
            if chunk is None:
                self._chunks = None
                return None
            chunk.sort()
        data = b"".join([row[KEY_SIZE:] for row in chunk])
        self.encoded.append(data)
        self.rows += len(chunk)
        return data

    async def stream(self) -> AsyncIterator[bytes]:
        yield COPY_HEADER
        while (data := self.step()) is not None:
            yield data
            await asyncio.sleep(0)  # asyncpg asks for the next chunk without yielding to the event loop
        yield COPY_TRAILER

    def check(self) -> None:
        """Raise the bad record's error, if one ended the data."""
        if self.error is not None:
            raise self.error

    def finish(self) -> list[bytes]:
        """Every chunk's rows (checking and encoding what the ``COPY`` did not get to)."""
        while self.step() is not None:
            pass
        self.check()
        return self.encoded


async def replay(encoded: list[bytes]) -> AsyncIterator[bytes]:
    """``COPY`` data of rows encoded before (the staging-table merge)."""
    yield COPY_HEADER
    for data in encoded:
        yield data
    yield COPY_TRAILER
