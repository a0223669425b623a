"""The public document API, written once over a handful of primitives (the core every store and transaction shares).

:class:`OpsBase` checks every argument (collection names, keys, documents, update functions) and encodes documents
before a backend sees them, so both backends reject exactly the same input with the same error and message, and a
backend's primitives work on already-validated, already-encoded input.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar, overload

from .codec import check_collection, check_key, decode_doc, encode_doc, shown
from .errors import ValidationError
from .protocol import Document, Items, Key, UpdateFn
from .query.ops import QueryOps

__all__ = ["OpsBase", "normalize_items", "apply_update"]

_T = TypeVar("_T")


def normalize_items(items: Items) -> list[tuple[str, bytes]]:
    """``put_many``'s input as checked, encoded pairs; the first bad item raises, naming its position."""
    pairs = items.items() if isinstance(items, Mapping) else items
    out: list[tuple[str, bytes]] = []
    for index, pair in enumerate(pairs):
        try:
            key, doc = pair
        except (TypeError, ValueError):
            raise ValidationError(f"item #{index} must be a (key, doc) pair", field=f"items[{index}]") from None
        try:
            out.append((check_key(key), encode_doc(doc)))
        except ValidationError as exc:
            raise ValidationError(f"item #{index} ({shown(key)}): {exc}", field=exc.field) from exc
    return out


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
    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]]) -> None:
        """Write all pairs atomically and durably (one commit)."""

    @abc.abstractmethod
    async def _delete(self, collection: str, key: str) -> bool: ...

    @abc.abstractmethod
    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None) -> Document: ...

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

    async def put(self, collection: str, key: Key, doc: Document) -> None:
        self._guard_write()
        pair = [(check_key(key), encode_doc(doc))]
        await self._put_encoded(check_collection(collection), pair)

    async def put_many(self, collection: str, items: Items) -> int:
        self._guard_write()
        check_collection(collection)
        pairs = normalize_items(items)
        if pairs:
            await self._put_encoded(collection, pairs)
        return len(pairs)

    async def delete(self, collection: str, key: Key) -> bool:
        self._guard_write()
        return await self._delete(check_collection(collection), check_key(key))

    async def update(self, collection: str, key: Key, fn: UpdateFn, default: Document | None = None) -> Document:
        self._guard_write()
        if not callable(fn):
            raise ValidationError("fn must be callable: fn(doc) -> doc", field="fn")
        if default is not None:
            encode_doc(default, what="default")
        return await self._update(check_collection(collection), check_key(key), fn, default)

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
