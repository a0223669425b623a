"""The JSON backend's byte prefilter (storage/backends/json/prefilter.py) never drops a document that matches.

The prefilter reads documents' JSON text, so these tests write that text in every way a reader may meet it: orjson's
own bytes, but also random JSON whitespace, ``\\uXXXX`` escapes, other spellings of the same number (``100``,
``1e2``, ``100.0``, ``1.0E2``), duplicate keys, and the same key names nested at other depths. For random filters,
every document that the exact predicate accepts must survive (necessary), and on plain text a selective condition
must actually filter (else it would be a no-op). Store-level agreement with the reference, on both backends, is in
tests/test_queries.py.
"""

from __future__ import annotations

import random
import re
from typing import Any

import orjson
import pytest

from storage.backends.json.prefilter import parse_number, prefilter, string_range
from storage.query.evaluate import compile_filter
from storage.query.plan import parse_query

KEYS = ["a", "b", "c", "d", "ñ", ",", "x:y", 'q"', "}", "日"]
PATHS = ["a", "b", "c.d", "a.b", "b.a.c", ",", "x:y", 'q"', "ñ", "c.日", "}"]
STRINGS = ["", "a", "ab", "b", "A", "é", "ü", "日本", "😀", "a b", "a,b", "x:y", "}", "]", '"', 'say "hi"',
           "back\\slash", "line\nbreak", "\u2028", "\x01", "a\"b", "2024-03-03", "2024-03-03T10:00", "2024-03-04"]
NUMBERS = [0, 1, -1, 2, 100, 1.0, 100.0, 2.5, -7.25, 0.1, 1e2, 1e16, 1e20, 1.5e-7, 2**53 + 1, 2**63, 2**64 - 1,
           -(2**63), 12345678901234567890]


def rand_scalar(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.45:
        return rng.choice(STRINGS)
    if r < 0.85:
        return rng.choice(NUMBERS)
    return rng.choice([True, False, None])


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.55 or depth > 3:
        return rand_scalar(rng)
    if r < 0.75:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): rand_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def rand_doc(rng: random.Random) -> dict[str, Any]:
    return {rng.choice(KEYS): rand_value(rng) for _ in range(rng.randint(0, 6))}


class Writer:
    """JSON text of a value, written as some other serializer (or a hand edit) might: whitespace, escapes, number
    spellings and duplicate keys chosen at random. ``loose=False`` writes orjson's bytes."""

    def __init__(self, rng: random.Random, loose: bool, spaces: tuple[str, ...] = ("", "", " ", "\n", "\t", "\r\n  ")
                 ) -> None:
        self.rng, self.loose, self.spaces = rng, loose, spaces

    def ws(self) -> str:
        return self.rng.choice(self.spaces) if self.loose else ""

    def number(self, v: int | float) -> str:
        if not self.loose:
            return orjson.dumps(v).decode()
        options = [orjson.dumps(v).decode(), repr(v)]
        if isinstance(v, int) or v.is_integer():
            whole = int(v)
            options += [f"{whole}.0", f"{whole}e0", f"{whole}.00E+0"]
            if whole and whole % 100 == 0:
                options.append(f"{whole // 100}e2")
        options.append(repr(float(v)).upper())
        return self.rng.choice(options)

    def string(self, s: str) -> str:
        out = []
        for ch in s:
            if ch in '"\\' or ord(ch) < 0x20:
                out.append(orjson.dumps(ch).decode()[1:-1])
            elif self.loose and self.rng.random() < 0.15:  # \uXXXX (a surrogate pair beyond the BMP)
                units = ch.encode("utf-16-be")
                out.append("".join(f"\\u{units[i:i + 2].hex()}" for i in range(0, len(units), 2)))
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    def write(self, v: Any) -> str:
        if v is None:
            return "null"
        if v is True or v is False:
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return self.number(v)
        if isinstance(v, str):
            return self.string(v)
        if isinstance(v, list):
            sep = self.ws() + "," + self.ws()
            return "[" + self.ws() + sep.join(self.write(e) for e in v) + self.ws() + "]"
        items = []
        for k, e in v.items():
            if self.loose and self.rng.random() < 0.1:  # a duplicate key: the last one is the value
                items.append(self.string(k) + self.ws() + ":" + self.ws() + self.write(rand_scalar(self.rng)))
            items.append(self.string(k) + self.ws() + ":" + self.ws() + self.write(e))
        sep = self.ws() + "," + self.ws()
        return "{" + self.ws() + sep.join(items) + self.ws() + "}"


