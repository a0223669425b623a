"""Turning documents into bytes and back, with the checks that keep both backends identical.

orjson is fast but lenient where we must be strict: it writes NaN and Infinity as ``null`` and serializes datetimes,
which would silently change data between a write and the next read. PostgreSQL's jsonb rejects ``\\u0000`` in
strings. So a document is accepted only if it round-trips exactly on every backend: a ``dict`` with ``str`` keys,
values of ``dict``/``list``/``tuple``/``str``/``int`` (64-bit)/finite ``float``/``bool``/``None``, no NUL characters.
The fast path is one ``orjson.dumps``; a slower walk runs only when the output could hide a problem.

Depth
    orjson serializes at most :data:`MAX_DEPTH` nested containers (the document itself counts as one); a deeper
    document raises :class:`ValidationError` naming that limit, on every write call and both backends, and nothing
    is written. (The checks here walk at most that deep, so no document makes them hit Python's recursion limit.)

Numbers in their canonical form
    PostgreSQL's jsonb keeps a number's decimal value, not its spelling: orjson writes a float of 1e16 or more as
    ``1e+16``, which jsonb gives back as the integer ``10000000000000000``, and ``-0.0`` comes back as ``0.0``. So
    that a document reads back the same on both backends (and a copy between them verifies), such numbers are put
    in that form when written, on every backend: ``-0.0`` becomes ``0.0``, and a float with an integral value of
    magnitude 1e16 or more becomes the equal ``int`` when it is in the 64-bit range (-2**63 to 2**64-1) that ints
    are read back in; beyond it, it stays a float, which is also what jsonb's digits read back as. Every other
    number round-trips unchanged. :func:`canonical_numbers` and :func:`dumps_canonical` apply the same rule to
    values read back, for digests that compare stores.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable
from typing import Any

import orjson

from .errors import CorruptDataError, ValidationError

__all__ = ["encode_doc", "decode_doc", "dumps_kept", "dumps_each", "dumps_canonical", "canonical_numbers",
           "check_collection", "check_key", "shown", "MAX_KEY_LENGTH", "MAX_DEPTH", "OWN_COLLECTIONS"]

MAX_KEY_LENGTH = 512
_COLLECTION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DUMPS_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_OWN_COLLECTIONS = frozenset(("members",))  # valid names (see check_collection)
_NULL = re.compile(rb"null")
#: Names no collection may have: they would be the JSON backend's own files (``storage.expires.json``).
_RESERVED_NAMES = frozenset(("storage.expires",))
#: The collections the library itself defines (members, the migration ledger): a file of theirs that is not a
#: collection is damage, never "someone else's file".
OWN_COLLECTIONS = frozenset(("members", "_migrations", "_migration_log", "_migration_notes", "_migration_state"))
#: The most nested containers (dicts, lists) a document may have, itself included: orjson's own limit.
MAX_DEPTH = 254
_BIG_FLOAT = 1e16  # from here on orjson writes floats with an exponent, which jsonb reads back as an integer


_NEGATIVE_ZERO = re.compile(rb"-0\.0")
_PLUS, _DOT = ord("+"), ord(".")  # find() with an int is a memchr; `b"+" in out` costs twice as much (3.11)


def _maybe_noncanonical(out: bytes) -> bool:
    """Whether orjson's output may hold a number that is not in its canonical form: a float written with an
    exponent ``e+``, or ``-0.0``. A false positive (a ``+`` in a string, ``-0.05``) only costs a walk that changes
    nothing. Single bytes first: ``+`` and ``.`` are found with a memchr, where a search for ``e+`` or ``-0.0``
    costs as much as the rest of the encoding on digit-heavy text (benchmarks/README.md, "Design measurements")."""
    return out.find(_PLUS) != -1 or (out.find(_DOT) != -1 and _NEGATIVE_ZERO.search(out) is not None)


def _canonical_float(value: float) -> float | int:
    if value == 0.0:
        return value if math.copysign(1.0, value) > 0 else 0.0
    if abs(value) >= _BIG_FLOAT and value.is_integer() and _INT_MIN <= value <= _INT_MAX:
        return int(value)
    return value


def canonical_numbers(value: Any) -> Any:
    """``value`` with every float in its canonical form (see the module doc): the same object when nothing
    changes, else a copy of the containers on the way to what changed. Expects a value orjson can serialize (so
    at most :data:`MAX_DEPTH` deep)."""
    if type(value) is float:
        return _canonical_float(value)
    if isinstance(value, dict):
        changed = None
        for k, v in value.items():
            c = canonical_numbers(v)
            if c is not v:
                if changed is None:
                    changed = dict(value)
                changed[k] = c
        return value if changed is None else changed
    if isinstance(value, (list, tuple)):
        items = [canonical_numbers(v) for v in value]
        if all(c is v for c, v in zip(items, value)):
            return value
        return items
    return value


def dumps_canonical(value: Any, option: int | None = None) -> bytes:
    """``orjson.dumps`` with the numbers in their canonical form: the bytes a value has once stored, whichever
    backend stored it (what backups and copies compare)."""
    out = orjson.dumps(value, option=option)
    if _maybe_noncanonical(out):
        fixed = canonical_numbers(value)
        if fixed is not value:
            out = orjson.dumps(fixed, option=option)
    return out


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, kept short and safe: a value nested thousands of levels deep (or that
    contains itself) would make ``repr`` raise ``RecursionError`` instead of the error being reported."""
    return _SHOWN.repr(value)


