"""The public document API, written once over a handful of primitives (the core every store and transaction shares).

:class:`OpsBase` checks every argument (collection names, keys, documents, update functions) and encodes documents
before a backend sees them, so both backends reject exactly the same input with the same error and message, and a
backend's primitives work on already-validated, already-encoded input.

Every document written through it is encoded by :meth:`OpsBase._encode_for`, the one place where a collection's
rule (:mod:`storage.rules`: the member shape on ``members``) is applied, and every write's ``ttl``/``expires_at``
becomes an instant in :meth:`OpsBase._expiry` (:mod:`storage.expiry`), so no call path can skip either.
"""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sized
from datetime import datetime
from operator import itemgetter
from typing import Any, TypeVar, overload

import orjson

from .codec import check_collection, check_key, decode_doc, encode_doc, shown
from .errors import ValidationError
from .expiry import expiry_of, utc_now
from .offload import off_loop
from .protocol import Document, Items, Key, UpdateFn
from .query.ops import QueryOps
from .rules import FAST_COLUMNS, FAST_RULES, RULES, encode_for

__all__ = ["OpsBase", "normalize_items", "normalize_columns", "apply_update"]

_T = TypeVar("_T")
_first = itemgetter(0)


#: ``put_many`` of more items than this encodes them in slices of ENCODE_TURN with an event-loop turn between
#: (25k documents encoded in one go held a bot's loop 100-300 ms; see benchmarks/bench_stalls.py).
ENCODE_TURN = 1000
#: ``put_many`` of a mapping of at least this many items (a batch) hands the backend its two columns too
#: (:meth:`OpsBase._put_columns`): no ``(key, bytes)`` pair per item, and on the JSON backend no operation tuple
#: kept from the call to the apply (json/put_run.py; a 1,000-member batch, benchmarks/README.md). A sequence of
#: pairs takes the pairs' way up to ENCODE_TURN (splitting them is a Python loop).
COLUMNS_FROM = 256


def normalize_items(items: Items, collection: str | None = None, *, rule: bool = True,
                    start: int = 0) -> list[tuple[str, bytes]]:
    """``put_many``'s input as checked, encoded pairs; the first bad item raises, naming its position (counted
    from ``start``).

    With ``collection`` (and ``rule``), each document is checked by that collection's rule (:mod:`storage.rules`).
    A rule's fast path (``FAST_RULES``) first encodes the usual items of the whole batch; the items it declines
    then go the long way, in order, so the first bad item is still the one that raises (a fast-path item is
    valid).
    """
    encode: Callable[[str, Any], bytes] = (
        (lambda key, doc: encode_for(collection, key, doc)) if collection is not None and rule else
        (lambda key, doc: encode_doc(doc)))
    pairs = items.items() if isinstance(items, Mapping) else items
    fast = FAST_RULES.get(collection) if collection is not None and rule else None
    encoded: list[bytes | None] | None = None
    if fast is not None:
        columns = FAST_COLUMNS.get(collection) if isinstance(items, Mapping) else None  # type: ignore[arg-type]
        if columns is not None:  # a mapping: its keys and documents as they are, no pairs built (0.1 ms a 1,000)
            keys = list(items)
            encoded = columns(keys, list(items.values()))  # type: ignore[union-attr]
            if encoded is not None and None not in encoded:
                return list(zip(keys, encoded))  # type: ignore[arg-type]
        pairs = list(pairs)
        if encoded is None:
            encoded = fast(pairs)
        if None not in encoded:  # the usual batch: every item taken by the fast path (each a (str, doc) tuple)
            return list(zip(map(_first, pairs), encoded))  # type: ignore[arg-type]
    out: list[tuple[str, bytes]] = []
    for index, pair in enumerate(pairs, start):
        if encoded is not None:
            done = encoded[index - start]
            if done is not None:
                out.append((pair[0], done))  # type: ignore[index]
                continue
        try:
            key, doc = pair
        except (TypeError, ValueError):
            raise ValidationError(f"item #{index} must be a (key, doc) pair", field=f"items[{index}]") from None
        try:
            checked = check_key(key)  # an int key (a snowflake) becomes its text before the rule sees it
            out.append((checked, encode(checked, doc)))
        except ValidationError as exc:
            raise ValidationError(f"item #{index} ({shown(key)}): {exc}", field=exc.field) from exc
    return out


