"""What a query means: the filter language of ``find`` / ``count`` / ``delete_many``, checked into a :class:`Query`.

Both backends answer every query identically; these are the rules they implement (Python:
:mod:`storage.query.evaluate`; SQL: ``storage/backends/postgres/query.py``).

Paths
    A field is named by a dotted path, ``"statistics.message_count"``: a non-empty string of non-empty segments,
    without NUL characters, not starting with ``$``. A path descends through objects only: a segment applied to a
    list, a string, a number... finds nothing (``"roles.0"`` is *not* the first role), so the field is *missing*.
    A field that is present with the value ``null`` is not missing.

Types
    Values are typed strictly, the same way on both backends: numbers (``int`` and ``float``; ``1 == 1.0``), strings,
    booleans (``True`` is *not* the number ``1``), ``null``, lists, objects. Numbers compare with numbers, strings
    with strings (by code point, Python's ``str`` order, which is PostgreSQL's ``COLLATE "C"``); nothing else is
    ordered.

Conditions (``where`` maps paths to conditions; all of them must hold)
    ``{path: value}`` is ``{path: {"$eq": value}}``. A dict value whose keys all start with ``$`` is a dict of
    operators, all of which must hold; a dict without ``$`` keys is a value (object equality); mixing both is an
    error. The operators:

    ``$eq v``
        The field equals ``v``, or the field is a list one of whose elements equals ``v``. Equality is deep and
        strict: objects are equal when they have the same keys with equal values (key order does not matter),
        lists when they have equal elements in the same order, numbers by value, and a boolean never equals a
        number. So ``{"roles": "mod"}`` matches ``"roles": ["mod", "x"]`` and ``"roles": "mod"``;
        ``{"roles": ["mod"]}`` matches ``"roles": ["mod"]`` and ``"roles": [["mod"], 1]``. Only one level of list is
        looked into. ``{"x": None}`` matches a present ``null`` (or a list holding ``null``), *not* a missing field:
        ask for that with ``{"$exists": False}``.
    ``$ne v``
        Exactly the documents ``$eq v`` does not match; so a missing field matches ``$ne`` (as in MongoDB).
    ``$in [v, ...]`` / ``$nin [v, ...]``
        ``$eq`` any of the values / exactly the documents ``$in`` does not match (a missing field matches
        ``$nin``). ``$in []`` matches nothing, ``$nin []`` everything.
    ``$gt $gte $lt $lte v``
        ``v`` must be a number or a string. The field must be of the same kind (a number for a number, a string
        for a string) and compare as asked. A missing field, ``null``, a boolean, a list (ranges do not look into
        lists) or a value of the other kind never matches.
    ``$contains v``
        On a string field with a string ``v``: ``v`` is a substring (case-sensitive; ``""`` is in every string).
        On a list field: an element equals ``v`` (deep, strict). Anything else never matches (a number field does
        not "contain" itself).
    ``$exists b``
        ``b`` must be a bool: the path finds a value (``null`` included), or it does not.

Ordering (``order_by``)
    ``order_by="path"`` ascending, ``"-path"`` descending. Numbers come first (by value), then strings (by code
    point), then every other document (field missing, ``null``, boolean, list or object), in that group order
    *whatever the direction*: descending reverses the order within numbers and within strings only. Ties (equal
    values, ``1`` and ``1.0`` included, and the whole last group) are broken by key ascending, in both directions.
    Without ``order_by`` results come in key order (as ``items()``). ``offset`` then ``limit`` apply after ordering.

``prefix`` keeps the documents whose key starts with it (as ``items(prefix=...)``).

Refused before anything is read or written, with :class:`storage.ValidationError` naming the field: a ``where`` that
is not a dict, a bad path, an unknown operator, an operand of the wrong type (``$gt`` with a list, a dict, a
boolean or ``null``; ``$in`` with a non-list; ``$exists`` with a non-bool), an operand that is not plain JSON
(NaN, a ``datetime``, an int beyond 64 bits), an ``order_by`` that is not a string path, a ``limit`` / ``offset``
that is not a non-negative int (below 2**62), a ``prefix`` that is not a str; strings (operands, prefixes, keys of
object operands) with NUL characters or lone surrogates, which no stored document can hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..codec import shown
from ..errors import ValidationError

__all__ = ["OPERATORS", "RANGE_OPS", "Condition", "Order", "Query", "check_path", "parse_query", "check_value"]

#: Every operator a condition may use.
OPERATORS = frozenset(("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains", "$exists"))
RANGE_OPS = frozenset(("$gt", "$gte", "$lt", "$lte"))
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_MAX_PATH = 512
_MAX_DEPTH = 64
_WINDOW_MAX = 2**62  # offset + limit still fits PostgreSQL's bigint


@dataclass(frozen=True)
class Condition:
    """One checked condition: ``path`` (its segments), ``op`` (one of :data:`OPERATORS`) and its operand
    (a list for ``$in`` / ``$nin``)."""

    path: tuple[str, ...]
    op: str
    value: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Order:
    path: tuple[str, ...]
    descending: bool

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Query:
    """A checked query: the conditions (ANDed), the key prefix, the order and the window."""

    conditions: tuple[Condition, ...] = ()
    prefix: str | None = None
    order: Order | None = None
    limit: int | None = None
    offset: int = 0

    @property
    def unfiltered(self) -> bool:
        """No condition and no prefix: every document of the collection."""
        return not self.conditions and self.prefix is None


def check_path(path: object, field: str = "path") -> tuple[str, ...]:
    """A dotted path's segments, or :class:`ValidationError` naming ``field``."""
    if not isinstance(path, str):
        raise ValidationError(f"{field}: a field path must be a str, got {type(path).__name__}", field=field)
    if not path or len(path) > _MAX_PATH:
        raise ValidationError(f"{field}: a field path must be 1-{_MAX_PATH} characters, got {len(path)}",
                              field=field)
    if path.startswith("$"):
        raise ValidationError(f"{field}: unknown top-level operator {path!r} (conditions are ANDed; operators go "
                              "inside a field's condition, e.g. {\"count\": {\"$gt\": 1}})", field=field)
    if "\x00" in path:
        raise ValidationError(f"{field}: a field path must not contain NUL characters", field=field)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{field}: a field path must be valid Unicode", field=field) from None
    segments = tuple(path.split("."))
    if any(not s for s in segments):
        raise ValidationError(f"{field}: empty segment in field path {path!r}", field=field)
    return segments