def dumps_kept(value: Any, option: int | None = None, default: Callable[[Any], Any] | None = None) -> bytes:
    """``orjson.dumps`` for bytes that will be *kept* (in memory for the store's lifetime).

    orjson builds its output in a 4 KiB buffer and the shrink that follows does not give the memory back: each
    result holds about 4 KiB of memory whatever its length. Copying into an exact-size ``bytes`` is cheap and brings
    that down to the document's real size (benchmarks/README.md, "Design measurements").
    """
    return memoryview(orjson.dumps(value, default, option)).tobytes()


#: What :func:`dumps_each` puts between documents: raw NUL bytes, which no document's output can hold (orjson
#: writes a NUL in a string as ``\\u0000``), as an already-serialized fragment (None with orjson < 3.9.10). Eight
#: of them, not one: the split searches the output for ``,`` + the NULs + ``,``, and the longer that separator, the
#: further the search skips at each byte that cannot be part of it (commas fill JSON text, so a 3-byte separator
#: let it skip little): 1,000 members split in 0.061 ms against 0.103 (benchmarks/README.md).
_FRAGMENT: Callable[[bytes], object] | None = getattr(orjson, "Fragment", None)
_NULS = b"\x00" * 8
_SEPARATOR = _FRAGMENT(_NULS) if _FRAGMENT is not None else None
_SPLIT = b"," + _NULS + b","


def dumps_each(docs: list[Any], option: int | None = None,
               default: Callable[[Any], Any] | None = None) -> tuple[list[bytes], bytes] | None:
    """``[dumps_kept(doc, option, default) for doc in docs]`` in *one* ``orjson.dumps``, with that call's whole
    output (which a caller can search once instead of once per document); None when the one call fails (then
    encode one by one, which also tells which document is at fault).

    Per document, ``orjson.dumps`` costs 0.4 us of its own and the exact-size copy of :func:`dumps_kept` as much
    again; one call over 1,000 members takes 0.16 ms in all. The documents are dumped as one list with a
    separator between them that no document's output can contain (see :data:`_SEPARATOR`), and the output is split
    there: each piece is exactly what ``dumps`` gives that document alone (a dict is written the same inside a
    list), an exact-size ``bytes`` of its own. Should the pieces not come out one per document (a document
    holding an ``orjson.Fragment`` with the separator in it), the result is None too. A document nested exactly
    :data:`MAX_DEPTH` deep is one level too deep inside the list: None, and the one-by-one path takes it.
    """
    if not docs:
        return [], b""
    if _SEPARATOR is None:
        return None
    parts: list[Any] = [_SEPARATOR] * (2 * len(docs) - 1)
    parts[::2] = docs
    try:
        out = orjson.dumps(parts, default, option)
    except (orjson.JSONEncodeError, TypeError):
        return None
    # rsplit, not split: the same separators (two cannot overlap, no document's output being empty), found faster
    # in JSON text (1,000 members: 0.11 ms against 0.18 with CPython 3.11). Split the output itself and trim the
    # list's brackets off the first and last pieces: out[1:-1] copied the whole output first (250 KB a 1,000).
    pieces = out.rsplit(_SPLIT)
    if len(pieces) != len(docs):
        return None
    pieces[0] = pieces[0][1:]
    pieces[-1] = pieces[-1][:-1]
    return pieces, out


def check_collection(name: object) -> str:
    """Collection names become file names on the JSON backend, so they are restricted to a safe alphabet."""
    if type(name) is str and name in _OWN_COLLECTIONS:
        return name  # the library's own, on every member call: skip the regex
    if name in _RESERVED_NAMES:
        raise ValidationError(f"collection name {name!r} is reserved (the JSON backend's expiry file is "
                              "storage.expires.json)", field="collection")
    if not isinstance(name, str) or not _COLLECTION_RE.match(name) or name.endswith((".tmp", ".json")):
        raise ValidationError(
            f"collection name must be 1-128 chars of letters, digits, '_', '-', '.', not starting with '.' or '-': "
            f"{name!r}", field="collection")
    return name