def normalize_columns(keys: list[Any], docs: list[Any], collection: str, *, start: int = 0
                      ) -> tuple[list[str], list[bytes]]:
    """:func:`normalize_items` of the items ``zip(keys, docs)`` (each through ``collection``'s rule), as two lists:
    the checked keys and their encoded documents, in order; the first bad item raises, naming its position.

    Why two lists: a pair per item is one more object the garbage collector tracks, and a ``put_many`` of 25k
    documents that kept 25k of them (and 25k ``(key, doc)`` tuples of its input) alive made ~10 young-generation
    passes, enough to set off a full collection of the caller's whole heap inside the call (benchmarks/README.md)."""
    encoded: list[bytes | None] | None = None
    columns = FAST_COLUMNS.get(collection)
    if columns is not None:
        encoded = columns(keys, docs)
        if encoded is None:  # not taken as a whole: the rule's fast path member by member
            encoded = FAST_RULES[collection](list(zip(keys, docs)))
        if None not in encoded:  # the usual batch: the fast path checked every key too
            return keys, encoded  # type: ignore[return-value]
    out_keys: list[str] = []
    out: list[bytes] = []
    for index, key in enumerate(keys, start):
        if encoded is not None:
            done = encoded[index - start]
            if done is not None:
                out_keys.append(key)
                out.append(done)
                continue
        try:
            checked = check_key(key)  # an int key (a snowflake) becomes its text before the rule sees it
            out.append(encode_for(collection, checked, docs[index - start]))
        except ValidationError as exc:
            raise ValidationError(f"item #{index} ({shown(key)}): {exc}", field=exc.field) from exc
        out_keys.append(checked)
    return out_keys, out


def _split_pairs(pairs: list[Any], start: int) -> tuple[list[Any], list[Any], ValidationError | None]:
    """The keys and documents of ``(key, doc)`` pairs, up to the first item that is not a pair (and the error that
    names it, for the caller to raise once the items before it are checked: the first bad item is the one that
    raises)."""
    keys: list[Any] = []
    docs: list[Any] = []
    for index, pair in enumerate(pairs, start):
        try:
            key, doc = pair
        except (TypeError, ValueError):
            return keys, docs, ValidationError(f"item #{index} must be a (key, doc) pair", field=f"items[{index}]")
        keys.append(key)
        docs.append(doc)
    return keys, docs, None


async def _normalize_in_turns(items: Items, collection: str) -> tuple[list[str], list[bytes]]:
    """:func:`normalize_columns` of a large input, ENCODE_TURN items at a time with a loop turn between; a
    mapping's keys and documents are taken as its two columns (no pair per item)."""
    bad: ValidationError | None = None
    if isinstance(items, Mapping):
        keys_in, docs_in = list(items), list(items.values())
        if len(keys_in) <= ENCODE_TURN:  # one slice: no copies
            return normalize_columns(keys_in, docs_in, collection)
    else:
        keys_in, docs_in, bad = _split_pairs(list(items), 0)
    keys: list[str] = []
    encoded: list[bytes] = []
    for start in range(0, len(keys_in), ENCODE_TURN):
        if start:
            await asyncio.sleep(0)
        some_keys, some = normalize_columns(keys_in[start:start + ENCODE_TURN], docs_in[start:start + ENCODE_TURN],
                                            collection, start=start)
        keys += some_keys
        encoded += some
    if bad is not None:  # every item before it was good
        raise bad
    return keys, encoded


