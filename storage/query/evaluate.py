"""The query rules of :mod:`storage.query.plan` in Python: filters compiled to closures and the result order.
(The JSON backend's scan skips most documents before decoding them: storage/backends/json/prefilter.py.)

Used by the JSON backend for every query (on its decoded documents) and by its indexes for their sort keys. The SQL
of the PostgreSQL backend implements the same rules; the property tests hold both to a third, independent
evaluator written in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .plan import Condition, Order

__all__ = ["MISSING", "Predicate", "resolve", "getter", "deep_equal", "token", "compile_filter",
           "sort_rank", "sort_pairs", "NUMBER", "STRING", "OTHER"]

Predicate = Callable[[dict[str, Any]], bool]
#: Sort groups: numbers, then strings, then everything else (see plan.py, "Ordering").
NUMBER, STRING, OTHER = 0, 1, 2


class _Missing:
    """What a path that finds nothing resolves to (distinct from a present ``null``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def getter(path: tuple[str, ...]) -> Callable[[Any], Any]:
    """``get(doc)``: the value at ``path``, descending through objects only, or :data:`MISSING`."""
    if len(path) == 1:
        (first,) = path

        def get1(doc: Any) -> Any:
            return doc.get(first, MISSING)
        return get1
    if len(path) == 2:
        first, second = path

        def get2(doc: Any) -> Any:
            inner = doc.get(first, MISSING)
            return inner.get(second, MISSING) if type(inner) is dict else MISSING
        return get2

    def get_n(doc: Any) -> Any:
        value = doc
        for segment in path:
            if type(value) is not dict:
                return MISSING
            value = value.get(segment, MISSING)
        return value
    return get_n


def resolve(doc: Any, path: tuple[str, ...]) -> Any:
    return getter(path)(doc)


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_number(value: Any) -> bool:
    t = type(value)
    return t is int or t is float


def deep_equal(a: Any, b: Any) -> bool:
    """JSON equality, strict: numbers by value (``1 == 1.0``), a bool never equals a number, objects regardless of
    key order, lists in order (what jsonb's ``=`` does)."""
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta is int or ta is float:
        return (tb is int or tb is float) and a == b
    if ta is str or a is None:
        return ta is tb and a == b
    if ta is list:
        return tb is list and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if ta is dict:
        return tb is dict and a.keys() == b.keys() and all(deep_equal(v, b[k]) for k, v in a.items())
    return False


def token(value: Any) -> tuple[int, Any] | None:
    """A hashable stand-in for a scalar that equal scalars share (``1`` and ``1.0``) and no other does (``True`` and
    ``1`` differ); None for a list or an object. Indexes and ``$in`` look values up by it."""
    t = type(value)
    if t is str:
        return (1, value)
    if t is int or t is float:
        return (0, value)
    if t is bool:
        return (2, value)
    if value is None:
        return (3, None)
    return None


def _element_tokens(values: Iterable[Any]) -> tuple[frozenset[tuple[int, Any]], list[Any]]:
    scalars, compound = set(), []
    for v in values:
        tok = token(v)
        if tok is None:
            compound.append(v)
        else:
            scalars.add(tok)
    return frozenset(scalars), compound


def _equals(value: Any) -> Callable[[Any], bool]:
    """``x`` equals ``value`` or is a list with an element that does (the ``$eq`` rule)."""
    t = type(value)
    if t is str:
        def eq_str(x: Any) -> bool:
            return x == value or (type(x) is list and value in x)  # a str equals only an equal str
        return eq_str
    tok = token(value)
    if tok is not None:
        def eq_scalar(x: Any) -> bool:
            tx = token(x)
            if tx is not None:
                return tx == tok
            return type(x) is list and any(token(e) == tok for e in x)
        return eq_scalar

    def eq_compound(x: Any) -> bool:
        return deep_equal(x, value) or (type(x) is list and any(deep_equal(e, value) for e in x))
    return eq_compound


def _in(values: list[Any]) -> Callable[[Any], bool]:
    scalars, compound = _element_tokens(values)

    def is_in(x: Any) -> bool:
        tx = token(x)
        if tx is not None:
            return tx in scalars
        if type(x) is list:
            for e in x:
                te = token(e)
                if te is not None:
                    if te in scalars:
                        return True
                elif any(deep_equal(e, v) for v in compound):
                    return True
        return any(deep_equal(x, v) for v in compound)
    return is_in


def _range(op: str, bound: Any) -> Callable[[Any], bool]:
    same_kind: Callable[[Any], bool] = _is_str if type(bound) is str else _is_number
    if op == "$gt":
        return lambda x: same_kind(x) and x > bound
    if op == "$gte":
        return lambda x: same_kind(x) and x >= bound
    if op == "$lt":
        return lambda x: same_kind(x) and x < bound
    return lambda x: same_kind(x) and x <= bound


def _contains(value: Any) -> Callable[[Any], bool]:
    """A substring of a string field (for a str ``value``), or an element of a list field."""
    if type(value) is str:
        def contains_str(x: Any) -> bool:
            t = type(x)
            return (t is str or t is list) and value in x  # in a list, a str equals only an equal str
        return contains_str
    tok = token(value)
    if tok is not None:
        def contains_scalar(x: Any) -> bool:
            return type(x) is list and any(token(e) == tok for e in x)
        return contains_scalar

    def contains_compound(x: Any) -> bool:
        return type(x) is list and any(deep_equal(e, value) for e in x)
    return contains_compound


def value_test(op: str, value: Any) -> Callable[[Any], bool]:
    """The test one operator applies to the resolved field (``MISSING`` when absent)."""
    if op == "$eq":
        return _equals(value)
    if op == "$ne":
        eq = _equals(value)
        return lambda x: not eq(x)
    if op == "$in":
        is_in = _in(value)
        return is_in
    if op == "$nin":
        is_in = _in(value)
        return lambda x: not is_in(x)
    if op == "$contains":
        return _contains(value)
    if op == "$exists":
        return (lambda x: x is not MISSING) if value else (lambda x: x is MISSING)
    return _range(op, value)


def compile_filter(conditions: Iterable[Condition]) -> Predicate:
    """One predicate over a decoded document that holds when every condition does."""
    tests = [(getter(c.path), value_test(c.op, c.value)) for c in conditions]
    if not tests:
        return lambda doc: True
    if len(tests) == 1:
        (get, test), = tests
        return lambda doc: test(get(doc))

    def all_hold(doc: dict[str, Any]) -> bool:
        for get, test in tests:
            if not test(get(doc)):
                return False
        return True
    return all_hold


def sort_rank(value: Any) -> int:
    """The sort group of a value: :data:`NUMBER`, :data:`STRING` or :data:`OTHER`."""
    t = type(value)
    if t is int or t is float:
        return NUMBER
    if t is str:
        return STRING
    return OTHER


def sort_pairs(pairs: list[tuple[str, Any]], order: Order | None) -> list[tuple[str, Any]]:
    """``(key, doc)`` pairs in the query order (see plan.py, "Ordering"); by key without an order. Sorts a new
    list; ``pairs`` may be in any order."""
    if order is None:
        return sorted(pairs, key=lambda pair: pair[0])
    get = getter(order.path)
    groups: tuple[list[tuple[Any, str, Any]], ...] = ([], [], [])
    for key, doc in pairs:
        value = get(doc)
        groups[sort_rank(value)].append((value, key, doc))
    out: list[tuple[str, Any]] = []
    for rank, group in enumerate(groups):
        group.sort(key=lambda item: item[1])  # key ascending: kept for ties by the stable sorts below
        if rank != OTHER:
            group.sort(key=lambda item: item[0], reverse=order.descending)
        out.extend((key, doc) for _value, key, doc in group)
    return out
