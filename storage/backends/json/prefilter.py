"""A byte-level prefilter for scans: which documents *may* match a filter, found in their JSON text without decoding.

An unindexed query over 100k members cannot afford to decode every document (``orjson.loads`` of each costs more
than the whole query may take: benchmarks/bench_queries.py prints that floor). This module finds the few that can
match in the documents' text, many at a time, and only those are decoded and checked by the exact predicate
(:func:`storage.query.evaluate.compile_filter`). So it only has to be **necessary**: every document that matches
must survive; a document that survives and does not match costs a decode, nothing else.

How
    A chunk of encoded documents is joined into one buffer (NUL between them) and each condition that can be told
    from the text becomes one compiled regular expression, searched over the whole buffer in C; a match's position
    says which document it is in (a bisection of the documents' starts). One search per chunk, not per document:
    a call per document cost more than the search itself (about 2.5x here).
    Per condition, the pattern is the field's last key, ``"key"`` then ``:`` (JSON whitespace allowed around it:
    the bytes need not be orjson's), followed by what the value must look like:

    * a string range: the string itself, as a regular expression that matches exactly the byte strings in the
      range (:func:`string_range`; UTF-8 byte order is code point order, the order of the rules in plan.py);
    * a number range or a number equality: the number's text, parsed and compared in Python (one match per
      candidate occurrence; a number may be spelled ``1``, ``1.0`` or ``1e0``);
    * equality with a string / ``true`` / ``false`` / ``null``: that text, or ``[`` (a list may hold it: then,
      for strings, the document must hold the string quoted somewhere, ``"role7"``, as an element is written);
      with a list or an object: ``[`` (or ``{``); ``$in``: any of its values';
    * ``$contains``: a string holding the substring, or ``[`` (and the string quoted); ``$exists: true``: the key.

    ``$ne``, ``$nin`` and ``$exists: false`` match documents that lack the field, so they prefilter nothing.

Why this is necessary (never drops a match)
    A field that a path finds is the value of its last key in some object of the document, so the text holds that
    key, a colon, and the value's text; the pattern accepts every text of a value that can satisfy the condition.
    A match elsewhere (the same key name at another depth, or inside a string) is only a false candidate. A
    number whose check fails is searched again from the next byte, so a false candidate never hides a real one.
    Escapes are the one thing the patterns do not read: **a document whose text holds a backslash always
    survives** (orjson writes a string as its UTF-8 bytes and escapes only ``"``, ``\\`` and control characters,
    so this is rare). Numbers are parsed as ``orjson.loads`` reads them: an integer beyond 64 bits is a float.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from typing import Any

import orjson

from ...query.plan import RANGE_OPS, Condition

__all__ = ["Prefilter", "prefilter", "string_range", "parse_number"]

_WS = rb"[ \t\n\r]*"
#: A JSON number (strict: what matches always parses).
_NUMBER = rb"(?P<num>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
#: A list value (it may hold what is asked for): the group tells a match through a list from a match by the value.
_LIST = rb"(?P<lst>\[)"
#: Bytes no plain (unescaped) string content holds; a document that escapes them always survives anyway.
_NOT_CONTENT = frozenset(b'"\\\x00')
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_BACKSLASH = ord("\\")
#: Bytes of a string bound a range pattern spells out (the pattern nests one group per byte); longer bounds are
#: cut to a weaker range, still necessary.
_MAX_BOUND = 32

Check = Callable[[Any], bool]


def parse_number(text: bytes) -> int | float:
    """The number ``orjson.loads`` reads from ``text`` (a JSON number): an int within 64 bits, else a float."""
    if text.isdigit() or (text[:1] == b"-" and text[1:].isdigit()):
        value = int(text)
        if _INT_MIN <= value <= _INT_MAX:
            return value
    return float(text)


def _byte_class(values: Iterable[int]) -> bytes | None:
    """A regex character class of the given byte values (ranges merged), or None when there are none."""
    wanted = sorted(set(values) - _NOT_CONTENT)
    if not wanted:
        return None
    parts, start, prev = [], wanted[0], wanted[0]
    for b in [*wanted[1:], -1]:
        if b == prev + 1:
            prev = b
            continue
        parts.append(b"\\x%02x" % start if start == prev else b"\\x%02x-\\x%02x" % (start, prev))
        start = prev = b
    return b"[" + b"".join(parts) + b"]"


_CONTENT = rb'[^"\\\x00]*"'  # the rest of a string, up to its closing quote


def _alternatives(options: list[bytes]) -> bytes | None:
    return None if not options else options[0] if len(options) == 1 else b"(?:" + b"|".join(options) + b")"


def _at_least(low: bytes) -> bytes | None:
    """Pattern of the rest of a string (through its closing quote) whose content is ``>= low``."""
    if not low:
        return _CONTENT
    options = []
    above = _byte_class(range(low[0] + 1, 256))
    if above is not None:
        options.append(above + _CONTENT)
    same = _at_least(low[1:]) if low[0] not in _NOT_CONTENT else None  # (no content byte equals those)
    if same is not None:
        options.append(re.escape(low[:1]) + same)
    return _alternatives(options)


def _below(high: bytes) -> bytes | None:
    """Pattern of the rest of a string (through its closing quote) whose content is ``< high``."""
    if not high:
        return None  # nothing is below the empty string
    options = [b'"']  # the empty rest: a proper prefix of high
    under = _byte_class(range(1, high[0]))
    if under is not None:
        options.append(under + _CONTENT)
    same = _below(high[1:]) if high[0] not in _NOT_CONTENT else None
    if same is not None:
        options.append(re.escape(high[:1]) + same)
    return _alternatives(options)


def string_range(low: bytes, high: bytes | None) -> bytes | None:
    """A pattern of a string's content and closing quote that matches exactly the contents ``c`` (bytes without
    ``"``, ``\\`` or NUL) with ``low <= c < high`` (no upper bound when ``high`` is None); None when no content
    can. Built by walking the bounds' common prefix, then branching on the first byte where they differ."""
    if high is None:
        return _at_least(low)
    if high <= low:
        return None
    common = 0
    while common < len(low) and low[common] == high[common]:
        common += 1
    if any(b in _NOT_CONTENT for b in low[:common]):
        return None  # every content in the range would hold a byte that no content holds
    head = re.escape(low[:common])
    if common == len(low):  # low is a proper prefix of high: anything below high's rest
        rest = _below(high[common:])
        return None if rest is None else head + rest
    options = []
    first = _at_least(low[common + 1:]) if low[common] not in _NOT_CONTENT else None
    if first is not None:
        options.append(re.escape(low[common:common + 1]) + first)
    between = _byte_class(range(low[common] + 1, high[common]))
    if between is not None:
        options.append(between + _CONTENT)
    last = _below(high[common + 1:]) if high[common] not in _NOT_CONTENT else None
    if last is not None:
        options.append(re.escape(high[common:common + 1]) + last)
    rest = _alternatives(options)
    return None if rest is None else head + rest