def _check_text(text: str, field: str, what: str = "strings") -> str:
    """No NUL (PostgreSQL's jsonb cannot hold one, so no stored string has one) and valid Unicode."""
    if "\x00" in text:
        raise ValidationError(f"{field}: {what} must not contain NUL characters", field=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{field}: {what} must be valid Unicode (no lone surrogates)", field=field) from None
    return text


def check_value(value: Any, field: str, depth: int = 0) -> Any:
    """``value`` as plain JSON (tuples become lists), or :class:`ValidationError`: what a filter may compare with."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _check_text(str(value), field)
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValidationError(f"{field}: integer {value} does not fit in 64 bits", field=field)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{field}: {value} is not a JSON number", field=field)
        return float(value)
    if depth > _MAX_DEPTH:
        raise ValidationError(f"{field}: the value is nested too deep", field=field)
    if isinstance(value, (list, tuple)):
        return [check_value(v, field, depth + 1) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValidationError(f"{field}: object keys must be str, got {shown(k)}", field=field)
            out[_check_text(str(k), field, "keys")] = check_value(v, field, depth + 1)
        return out
    raise ValidationError(f"{field}: {type(value).__name__} is not a JSON value ({shown(value)}); a datetime must "
                          "be given as the ISO string it is stored as", field=field)


def _operand(op: str, value: Any, field: str) -> Any:
    if op not in OPERATORS:
        raise ValidationError(f"{field}: unknown operator {op!r} (known: {', '.join(sorted(OPERATORS))})",
                              field=field)
    if op in RANGE_OPS:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValidationError(f"{field}: {op} needs a number or a string, got {type(value).__name__}",
                                  field=field)
        return check_value(value, field)
    if op in ("$in", "$nin"):
        if not isinstance(value, (list, tuple)):
            raise ValidationError(f"{field}: {op} needs a list of values, got {type(value).__name__}", field=field)
        return check_value(list(value), field)
    if op == "$exists":
        if not isinstance(value, bool):
            raise ValidationError(f"{field}: $exists needs True or False, got {type(value).__name__}", field=field)
        return value
    return check_value(value, field)


def _conditions(where: Any) -> tuple[Condition, ...]:
    if where is None:
        return ()
    if not isinstance(where, Mapping):
        raise ValidationError(f"where must be a dict of field paths to conditions, got {type(where).__name__}",
                              field="where")
    out: list[Condition] = []
    for raw_path, spec in where.items():
        path = check_path(raw_path, field=raw_path if isinstance(raw_path, str) else "where")
        field = ".".join(path)
        if isinstance(spec, Mapping) and spec and any(isinstance(k, str) and k.startswith("$") for k in spec):
            if not all(isinstance(k, str) and k.startswith("$") for k in spec):
                raise ValidationError(f"{field}: a condition mixes operators and fields ({sorted(map(str, spec))}); "
                                      "compare with an object through {\"$eq\": {...}}", field=field)
            for op, value in spec.items():
                out.append(Condition(path, op, _operand(op, value, field)))
        else:
            out.append(Condition(path, "$eq", check_value(spec, field)))
    return tuple(out)


def parse_query(where: Any = None, *, prefix: Any = None, order_by: Any = None, limit: Any = None,
                offset: Any = 0) -> Query:
    """Check every argument of a query (raising :class:`ValidationError` before anything is touched)."""
    conditions = _conditions(where)
    if prefix is not None:
        if not isinstance(prefix, str):
            raise ValidationError("prefix must be a str", field="prefix")
        _check_text(prefix, "prefix", "a prefix")
    order = None
    if order_by is not None:
        if not isinstance(order_by, str):
            raise ValidationError(f"order_by must be a str field path (\"-path\" for descending), got "
                                  f"{type(order_by).__name__}", field="order_by")
        descending = order_by.startswith("-")
        order = Order(check_path(order_by[1:] if descending else order_by, field="order_by"), descending)
    for name, value in (("limit", limit), ("offset", offset)):
        if value is None and name == "limit":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _WINDOW_MAX:
            raise ValidationError(f"{name} must be a non-negative int (below 2**62), got {shown(value)}",
                                  field=name)
    return Query(conditions, prefix or None, order, limit, offset)
