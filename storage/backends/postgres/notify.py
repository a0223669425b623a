"""What a PostgreSQL write tells the other processes: ``pg_notify`` inside the writing transaction.

PostgreSQL delivers a notification only when its transaction commits, to every session listening on the channel,
in commit order (and in the order sent within one transaction). So a write that sends, *in its own transaction*,
what it changed gives every listener (postgres/listener.py) each committed change exactly once, after the commit,
never for a write that rolled back; and two writes of one key, which row locks serialize, arrive in commit order.

How it is sent (measured, benchmarks/bench_feed.py): as part of the write's own statement, a data-modifying ``WITH``
whose outer ``SELECT`` calls ``pg_notify`` (``WITH w AS (INSERT ...) SELECT pg_notify($ch, $payload)``), so a
``put`` stays one round trip. A trigger would also catch writes made with hand-written SQL, but a row or statement
trigger in PL/pgSQL cost 25-40% more per ``put`` here even when it found nobody listening, against a few percent
for the statement form. Writes this library cannot describe (SQL through ``tx.connection``) send ``resync``.
``update()`` sends its notification as one more statement of its transaction (its result is known only then).

Payload: a JSON array of operations in the journal's shape: ``["p", collection, key, doc]`` (put),
``["d", collection, key]`` (delete), ``["r"]`` (resync: something changed that the writer cannot list), and
``["f", collection, key]`` (a put whose document the writer does not have: ``refresh_member_statistics``'s SQL;
the listener reads it after the commit). A batch is cut into as many notifications as needed. NOTIFY payloads
must stay under 8000 bytes, so a document larger than :data:`INLINE_DOC` bytes travels in pieces first, one
notification each (``[["c", base64 piece]]``), then ``["q", collection, key]`` says whose document they make: one
transaction's notifications are delivered together and in order, never interleaved with another's, so the listener
gets the exact version committed (reading it from the table later could give a newer one). ``["s", token]`` is
a marker the store sends itself (see PgFeed.sync).

Every notification of a transaction is distinct (:class:`Distinct`): PostgreSQL delivers identical notifications
(same channel, same payload) sent within one transaction only once. Ours describe operations, so a repeat is not
redundant: delete K, put K, delete K in one transaction would reach listeners as delete, put (they would end
believing K exists); put doc1, doc2, doc1 as doc1, doc2; two keys put with the same large document, or a document
whose pieces are alike, would lose pieces. So a payload that would repeat one its transaction already sent gets one
more operation, ``["n", serial]`` (the transaction's count of such repeats), last; the listener drops it. Only
repeats are stamped: the usual payload is unchanged, and a single-statement write that sends one notification
needs no bookkeeping at all (see benchmarks/README.md for the cost); and a listener of an older version, which
cannot read the stamp, loses only the repeats PostgreSQL dropped before anyway (the event loop logs an error for
each). The stamp adds at most 27 bytes (a 20-digit serial): the 100 bytes between MAX_PAYLOAD and PostgreSQL's
limit leave room.

Channel: one per schema (a test database holds many stores, one per schema): ``storage_changes_`` and a hash of
the schema name (channel names are identifiers of at most 63 bytes).
"""

from __future__ import annotations

import base64
import hashlib
import operator
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson

from ...offload import off_loop
from . import conn as pg_conn
from . import documents as sql

__all__ = ["channel_for", "payloads", "framed", "Distinct", "RESYNC_PAYLOAD", "MAX_PAYLOAD", "INLINE_DOC",
           "NOTIFY_INLINE", "put", "put_columns", "delete", "send"]

#: Bytes per notification, under PostgreSQL's limit of 8000.
MAX_PAYLOAD = 7900
#: Documents larger than this travel in pieces (see the module doc).
INLINE_DOC = 3000
#: :func:`framed` frames the notifications of more items than this in a worker thread.
NOTIFY_INLINE = 2000
#: Documents per ``INSERT`` statement of a large ``put`` (see :func:`put`).
PUT_SLICE = 2000
#: Bytes of a document per piece (base64 makes them 4/3 as many).
PIECE = 5600
RESYNC_PAYLOAD = '[["r"]]'
_dumps = orjson.dumps