def _key(path: tuple[str, ...]) -> bytes:
    return re.escape(orjson.dumps(path[-1])) + _WS + b":" + _WS


def _string_bounds(conds: list[Condition]) -> tuple[bytes, bytes | None]:
    """The string ranges on one path as ``low <= c < high`` over UTF-8 bytes (``> v`` is ``>= v + NUL``: no
    string lies between; ``<= v`` is ``< v + NUL``)."""
    low, high = b"", None
    for c in conds:
        bound = c.value.encode()
        if c.op in ("$gt", "$gte"):
            low = max(low, bound + b"\x00" if c.op == "$gt" else bound)
        else:
            top = bound + b"\x00" if c.op == "$lte" else bound
            high = top if high is None else min(high, top)
    if len(low) > _MAX_BOUND:  # a weaker range (any c >= low is >= its prefix): the pattern stays small
        low = low[:_MAX_BOUND]
    if high is not None and len(high) > _MAX_BOUND:  # c < high => c < high[:n] + 0xff (no UTF-8 byte is 0xff)
        high = high[:_MAX_BOUND] + b"\xff"
    return low, high


def _number_check(conds: list[Condition]) -> Check:
    checks = [(c.op, c.value) for c in conds]

    def in_range(x: Any) -> bool:
        for op, v in checks:
            if not (x > v if op == "$gt" else x >= v if op == "$gte" else x < v if op == "$lt" else x <= v):
                return False
        return True
    return in_range