def encoded(rng: random.Random, doc: dict[str, Any]) -> bytes:
    loose = rng.random() < 0.5
    raw = Writer(rng, loose).write(doc).encode()
    if not loose:
        assert raw == orjson.dumps(doc)
    return raw


def rand_where(rng: random.Random, seen: list[Any]) -> dict[str, Any]:
    where: dict[str, Any] = {}
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(PATHS)
        op = rng.choice(["lit", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains", "$exists"])
        value = rng.choice(seen) if seen and rng.random() < 0.7 else rand_value(rng)
        if op in ("$gt", "$gte", "$lt", "$lte"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                value = rng.choice(STRINGS + NUMBERS)
        elif op in ("$in", "$nin"):
            value = [rng.choice(seen) if seen else rand_scalar(rng) for _ in range(rng.randint(0, 3))]
        elif op == "$exists":
            value = rng.random() < 0.7
        elif op == "lit" and isinstance(value, dict) and not value:
            value = {"a": 1}
        cond = where.get(path)
        if op == "lit":
            where[path] = value
        elif isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            cond[op] = value
        else:
            where[path] = {op: value}
    return where


def scalars_in(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in scalars_in(v)] + [value]
    if isinstance(value, list):
        return [s for v in value for s in scalars_in(v)] + [value]
    return [value]


@pytest.mark.parametrize("seed", range(6))
def test_every_match_survives(seed: int):
    rng = random.Random(1700 + seed)
    docs = [rand_doc(rng) for _ in range(400)]
    raws = [encoded(rng, doc) for doc in docs]
    decoded = [orjson.loads(raw) for raw in raws]  # what the document is (duplicate keys: the last one)
    seen = [s for doc in decoded for s in scalars_in(doc) if not isinstance(s, dict) or s]
    filtered = 0
    for _ in range(250):
        query = parse_query(rand_where(rng, seen))
        filt = prefilter(query.conditions)
        if filt is None:
            continue
        predicate = compile_filter(query.conditions)
        start = rng.randrange(len(raws))
        chunk = raws[start:start + rng.choice([1, 7, 100, 400])]
        survivors, size = filt.survivors(chunk)
        assert size == sum(map(len, chunk))
        assert survivors == sorted(set(survivors))
        matching = [i for i, raw in enumerate(chunk) if predicate(orjson.loads(raw))]
        missed = set(matching) - set(survivors)
        assert not missed, (query.conditions, [chunk[i] for i in missed])
        filtered += len(chunk) - len(survivors)
    assert filtered > 0  # it does filter


def test_plain_text_is_filtered_exactly_for_unique_keys():
    """orjson's bytes, each key once per document: a string range, a string equality, a number range and a
    ``$exists`` let through exactly the matching documents (plus only documents with a backslash)."""
    rng = random.Random(1710)
    plain = [s for s in STRINGS if b"\\" not in orjson.dumps(s)]
    docs = []
    for i in range(600):
        doc: dict[str, Any] = {"n": rng.choice(NUMBERS), "s": rng.choice(plain), "t": rng.choice(STRINGS)}
        if i % 5:
            doc["x"] = {"y": rng.choice([1, "1", None, [1]])}
        docs.append(doc)
    raws = [orjson.dumps(d) for d in docs]
    for where in ({"s": {"$gte": "a", "$lt": "b"}}, {"s": {"$gt": "2024-03-03"}}, {"s": "日本"},
                  {"n": {"$gt": 1, "$lte": 2**63}}, {"n": {"$lt": 0}}, {"n": 100}, {"x": {"$exists": True}},
                  {"s": {"$in": ["a", "b", "😀"]}}, {"s": {"$lte": "é"}}, {"t": {"$contains": "a"}}):
        query = parse_query(where)
        filt = prefilter(query.conditions)
        assert filt is not None
        predicate = compile_filter(query.conditions)
        survivors, _ = filt.survivors(raws)
        exact = {i for i, d in enumerate(docs) if predicate(d)}
        escaped = {i for i, raw in enumerate(raws) if b"\\" in raw}
        assert exact <= set(survivors) <= exact | escaped, where
        assert len(survivors) < len(raws)  # each of these filters something


def test_conditions_without_a_text_test_give_no_prefilter():
    for where in ({"a": {"$ne": 1}}, {"a": {"$nin": [1]}}, {"a": {"$exists": False}}, None):
        assert prefilter(parse_query(where).conditions) is None
    assert prefilter(parse_query({"a": {"$in": []}}).conditions) is not None  # matches nothing: all filtered


def rand_text(rng: random.Random, alphabet: list[str], longest: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def test_string_range_pattern_is_exact():
    """The range pattern accepts exactly the contents ``low <= c < high`` (byte order, which is code point order
    for UTF-8), with NUL-extended bounds (``> v``, ``<= v``) and without an upper bound; it never matches a NUL
    (what separates the documents of a chunk)."""
    rng = random.Random(1720)
    alphabet = ["a", "b", "z", "A", "~", "\x7f", "\x01", " ", "é", "ÿ", "Ā", "日", "\uffff", "😀", "\U0010ffff"]
    bounds = [*alphabet, '"', "\\"]  # bytes that no plain string content holds (its text would escape them)
    for _ in range(2000):
        low = rand_text(rng, bounds, 4).encode()
        high = None if rng.random() < 0.25 else rand_text(rng, bounds, 4).encode()
        if rng.random() < 0.3:
            low += b"\x00"
        if high is not None and rng.random() < 0.3:
            high += b"\x00"
        rest = string_range(low, high)
        assert rest is None or b"\x00" not in rest  # no NUL in the pattern (its classes exclude it too)
        pattern = None if rest is None else re.compile(b'"' + rest)
        for _ in range(20):
            text = rand_text(rng, alphabet, 5).encode() if rng.random() < 0.6 else low + rand_text(
                rng, alphabet, 2).encode()
            if any(b in b'"\\\x00' for b in text):
                continue  # not a plain string's content (low's bytes may be such)
            expected = low <= text and (high is None or text < high)
            assert (pattern is not None and pattern.fullmatch(b'"' + text + b'"') is not None) == expected, \
                (low, high, text)


def test_long_string_bounds_give_a_weaker_but_necessary_range():
    rng = random.Random(1721)
    alphabet = ["a", "b", "é", "😀"]
    for _ in range(300):
        low = ("a" * 40 + rand_text(rng, alphabet, 30)).encode()
        high = ("a" * 40 + rand_text(rng, alphabet, 30)).encode()
        query = parse_query({"s": {"$gte": low.decode(), "$lt": high.decode()}})
        filt = prefilter(query.conditions)
        assert filt is not None
        values = [("a" * 40 + rand_text(rng, alphabet, 31)) for _ in range(30)] + [low.decode()]
        raws = [orjson.dumps({"s": v}) for v in values]
        survivors, _ = filt.survivors(raws)
        assert {i for i, v in enumerate(values) if low.decode() <= v < high.decode()} <= set(survivors)


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"-0", 0), (b"12", 12), (b"-12", -12), (b"1.5", 1.5), (b"1e2", 100.0), (b"1E+2", 100.0),
    (b"18446744073709551615", 2**64 - 1), (b"18446744073709551616", float(2**64)),
    (b"-9223372036854775808", -(2**63)), (b"-9223372036854775809", float(-(2**63) - 1)),
])
def test_numbers_parse_as_orjson_reads_them(text: bytes, value: Any):
    parsed = parse_number(text)
    assert parsed == value and type(parsed) is type(value)
    assert type(orjson.loads(text)) is type(value) and orjson.loads(text) == value


@pytest.mark.parametrize("doc, where", [
    ({"b": {"a": 5}, "a": 1}, {"a": 1}),  # the same key nested before the field: its number fails the check
    ({"b": {"a": 5}, "a": 1}, {"a": {"$lt": 2}}),
    ({"b": [{"a": "zz"}], "a": "m"}, {"a": {"$lt": "n"}}),
    ({"b": {"a": {"a": 3}}}, {"b.a.a": {"$gte": 3}}),
    ({"x": "\"a\":1", "a": 2}, {"a": {"$gt": 1}}),  # the key's text inside a string (escaped: survives anyway)
    ({"x": "a", ",": 7}, {",": {"$gt": 6}}),  # a key that begins like the text after a string: "a",",":7
    ({"x": ":", ":": 1}, {":": 1}),
    ({"k": [1, 2], "l": {"k": 9}}, {"l.k": 9}),
    ({"n": 1e20}, {"n": {"$gte": 1e19}}),  # written 1e+20
    ({"n": 2**64 - 1}, {"n": {"$gt": 2**63}}),
    ({"n": -(2**63)}, {"n": {"$lte": -(2**63)}}),
    ({"s": "日本語"}, {"s": {"$gt": "日本", "$lt": "日本語!"}}),
    ({"s": "😀"}, {"s": {"$gt": "\uffff"}}),  # above the BMP: 4 UTF-8 bytes, still ordered by code point
    ({"b": {"roles": ["x"]}, "roles": ["y", "role7"]}, {"roles": "role7"}),  # a list elsewhere without the value
    ({"x": ":", ":": ["m", "n"]}, {":": "n"}),  # a key whose occurrences may overlap: searched byte by byte
    ({"x": ":", ":": ["m", "n"]}, {":": {"$in": ["q", "n"]}}),
    ({"t": ["ab", "abc"]}, {"t": {"$contains": "abc"}}),
])
def test_a_false_occurrence_never_hides_the_field(doc: dict[str, Any], where: dict[str, Any]):
    query = parse_query(where)
    assert compile_filter(query.conditions)(doc)
    filt = prefilter(query.conditions)
    assert filt is not None
    for raw in (orjson.dumps(doc), orjson.dumps({"pad": 1, **doc})):
        assert 1 in filt.survivors([b'{"other":0}', raw, b'{"a":{"a":1}}'])[0], raw


def test_a_list_field_survives_only_with_the_string_it_is_asked_for():
    """``{"roles": "role7"}``: a document whose roles list does not hold ``"role7"`` is filtered out (the list
    alternative of the pattern needs the quoted string in the document), one that holds it survives."""
    rng = random.Random(1730)
    docs = [{"roles": [f"role{rng.randrange(40)}" for _ in range(rng.randint(0, 4))], "n": i} for i in range(500)]
    raws = [orjson.dumps(d) for d in docs]
    for where in ({"roles": "role7"}, {"roles": {"$in": ["role7", "role13"]}}, {"roles": {"$contains": "role7"}}):
        query = parse_query(where)
        filt = prefilter(query.conditions)
        assert filt is not None
        predicate = compile_filter(query.conditions)
        exact = {i for i, d in enumerate(docs) if predicate(d)}
        assert 0 < len(exact) < len(docs)
        assert set(filt.survivors(raws)[0]) == exact, where