# documents.py's statements, each inside a WITH whose SELECT notifies: the same writes, one round trip each
_PUT_ONE = f"WITH w AS ({sql._PUT_ONE}) SELECT pg_notify($5, $6)"
_PUT_MANY = (f"WITH w AS ({sql._PUT_MANY}) "
             "SELECT pg_notify($5, p) FROM unnest($6::text[]) WITH ORDINALITY AS n(p, i) ORDER BY i")
_DELETE = f"WITH w AS ({sql._DELETE} RETURNING 1) SELECT count(*) FROM (SELECT pg_notify($4, $5) FROM w) AS n"
_SEND = "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS n(p, i) ORDER BY i"


class Distinct:
    """What one transaction has notified so far, so that none of its notifications repeats another (see the
    module doc): one per transaction, passed to every call that notifies in it.

    It keeps the payloads' ``hash()``, not the payloads (a transaction can notify megabytes): two equal payloads
    always have equal hashes, so every repeat is caught; a collision only stamps a payload that did not need it.
    A stamped payload is never kept: its serial makes it unlike any other."""

    __slots__ = ("_seen", "_serial")

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._serial = 0

    def one(self, note: str) -> str:
        """``note``, stamped if this transaction sent it already."""
        seen = self._seen
        digest = hash(note)
        if digest in seen:
            self._serial += 1
            return note[:-1] + ',["n",' + str(self._serial) + "]]"
        seen.add(digest)
        return note

    def all(self, notes: list[str]) -> list[str]:
        """:meth:`one` of each note, in order."""
        return [self.one(note) for note in notes]


def channel_for(schema: str) -> str:
    """The notification channel of the store whose tables live in ``schema``."""
    return "storage_changes_" + hashlib.blake2b(schema.encode(), digest_size=8).hexdigest()


def payloads(collection: str, items: Iterable[tuple[str, bytes | None]], *, delete: bool = False) -> list[str]:
    """The notifications for puts of ``(key, encoded doc)`` (``doc`` None: the listener reads it) or, with
    ``delete``, deletes of the keys; each under :data:`MAX_PAYLOAD` bytes, in order."""
    coll = orjson.dumps(collection)
    out: list[str] = []
    parts: list[bytes] = []
    size = 2

    def flush() -> None:
        nonlocal parts, size
        if parts:
            out.append((b"[" + b",".join(parts) + b"]").decode())
            parts, size = [], 2

    for key, doc in items:
        head = orjson.dumps(key)
        if delete:
            item = b'["d",' + coll + b"," + head + b"]"
        elif doc is None:
            item = b'["f",' + coll + b"," + head + b"]"
        elif len(doc) > INLINE_DOC:
            flush()
            for start in range(0, len(doc), PIECE):
                out.append('[["c","' + base64.b64encode(doc[start:start + PIECE]).decode() + '"]]')
            item = b'["q",' + coll + b"," + head + b"]"
        else:
            item = b'["p",' + coll + b"," + head + b"," + doc + b"]"
        if parts and size + len(item) + 1 > MAX_PAYLOAD:
            flush()
        parts.append(item)
        size += len(item) + 1
    flush()
    return out


async def framed(collection: str, items: list[tuple[str, bytes | None]], *, delete: bool = False) -> list[str]:
    """:func:`payloads`, in a worker thread for more than NOTIFY_INLINE items (a refresh of a 20k-member guild's
    statistics or its forget notifies 20-25k keys: ~13-21 ms of the loop framed there)."""
    if len(items) > NOTIFY_INLINE:
        return await off_loop(lambda: payloads(collection, items, delete=delete))
    return payloads(collection, items, delete=delete)


