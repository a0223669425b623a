"""The member rule's fast path: the usual member checked and encoded in one function, or None to take the long way.

A batch of 1,000 members spent about 10 ms in the member rule (issue 15: SQLite writes the whole batch durably in
about 5 ms): per member some twenty Python calls (key check, key parse, two snowflakes, the record check, its
timestamp checks, the encoder and its output checks). :func:`encode_member` does the same work for the record a bot
writes (ids as the key's text, canonical timestamps, roles a list of str, orjson's output needing no fix-up) with
a handful of calls, and returns ``None`` for *anything* else: the caller then runs the full rule
(:func:`storage.rules.member_rule`), which accepts or refuses it with its usual message.

So the fast path cannot change what the rule accepts or refuses, only how fast the usual case goes: it accepts a
subset of what the full rule accepts (every test here is at least as strict as the rule's), and produces the bytes
the rule would (the same ``orjson.dumps`` call with the same options and ``default``, kept only when the rule's
output checks would keep it unchanged). tests/test_member_fast.py compares both on random valid and invalid members.
"""

from __future__ import annotations

import re
from collections import deque
from datetime import datetime, timezone
from itertools import repeat
from operator import itemgetter
from typing import Any

import orjson

from .codec import _DUMPS_OPTS, _NEGATIVE_ZERO, _NULL, dumps_each
from .models import iso_utc

__all__ = ["encode_member", "encode_member_ids", "encode_member_columns", "encode_member_save", "encode_members",
           "encode_members_ids", "time_text"]

#: A members key whose two ids are canonical snowflakes below 2**63 (1-19 ASCII digits, no leading zero): such a
#: key also passes :func:`storage.codec.check_key` (short, ASCII, no NUL), so neither check needs running.
_MEMBER_KEY = re.compile(r"(?:0|[1-9][0-9]{0,18})_(?:0|[1-9][0-9]{0,18})\Z")
#: :data:`_MEMBER_KEY` of every line of a text (keys joined by newlines, one after the last): one regex run over a
#: batch's keys instead of one per key (1,000 keys: 0.13 against 0.21 ms). Where the ``re`` module has possessive
#: quantifiers (Python 3.11), the runs are possessive: the same language (a run is always followed by ``_`` or a
#: newline, never a digit, so giving a digit back could never let the pattern match), without the bookkeeping for
#: backtracking: 1,000 keys 0.110 -> 0.090 ms.
try:
    _MEMBER_KEYS = re.compile(r"(?:(?:0|[1-9][0-9]{0,18}+)_(?:0|[1-9][0-9]{0,18}+)\n)*+\Z")
except re.error:  # pragma: no cover - Python 3.10
    _MEMBER_KEYS = re.compile(r"(?:(?:0|[1-9][0-9]{0,18})_(?:0|[1-9][0-9]{0,18})\n)*\Z")
_UTC = timezone.utc
_from_iso = datetime.fromisoformat
_dumps = orjson.dumps
_PLUS, _DOT, _BACKSLASH = ord("+"), ord("."), ord("\\")
_get: Any = dict.get  # map(_get, docs, repeat(field)): one C-level pass per field
_first, _second, _third = itemgetter(0), itemgetter(1), itemgetter(2)
_NONE = type(None)
#: From this many members a batch is checked a field at a time over all of them (:func:`_all_usual`).
COLUMNS_FROM = 8


def time_text(value: Any) -> Any:
    """orjson's ``default`` hook of a rule that stores datetimes as text: the canonical UTC form message records
    use (:func:`storage.models.iso_utc`, a naive datetime taken as UTC), at any depth of the document."""
    if isinstance(value, datetime):
        return iso_utc(value, "datetime")
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _canonical(text: str) -> bool:
    """:func:`storage.models.is_canonical` for a ``str``, inlined here (it runs twice per member)."""
    n = len(text)
    if n == 20:
        if text[4:20:3] != "--T::Z":
            return False
    elif n != 27 or text[4:20:3] != "--T::." or text[26] != "Z" or text.endswith(".000000Z"):
        return False
    try:
        return _from_iso(text).tzinfo is _UTC
    except ValueError:
        return False


def encode_member(key: Any, doc: Any) -> bytes | None:
    """The stored bytes of member ``doc`` under ``key`` (any object) when both are of the usual shape, else None
    (which says nothing about validity: the full rule decides)."""
    if type(key) is not str or _MEMBER_KEY.match(key) is None:
        return None
    guild, _, user = key.partition("_")
    return encode_member_ids(guild, user, doc)