class OpsBase(QueryOps, abc.ABC):
    """Public document operations with their checks, over backend primitives. Shared by stores and transactions.
    ``find`` / ``count`` / ``delete_many`` come from :class:`storage.query.ops.QueryOps`."""

    # -- primitives a backend provides ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _guard_read(self) -> None: ...

    @abc.abstractmethod
    def _guard_write(self) -> None: ...

    @abc.abstractmethod
    async def _get(self, collection: str, key: str) -> Document | None: ...

    @abc.abstractmethod
    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Document]: ...

    @abc.abstractmethod
    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]],
                           expires: datetime | None = None) -> None:
        """Write all pairs atomically and durably (one commit); each expires at ``expires`` (aware UTC), or is
        permanent (None), whatever it was before."""

    async def _put_columns(self, collection: str, keys: list[str], encoded: list[bytes],
                           expires: datetime | None = None) -> None:
        """:meth:`_put_encoded` of ``zip(keys, encoded)`` (a large ``put_many``'s input, kept as two lists: see
        :func:`normalize_columns`). A backend that can write the columns as they are overrides it."""
        await self._put_encoded(collection, list(zip(keys, encoded)), expires)

    @abc.abstractmethod
    async def _delete(self, collection: str, key: str) -> bool: ...

    @abc.abstractmethod
    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None,
                      expires: datetime | None = None) -> Document:
        """Atomic read-modify-write; an expired document is absent (``fn`` gets the default). The result expires
        at ``expires`` or is permanent."""

    @abc.abstractmethod
    async def _expiries(self, collection: str, keys: list[str] | None) -> dict[str, datetime]:
        """When each visible, expiring document among ``keys`` (None: the whole collection) expires; permanent
        and absent ones are left out. What a backup or copy carries along with the documents."""

    def _now(self) -> datetime:
        """The instant expiry is measured against (a store's ``config.clock``; see :mod:`storage.expiry`)."""
        return utc_now()

    def _expiry(self, ttl: object, expires_at: object) -> datetime | None:
        return expiry_of(self._now, ttl, expires_at)

    @staticmethod
    def _encode_for(collection: str, key: str, doc: Any, what: str = "document") -> bytes:
        """THE encoding of every document written through the public API: the collection's rule applies here."""
        return encode_for(collection, key, doc, what)

    async def _put_stored(self, collection: str, items: Items, expires: datetime | None = None) -> int:
        """Write documents that were already stored (a restore, a copy, the statistics refresh of stored members)
        as they are: checked as JSON but not by the collection's rule (see :mod:`storage.rules` for why).

        More than ENCODE_TURN are checked and encoded in a worker thread (the items are not the caller's to change
        meanwhile): a copy's batch of 5,000 documents encoded on the loop held it 25-55 ms."""
        self._guard_write()
        check_collection(collection)
        if isinstance(items, Sized) and len(items) > ENCODE_TURN:
            pairs = await off_loop(functools.partial(normalize_items, items, collection, rule=False))
        else:
            pairs = normalize_items(items, collection, rule=False)
        if pairs:
            await self._put_encoded(collection, pairs, expires)
        return len(pairs)

    async def _put_stored_encoded(self, collection: str, pairs: list[tuple[str, bytes]],
                                  expires: datetime | None = None) -> int:
        """:meth:`_put_stored` of documents the caller already checked and encoded the way it does
        (``normalize_items(..., rule=False)``, in a worker thread: a copy from a store that holds its documents
        encoded)."""
        self._guard_write()
        check_collection(collection)
        if pairs:
            await self._put_encoded(collection, pairs, expires)
        return len(pairs)

    @abc.abstractmethod
    def _items(self, collection: str, prefix: str | None) -> AsyncIterator[tuple[str, Document]]: ...

    @abc.abstractmethod
    async def _count(self, collection: str) -> int: ...

    # -- the public API ------------------------------------------------------------------------------------------
    @overload
    async def get(self, collection: str, key: Key) -> Document | None: ...

    @overload
    async def get(self, collection: str, key: Key, default: Document) -> Document: ...

    @overload
    async def get(self, collection: str, key: Key, default: _T) -> Document | _T: ...

    async def get(self, collection: str, key: Key, default: Any = None) -> Any:
        self._guard_read()
        doc = await self._get(check_collection(collection), check_key(key))
        return default if doc is None else doc

    async def get_many(self, collection: str, keys: Iterable[Key]) -> dict[str, Document]:
        self._guard_read()
        if isinstance(keys, (str, bytes)):
            raise ValidationError("keys must be an iterable of keys, not a single string", field="keys")
        checked = list(dict.fromkeys(check_key(k) for k in keys))
        if not checked:
            return {}
        return await self._get_many(check_collection(collection), checked)

    async def put(self, collection: str, key: Key, doc: Document, *, ttl: float | None = None,
                  expires_at: datetime | None = None) -> None:
        self._guard_write()
        expires = self._expiry(ttl, expires_at)
        collection, key = check_collection(collection), check_key(key)
        await self._put_encoded(collection, [(key, self._encode_for(collection, key, doc))], expires)

    async def put_many(self, collection: str, items: Items, *, ttl: float | None = None,
                       expires_at: datetime | None = None) -> int:
        self._guard_write()
        expires = self._expiry(ttl, expires_at)
        check_collection(collection)
        if isinstance(items, Sized) and (len(items) > ENCODE_TURN
                                         or (len(items) >= COLUMNS_FROM and isinstance(items, Mapping))):
            keys, encoded = await _normalize_in_turns(items, collection)
            if keys:
                await self._put_columns(collection, keys, encoded, expires)
            return len(keys)
        pairs = normalize_items(items, collection)
        if pairs:
            await self._put_encoded(collection, pairs, expires)
        return len(pairs)

    async def delete(self, collection: str, key: Key) -> bool:
        self._guard_write()
        return await self._delete(check_collection(collection), check_key(key))

    async def update(self, collection: str, key: Key, fn: UpdateFn, default: Document | None = None, *,
                     ttl: float | None = None, expires_at: datetime | None = None) -> Document:
        self._guard_write()
        if not callable(fn):
            raise ValidationError("fn must be callable: fn(doc) -> doc", field="fn")
        if default is not None:
            encode_doc(default, what="default")
        expires = self._expiry(ttl, expires_at)
        collection, key = check_collection(collection), check_key(key)

        def checked(doc: Document) -> Document:
            """``fn``'s result through the collection's rule (run by the backend while the key is locked)."""
            result = fn(doc)
            encoded = self._encode_for(collection, key, doc if result is None else result, "update result")
            loaded: Document = orjson.loads(encoded)
            return loaded

        return await self._update(collection, key, checked if collection in RULES else fn, default, expires)

    async def items(self, collection: str, prefix: str | None = None) -> AsyncIterator[tuple[str, Document]]:
        self._guard_read()
        if prefix is not None and not isinstance(prefix, str):  # an int would also match longer ids: 12 -> "123_"
            raise ValidationError(f"prefix must be a str (for a guild's documents: f\"{{guild_id}}_\"), got "
                                  f"{type(prefix).__name__}", field="prefix")
        async for pair in self._items(check_collection(collection), prefix or None):
            yield pair


def apply_update(fn: UpdateFn, current: Document | None, default: Document | None) -> tuple[Document, bytes]:
    """Run an update function on (a fresh copy of) the current doc and encode what it returns.

    Written once so both backends give ``fn`` the same input and accept the same output.
    """
    if current is not None:
        doc = current
    elif default is not None:
        doc = decode_doc(encode_doc(default, what="default"))  # a deep copy: fn may mutate nested values
    else:
        doc = {}
    result = fn(doc)
    if result is None:
        result = doc
    return result, encode_doc(result, what="update result")