def check_key(key: object) -> str:
    """A document key as stored: a non-empty str, or a non-negative int (a Discord snowflake such as
    ``guild.id``), which is stored as its decimal text, so ``get("settings", 123)`` and ``get("settings", "123")``
    name the same document on every call and backend (and ``items``/``get_many`` give it back as ``"123"``)."""
    if type(key) is str and 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and "\x00" not in key:
        return key  # the usual key, on every call: isascii() is a flag test, and ASCII text is valid Unicode
    if type(key) is not str:
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            return str(int(key))  # int() too: an IntEnum's str() would be its name
        raise ValidationError(f"document key must be a str or a non-negative int (a snowflake id), got "
                              f"{shown(key) if isinstance(key, int) else type(key).__name__}", field="key")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValidationError(f"document key must be 1-{MAX_KEY_LENGTH} characters, got {len(key)}", field="key")
    if "\x00" in key:
        raise ValidationError("document key must not contain NUL characters", field="key")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("document key must be valid Unicode (no lone surrogates)", field="key") from None
    return key


def _walk(doc: Any, what: str) -> None:
    """Find the exact field that orjson's output would misrepresent, or that nests too deep.

    Iterative, and never deeper than :data:`MAX_DEPTH`: a document nested thousands of levels is reported like any
    other bad field, not with a ``RecursionError`` (the walk runs exactly when orjson has refused a document).
    """
    stack: list[tuple[Any, str, int]] = [(doc, what, 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValidationError(f"{path}: {value} is not allowed in JSON (NaN/Infinity)", field=path)
        elif isinstance(value, str):
            if "\x00" in value:
                raise ValidationError(f"{path}: strings must not contain NUL characters", field=path)
        elif isinstance(value, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise ValidationError(f"{what} is nested deeper than the limit of {MAX_DEPTH} levels (dicts and "
                                      f"lists inside each other) at {path[:200]}{'...' if len(path) > 200 else ''}",
                                      field=what)
            if isinstance(value, dict):
                for k, v in reversed(value.items()):
                    if isinstance(k, str) and "\x00" in k:
                        raise ValidationError(f"{path}: keys must not contain NUL characters", field=path)
                    stack.append((v, f"{path}.{k}", depth + 1))
            else:
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
            raise ValidationError(f"{path}: integer {value} does not fit in 64 bits", field=path)


def encode_doc(doc: Any, *, what: str = "document", default: Callable[[Any], Any] | None = None) -> bytes:
    """Serialize a document, raising :class:`ValidationError` (naming the field) if it is not plain JSON.

    The result is always the exact-size copy of :func:`dumps_kept`, even for bytes that are only sent to a server:
    a batch holds all of them at once, 4 KiB each without the copy. In a ``batch_update_members`` on PostgreSQL the
    copy made no measurable difference to speed (benchmarks/README.md, "Design measurements").

    ``default`` is orjson's hook for values it does not serialize itself (a collection rule's datetime-to-text, see
    :mod:`storage.rules`); without it such a value is refused.
    """
    if type(doc) is not dict:
        raise ValidationError(f"{what} must be a dict, got {type(doc).__name__}", field=what)
    try:
        out = dumps_kept(doc, _DUMPS_OPTS, default)
    except (orjson.JSONEncodeError, TypeError) as exc:
        _walk(doc, what)  # a more precise message when the walk can find the field
        raise ValidationError(f"{what} is not JSON-serializable: {exc}", field=what) from exc
    # orjson writes NaN/Infinity as null and keeps NUL as \u0000: only then is the slow walk needed. Measured on
    # 240-byte members and 50 KB documents alike: the compiled pattern finds "null" in 60% of the time of
    # ``b"null" in out``, and a backslash (memchr) is rare enough to guard the second search.
    if _NULL.search(out) is not None or (b"\\" in out and b"\\u0000" in out):
        _walk(doc, what)
    # Inline (it runs for every document) what _maybe_noncanonical says: rare, -0.0 or a float of 1e16 or more.
    if out.find(_PLUS) != -1 or (out.find(_DOT) != -1 and _NEGATIVE_ZERO.search(out) is not None):
        fixed = canonical_numbers(doc)
        if fixed is not doc:
            out = dumps_kept(fixed, _DUMPS_OPTS, default)
    return out


def decode_doc(data: bytes) -> dict[str, Any]:
    """Parse bytes that this library wrote; a failure means the stored data is corrupt."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptDataError(f"stored document is not valid JSON: {exc}") from exc
    if type(doc) is not dict:
        raise CorruptDataError(f"stored document is a {type(doc).__name__}, not an object")
    return doc