def encode_member_save(user_id: Any, guild_id: Any, doc: Any) -> tuple[str, bytes] | None:
    """``save_member_data``'s key and stored bytes when the ids are two ints in 0..2**64-1 (discord.py's, the usual
    call) and ``doc`` is of the usual shape; else None (then ``put`` and the full rule decide).

    Why: the usual save went ``member_key``, ``check_key``, the rule's key regex and ``partition`` before the
    document was looked at (about 0.8 us of a save that costs 10 us of Python with the fsync made free); two ints
    formatted here are canonical ids, so the key needs no check (:func:`storage.models.member_key` does the same)."""
    if type(user_id) is not int or type(guild_id) is not int or (user_id | guild_id) >> 64:
        return None
    user, guild = str(user_id), str(guild_id)
    if not _usual(guild, user, doc):
        return None
    try:  # _dump_one, inlined
        out = memoryview(_dumps(doc, time_text, _DUMPS_OPTS)).tobytes()
    except (orjson.JSONEncodeError, TypeError):
        return None
    return None if _needs_a_look(out) else (f"{guild}_{user}", out)


def encode_member_ids(guild: str, user: str, doc: Any) -> bytes | None:
    """:func:`encode_member` for the key ``f"{guild}_{user}"`` of two ids already canonical."""
    out = _encode_unchecked(guild, user, doc)
    return None if out is None or _needs_a_look(out) else out


def _encode_unchecked(guild: str, user: str, doc: Any) -> bytes | None:
    """:func:`encode_member_ids` before the output checks of :func:`_needs_a_look`."""
    return _dump_one(doc) if _usual(guild, user, doc) else None


def _dump_one(doc: Any) -> bytes | None:
    """The bytes the rule's encoder would start from (``encode_doc``'s ``dumps``), or None when it fails."""
    try:
        # dumps_kept: the exact-size copy (orjson's own result holds a 4 KiB buffer; see storage.codec)
        return memoryview(_dumps(doc, time_text, _DUMPS_OPTS)).tobytes()
    except (orjson.JSONEncodeError, TypeError):
        return None


def _usual(guild: str, user: str, doc: Any) -> bool:
    """Whether ``doc`` is a member of the usual shape under the ids ``guild`` and ``user`` (the fields the rule
    checks, each at least as strictly), before encoding.

    Written for speed (it runs for every member of a batch: 1,000 members spent 1.1 ms here): one ``get`` per
    field, and the usual timestamp's check inlined (the 20-character form: the separators in one slice, then
    ``fromisoformat`` for the digits and the calendar); other lengths go to :func:`_canonical`. A field that is
    ``None`` reads as absent here: it is written as ``null``, which :func:`_needs_a_look` then sends to the rule.
    """
    if type(doc) is not dict:
        return False
    get = doc.get
    value = get("user_id", user)  # absent: nothing to compare
    if value != user or type(value) is not str:
        return False
    value = get("guild_id", guild)
    if value != guild or type(value) is not str:
        return False
    value = get("join_date")
    if value is not None:
        if type(value) is not str:
            return False
        if len(value) == 20 and value[4:20:3] == "--T::Z":
            try:
                _from_iso(value)  # with those separators only digits parse, and "Z" is UTC: no tzinfo test
            except ValueError:
                return False
        elif not _canonical(value):
            return False
    value = get("roles")
    if value is not None:
        if type(value) is not list:
            return False
        try:
            "".join(value)  # takes nothing but str (and subclasses), checked in C
        except TypeError:
            return False
    value = get("preferences")
    if value is not None and type(value) is not dict:
        return False
    stats = get("statistics")
    if stats is not None:
        if type(stats) is not dict:
            return False
        value = stats.get("message_count", 0)
        if type(value) is not int or value < 0:
            return False
        value = stats.get("last_active")
        if value is not None:
            if type(value) is not str:
                return False
            if len(value) == 20 and value[4:20:3] == "--T::Z":
                try:
                    _from_iso(value)
                except ValueError:
                    return False
            elif not _canonical(value):
                return False
    return True


def _usual_time(value: str) -> bool:
    """:func:`_usual`'s test of one timestamp ``str``."""
    if len(value) == 20 and value[4:20:3] == "--T::Z":
        try:
            _from_iso(value)
        except ValueError:
            return False
        return True
    return _canonical(value)


