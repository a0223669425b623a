"""Message rows in PostgreSQL's binary ``COPY`` format, built in Python before they are sent.

asyncpg can encode rows itself (``copy_records_to_table``), through one generic codec call per value, with
``isinstance`` checks against abstract base classes for every array and array element: that costs more client time per
message row than the server spends inserting the row, on a machine where client and server share two cores
(benchmarks/README.md, "Design measurements"). Here a row is one ``struct`` call for its eight fixed-width columns and
three variable ones that the caller mostly looks up: sentiments and topic lists repeat, so each distinct one needs
encoding once per batch.
This module only knows the format; postgres/messages.py knows the records.

The format (PostgreSQL manual, ``COPY``, "Binary Format"): a header, then per row an int16 field count and per
field an int32 byte length (-1 for NULL) and the value in its type's binary form, then an int16 -1. The forms used:
``bigint`` 8 bytes big-endian; ``timestamptz`` int64 microseconds since 2000-01-01 00:00 UTC; ``text`` UTF-8;
``text[]`` dimensions, a has-nulls flag, the element type (``text``, oid 25), size and lower bound (1) of the one
dimension, then the elements as length and bytes (an empty list: zero dimensions); ``jsonb`` a version byte (1)
and the JSON text.
"""

from __future__ import annotations

import struct

__all__ = ["COPY_HEADER", "COPY_TRAILER", "FIXED", "NULL", "text_field", "text_array_field", "jsonb_field"]

#: Signature, flags (no OIDs), header extension length.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
#: A row's field count and its first eight fields, all 8-byte integers:
#: ``FIXED.pack(11, 8, message_id, 8, guild_id, 8, channel_id, 8, author_id, 8, created_at, 8, content_length,
#: 8, attachments, 8, reactions)``. Raises ``struct.error`` for a value out of the signed 64-bit range.
FIXED = struct.Struct(">h" + "iq" * 8)
#: A NULL field.
NULL = struct.pack(">i", -1)
_LENGTH = struct.Struct(">i")
_TEXT_OID = 25
_EMPTY_ARRAY = struct.pack(">iiii", 12, 0, 0, _TEXT_OID)


def text_field(value: str | None) -> bytes:
    """A ``text`` field; the caller has made sure it holds no NUL and no lone surrogate."""
    if value is None:
        return NULL
    data = value.encode()
    return _LENGTH.pack(len(data)) + data


def text_array_field(items: list[str] | None) -> bytes:
    """A ``text[]`` field (one dimension, no NULL elements)."""
    if items is None:
        return NULL
    if not items:
        return _EMPTY_ARRAY
    parts = [struct.pack(">iiiii", 1, 0, _TEXT_OID, len(items), 1)]
    for item in items:
        data = item.encode()
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    body = b"".join(parts)
    return _LENGTH.pack(len(body)) + body


def jsonb_field(doc: bytes | None) -> bytes:
    """A ``jsonb`` field from a document's JSON text (as :func:`storage.codec.encode_doc` makes it)."""
    if doc is None:
        return NULL
    return _LENGTH.pack(len(doc) + 1) + b"\x01" + doc