async def put(conn: Any, channel: str, collection: str, items: Sequence[tuple[str, bytes]],
              expires: datetime | None = None, *, sent: Distinct | None) -> None:
    """``documents.put`` that notifies in the same statement (so in the same transaction). ``sent``: the caller's
    transaction's (None: this call is its own transaction)."""
    if len(items) == 1 and len(items[0][1]) <= INLINE_DOC:
        key, raw = items[0]
        # the one-put payload of payloads(), built directly: this runs on every save
        note = '[["p",' + _dumps(collection).decode() + "," + _dumps(key).decode() + "," + raw.decode() + "]]"
        if sent is not None:  # else one notification: its own transaction's only one
            note = sent.one(note)
        await conn.execute(_PUT_ONE, collection, key, raw, expires, channel, note)
        return
    # as documents.put: ON CONFLICT DO UPDATE cannot touch one row twice in a statement
    await _put_latest(conn, channel, collection, dict(items), expires, sent)


async def put_columns(conn: Any, channel: str, collection: str, keys: list[str], docs: list[bytes],
                      expires: datetime | None = None, *, sent: Distinct | None) -> None:
    """:func:`put` of ``zip(keys, docs)`` (a large ``put_many``'s two lists: no pair per document). Keys already
    in order, each once (a bulk load's, usually), go as they are: the dict of the last put of each key and the
    sorted lists held the loop 10-14 ms for 25k documents, the check takes ~1.6 ms."""
    if all(map(operator.lt, keys, keys[1:])):
        await _put_sorted(conn, channel, collection, keys, docs, expires, sent)
    else:
        await _put_latest(conn, channel, collection, dict(zip(keys, docs)), expires, sent)


async def _put_latest(conn: Any, channel: str, collection: str, latest: dict[str, bytes],
                      expires: datetime | None, sent: Distinct | None) -> None:
    """:func:`put` of ``latest`` ({key: encoded doc}, each key's last put), in key order."""
    keys = sorted(latest)
    await _put_sorted(conn, channel, collection, keys, [latest[k] for k in keys], expires, sent)


async def _put_sorted(conn: Any, channel: str, collection: str, keys: list[str], docs: list[bytes],
                      expires: datetime | None, sent: Distinct | None) -> None:
    """:func:`put` of ``zip(keys, docs)``, the keys in order and each once."""
    if sent is None:  # one transaction still, but pieces can repeat (two keys, one large document)
        sent = Distinct()
    if len(keys) <= PUT_SLICE:
        await conn.execute(_PUT_MANY, collection, keys, docs, expires, channel,
                           sent.all(payloads(collection, zip(keys, docs))))
        return
    # asyncpg encodes a statement's arguments on the event loop, element by element: 25k documents held it ~40 ms.
    # Slices of PUT_SLICE, one statement each, in one transaction (a savepoint inside the caller's): all or nothing
    # still, and the loop runs between two statements while the server works.
    async with pg_conn.transaction(conn):
        for start in range(0, len(keys), PUT_SLICE):
            some_keys, some_docs = keys[start:start + PUT_SLICE], docs[start:start + PUT_SLICE]
            await conn.execute(_PUT_MANY, collection, some_keys, some_docs, expires, channel,
                               sent.all(payloads(collection, zip(some_keys, some_docs))))


async def delete(conn: Any, channel: str, collection: str, key: str, now: datetime) -> bool:
    """``documents.delete`` that notifies in the same statement when a (visible) document was deleted: a
    single-statement write, its own transaction (a transaction's deletes notify through :func:`send`)."""
    deleted: int = await conn.fetchval(_DELETE, collection, key, now, channel,
                                       payloads(collection, [(key, None)], delete=True)[0])
    return deleted > 0


async def send(conn: Any, channel: str, notes: list[str], sent: Distinct | None) -> None:
    """Send notifications built by :func:`payloads` (inside the caller's transaction, whose :class:`Distinct` is
    ``sent``; None: nothing else is sent in this transaction)."""
    if notes:
        if len(notes) > 1 or sent is not None:
            notes = (sent or Distinct()).all(notes)
        await conn.execute(_SEND, channel, notes)