def _all_usual(guilds: list[str], users: list[str], docs: list[Any]) -> bool:
    """Whether :func:`_usual` holds for every member (``guilds[i]``, ``users[i]``, ``docs[i]``), checked a field
    at a time over the whole batch: each test is a C-level pass (``map`` of ``dict.get``, a ``set`` of the types,
    a list comparison, ``fromisoformat`` over the column), never a Python call per member. False says only that
    *some* member may not be usual: the caller then asks :func:`_usual` of each, so what is taken stays exactly
    what :func:`_usual` takes (every test here is the same test, or a stricter one, on each member).

    Why: :func:`_usual` costs about 1.1 us a member (1.1 ms of a 1,000-member batch at 4.7 ms; SQLite writes the
    batch durably in 2.7 ms); a field at a time, about half that (benchmarks/README.md)."""
    if set(map(type, docs)) != {dict}:
        return False
    for field, own in (("user_id", users), ("guild_id", guilds)):
        values = list(map(_get, docs, repeat(field), own))  # absent: the key's own, nothing to compare
        if set(map(type, values)) != {str} or values != own:  # str == str: the != of _usual, negated
            return False
    if not _all_times(list(map(_get, docs, repeat("join_date")))):
        return False
    roles = _present(list(map(_get, docs, repeat("roles"))), list)
    if roles is None:
        return False
    try:
        deque(map("".join, roles), maxlen=0)  # takes nothing but str (and subclasses), checked in C
    except TypeError:
        return False
    if not set(map(type, map(_get, docs, repeat("preferences")))) <= {dict, _NONE}:
        return False
    stats = _present(list(map(_get, docs, repeat("statistics"))), dict)
    if stats is None:
        return False
    if stats:
        counts = list(map(_get, stats, repeat("message_count"), repeat(0)))
        if set(map(type, counts)) != {int} or min(counts) < 0:
            return False
        return _all_times(list(map(_get, stats, repeat("last_active"))))
    return True


def _present(values: list[Any], kind: type) -> list[Any] | None:
    """The values that are not None (absent or null: see :func:`_usual`), when each is exactly of type ``kind``;
    else None."""
    types = set(map(type, values))
    if types == {kind}:
        return values
    if not types <= {kind, _NONE}:
        return None
    return [value for value in values if value is not None]


def _all_times(values: list[Any]) -> bool:
    """:func:`_usual`'s timestamp test of each value (None: absent), the usual 20-character form a column at a
    time: one length and one separator each, then ``fromisoformat`` over all (digits and calendar)."""
    present = _present(values, str)
    if present is None:
        return False
    values = present
    if set(map(len, values)) == {20} and _separators_usual("".join(values), len(values)):
        try:
            deque(map(_from_iso, values), maxlen=0)
        except ValueError:
            return False
        return True
    return all(map(_usual_time, values))


def _separators_usual(text: str, n: int) -> bool:
    """Whether each of the ``n`` 20-character timestamps joined in ``text`` has the separators of
    ``YYYY-MM-DDTHH:MM:SSZ`` (``value[4:20:3] == "--T::Z"`` of each, as six slices of the whole: 1,000 values in
    about 20 us, against 90 us a slice per value)."""
    dash, colon = "-" * n, ":" * n
    return (text[4::20] == dash and text[7::20] == dash and text[10::20] == "T" * n and text[13::20] == colon
            and text[16::20] == colon and text[19::20] == "Z" * n)


def _member_ids(keys: list[Any]) -> list[str] | None:
    """``[guild, user, guild, user, ...]`` of the keys when every key is a ``str`` that :data:`_MEMBER_KEY`
    matches (checked with one regex run over them all), else None.

    The ids come from splitting the joined text, not from a ``partition`` per key: 1,000 3-tuples held at once
    exhausted the tuple free list and triggered the garbage collector (generation 1, which walks the caller's
    batch of documents: 0.36 ms each, one every few batches)."""
    if set(map(type, keys)) != {str}:
        return None
    text = "\n".join(keys)
    # a newline inside a key would let one key pass as two lines: each key must end exactly at its own newline
    if text.count("\n") != len(keys) - 1 or _MEMBER_KEYS.match(text + "\n") is None:
        return None
    return text.replace("_", "\n").split("\n")  # one "_" in each key (the regex): two ids each, in order


def _needs_a_look(out: bytes) -> bool:
    """Whether :func:`storage.codec.encode_doc` would walk the document or rewrite a number of the output ``out``
    (of one document or several joined): then the full rule decides. (``null`` with the compiled pattern: over a
    batch's 250 KB 97 us, against 145 us for ``b"null" in out``; the single bytes with a memchr, 2.4 us each.)"""
    return (_NULL.search(out) is not None or (out.find(_BACKSLASH) != -1 and b"\\u0000" in out) or out.find(_PLUS) != -1
            or (out.find(_DOT) != -1 and _NEGATIVE_ZERO.search(out) is not None))