def _equal_options(values: list[Any]) -> tuple[list[bytes], set[Any]]:
    """The value texts (after the key) that may hold one of ``values`` as ``$eq`` means it, and the numbers among
    them (checked after parsing)."""
    options, numbers = [_LIST], set()  # a list may hold any of them
    for v in values:
        t = type(v)
        if t is str:
            options.append(b'"' + re.escape(v.encode()) + b'"')
        elif t is bool:
            options.append(b"true" if v else b"false")
        elif v is None:
            options.append(b"null")
        elif t is int or t is float:
            numbers.add(v)
        elif t is dict:
            options.append(rb"\{")
    return options, numbers


def _quoted(values: list[Any]) -> tuple[bytes, ...] | None:
    """What a document whose field is a list holding one of ``values`` (strings) contains: one of them, quoted
    (an element is written as its bytes). None when a value is not a string (a number has many spellings)."""
    if not all(type(v) is str for v in values):
        return None
    return tuple(b'"' + v.encode() + b'"' for v in values)


class _Test:
    """One condition's pattern; ``check`` (if any) is applied to the number its group ``num`` captured, and a match
    through a list (group ``lst``) counts only if the document holds one of ``needles`` (when there are some).

    ``overlaps``: whether a match might start at a string's *closing* quote and so run over the opening quote of
    a real occurrence (which one non-overlapping pass would then skip, were that match rejected): only for a key
    whose first character can follow a closing quote (JSON whitespace, ``:``, ``,``, ``}``, ``]``). Such keys
    take the byte-by-byte search, a conservative choice: no valid document where it matters was found."""

    __slots__ = ("check", "needles", "overlaps", "pattern")

    def __init__(self, pattern: bytes | None, check: Check | None = None, needles: tuple[bytes, ...] | None = None,
                 key: str = "") -> None:
        self.pattern = None if pattern is None else re.compile(pattern)
        self.check, self.needles = check, needles
        self.overlaps = key[:1] in (" ", "\t", "\n", "\r", ":", ",", "}", "]")


def _tests(conditions: Sequence[Condition]) -> list[_Test]:
    tests: list[_Test] = []
    ranges: dict[tuple[tuple[str, ...], bool], list[Condition]] = {}
    for c in conditions:
        key = _key(c.path)
        op, v = c.op, c.value
        if op in RANGE_OPS:
            ranges.setdefault((c.path, type(v) is str), []).append(c)
        elif op == "$in" and not v:
            tests.append(_Test(None))  # $in []: nothing matches
        elif op in ("$eq", "$in"):
            values = [v] if op == "$eq" else v
            options, numbers = _equal_options(values)
            if numbers:
                options.insert(0, _NUMBER)
            tests.append(_Test(key + _alternatives(options),  # type: ignore[operator]
                               numbers.__contains__ if numbers else None, _quoted(values), c.path[-1]))
        elif op == "$contains":
            if type(v) is str:
                tests.append(_Test(key + rb'(?:"[^"\\\x00]*' + re.escape(v.encode()) + rb"|" + _LIST + b")",
                                   None, _quoted([v]), c.path[-1]))
            else:
                tests.append(_Test(key + rb"\["))
        elif op == "$exists" and v:
            tests.append(_Test(key))
    for (path, is_str), conds in ranges.items():
        key = _key(path)
        if is_str:
            low, high = _string_bounds(conds)
            rest = string_range(low, high)
            tests.append(_Test(None if rest is None else key + b'"' + rest))
        else:
            tests.append(_Test(key + _NUMBER, _number_check(conds)))
    return tests


class Prefilter:
    """The documents of a chunk that may match (see the module doc)."""

    def __init__(self, tests: list[_Test]) -> None:
        self._tests = tests

    def survivors(self, raws: Sequence[bytes]) -> tuple[list[int], int]:
        """Indexes (ascending) of the documents in ``raws`` that may match (every one that does is among them),
        and the bytes searched."""
        if not raws:
            return [], 0
        # NUL between documents: no JSON text holds one and no pattern matches one, so every match lies within one
        # document (none runs on into the next and hides its occurrence). starts[i]: where raws[i] begins.
        buf = b"\x00".join(raws)
        starts = list(accumulate(map((1).__add__, map(len, raws)), initial=0))
        found: set[int] | None = None
        for test in self._tests:
            hits: set[int] = set()
            if test.pattern is not None:
                _search(buf, starts, test, hits, found)
            found = hits if found is None else found & hits
            if not found:
                break
        assert found is not None  # at least one test (prefilter() makes none without)
        escaped = buf.find(_BACKSLASH)
        while escaped != -1:  # the patterns do not read escapes: such a document always survives
            doc = bisect_right(starts, escaped) - 1
            found.add(doc)
            escaped = buf.find(_BACKSLASH, starts[doc + 1])
        return sorted(found), len(buf) + 1 - len(raws)


def _holds(buf: bytes, start: int, end: int, needles: tuple[bytes, ...]) -> bool:
    return any(buf.find(needle, start, end) != -1 for needle in needles)


def _search(buf: bytes, starts: list[int], test: _Test, hits: set[int], among: set[int] | None) -> None:
    """Add to ``hits`` every document (among ``among``, when given) with an occurrence that ``test`` accepts."""
    pattern, check, needles = test.pattern, test.check, test.needles
    assert pattern is not None
    if check is None and needles is None:  # every match is a hit: one pass in C, a bisection per match
        found = {bisect_right(starts, m.start()) - 1 for m in pattern.finditer(buf)}
        hits.update(found if among is None else found & among)
        return
    if check is None and not test.overlaps and needles is not None:  # one pass; a list needs a needle
        for m in pattern.finditer(buf):
            doc = bisect_right(starts, m.start()) - 1
            if m.lastgroup != "lst" or _holds(buf, starts[doc], starts[doc + 1], needles):
                hits.add(doc)
        if among is not None:
            hits &= among
        return
    # A number to check (or a key whose occurrences may overlap): after a hit the search resumes at the next
    # document, after a rejected occurrence at the next byte (a false occurrence must not hide a real one).
    search = pattern.search
    end = len(buf)
    pos = 0
    while pos < end:
        found_at = search(buf, pos)
        if found_at is None:
            return
        m = found_at
        at = m.start()
        doc = bisect_right(starts, at) - 1
        if among is not None and doc not in among:
            pos = starts[doc + 1]
            continue
        group = m.lastgroup
        if (group == "num" and check is not None and not check(parse_number(m.group("num")))) or \
                (group == "lst" and needles is not None and not _holds(buf, starts[doc], starts[doc + 1], needles)):
            pos = at + 1
            continue
        hits.add(doc)
        pos = starts[doc + 1]


def prefilter(conditions: Sequence[Condition]) -> Prefilter | None:
    """The prefilter of ``conditions`` (ANDed), or None when none of them can be told from the text (then every
    document must be decoded)."""
    tests = _tests(conditions)
    return Prefilter(tests) if tests else None