def _batch_needs_a_look(whole: bytes) -> bool:
    """:func:`_needs_a_look` over a batch's whole output, its ``null`` found with ``rfind`` (same answer): over the
    250 KB of 1,000 members 65 us against 110 for the compiled pattern (CPython 3.11's reverse search skips further
    in this text; on one 250-byte output both take 0.2 us, so :func:`_needs_a_look` keeps the pattern)."""
    return (whole.rfind(b"null") != -1 or (whole.find(_BACKSLASH) != -1 and b"\\u0000" in whole)
            or whole.find(_PLUS) != -1 or (whole.find(_DOT) != -1 and _NEGATIVE_ZERO.search(whole) is not None))


def encode_members(pairs: list[Any]) -> list[bytes | None]:
    """:func:`encode_member` of each ``(key, doc)`` pair (anything else: None), the usual members encoded together
    (see :func:`_encode_usual`); a batch whose every member is usual is recognized a field at a time
    (:func:`_all_usual`)."""
    if len(pairs) >= COLUMNS_FROM and set(map(type, pairs)) == {tuple} and set(map(len, pairs)) == {2}:
        out = encode_member_columns(list(map(_first, pairs)), list(map(_second, pairs)))
        if out is not None:
            return out
    usual: list[bool] = []
    docs: list[Any] = []
    match = _MEMBER_KEY.match
    for pair in pairs:
        if type(pair) is tuple and len(pair) == 2:
            key, doc = pair
            if type(key) is str and match(key) is not None:
                guild, _, user = key.partition("_")
                if _usual(guild, user, doc):
                    usual.append(True)
                    docs.append(doc)
                    continue
        usual.append(False)
    return _encode_usual(usual, docs)


def encode_member_columns(keys: list[Any], docs: list[Any]) -> list[bytes | None] | None:
    """:func:`encode_members` of ``zip(keys, docs)`` when the whole batch is usual, checked a field at a time
    (:func:`_member_ids`, :func:`_all_usual`); else None, and :func:`encode_members` decides member by member.
    (``put_many`` of a mapping calls it with the mapping's keys and values: no pairs built.)"""
    ids = _member_ids(keys) if len(keys) >= COLUMNS_FROM else None
    if ids is None or not _all_usual(ids[0::2], ids[1::2], docs):
        return None
    return _encode_usual(None, docs)


def encode_members_ids(rows: list[tuple[str, str, Any]]) -> list[bytes | None]:
    """:func:`encode_members` of ``(guild, user, doc)`` rows whose ids are already canonical."""
    if len(rows) >= COLUMNS_FROM:
        column = list(map(_third, rows))
        if _all_usual(list(map(_first, rows)), list(map(_second, rows)), column):
            return _encode_usual(None, column)
    usual = [_usual(guild, user, doc) for guild, user, doc in rows]
    return _encode_usual(usual, [row[2] for row, ok in zip(rows, usual) if ok])


def _encode_usual(usual: list[bool] | None, docs: list[Any]) -> list[bytes | None]:
    """Per member (``usual[i]``: whether member ``i`` passed :func:`_usual`, None: every one did; ``docs``: the
    documents of those that did, in order) its bytes, or None.

    The usual documents are dumped with one ``orjson.dumps`` (:func:`storage.codec.dumps_each`: per document, the
    dumps and its exact-size copy were a third of the fast path), and the output checks of :func:`_needs_a_look`
    run once over that whole output (four searches of 250 bytes per document were a quarter of it: 1.4 ms per
    1,000 members, once over the batch about 0.1 ms); only when the batch has a hit is each output searched
    again. A pattern cannot span two outputs (each is a ``{...}`` object, the separator NUL bytes, and no pattern
    has a brace or a NUL). When the one dumps fails, each document is dumped alone (None where that fails)."""
    dumped = dumps_each(docs, _DUMPS_OPTS, time_text)
    outs: list[bytes | None]
    if dumped is not None:
        pieces, whole = dumped
        outs = list(pieces)
    else:
        outs = [_dump_one(doc) for doc in docs]
        whole = b"".join([out for out in outs if out is not None])
    if _batch_needs_a_look(whole):
        outs = [None if out is None or _needs_a_look(out) else out for out in outs]
    if usual is None or len(outs) == len(usual):
        return outs
    taken = iter(outs)
    return [next(taken) if ok else None for ok in usual]
