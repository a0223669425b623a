"""The public query and index calls, written once over backend primitives (checked before a backend sees them).

:class:`QueryOps` (``find``, ``count``, ``delete_many``) is part of every store and transaction (through
:class:`storage.documents.OpsBase`); :class:`IndexOps` (``ensure_index``, ``drop_index``, ``indexes``) of every
store (through :class:`storage.interfaces.Backend`): an index is the store's, not a transaction's.
"""

from __future__ import annotations

import abc
from typing import Any

from ..codec import check_collection
from ..protocol import Document
from .plan import Query, check_path, parse_query

__all__ = ["QueryOps", "IndexOps"]


class QueryOps(abc.ABC):
    """``find`` / ``count`` / ``delete_many`` (the rules are in :mod:`storage.query.plan`)."""

    @abc.abstractmethod
    def _guard_read(self) -> None: ...

    @abc.abstractmethod
    def _guard_write(self) -> None: ...

    @abc.abstractmethod
    async def _count(self, collection: str) -> int: ...

    @abc.abstractmethod
    async def _find(self, collection: str, query: Query) -> list[tuple[str, Document]]:
        """The matching ``(key, doc)`` pairs in the query's order, ``offset`` and ``limit`` applied."""

    @abc.abstractmethod
    async def _count_where(self, collection: str, query: Query) -> int:
        """How many documents match (``query`` has a condition or a prefix)."""

    @abc.abstractmethod
    async def _delete_where(self, collection: str, query: Query) -> int:
        """Delete every matching document atomically and durably (one commit); returns how many."""

    async def find(self, collection: str, where: dict[str, Any] | None = None, *, prefix: str | None = None,
                   order_by: str | None = None, limit: int | None = None,
                   offset: int = 0) -> list[tuple[str, Document]]:
        """The documents matching ``where`` (and ``prefix``) as ``(key, doc)`` pairs, ordered by ``order_by``
        (key order without one), ``offset`` skipped, at most ``limit``."""
        self._guard_read()
        name = check_collection(collection)
        query = parse_query(where, prefix=prefix, order_by=order_by, limit=limit, offset=offset)
        if query.limit == 0:
            return []
        return await self._find(name, query)

    async def count(self, collection: str, where: dict[str, Any] | None = None, *,
                    prefix: str | None = None) -> int:
        """Number of documents in ``collection`` (matching ``where`` and ``prefix`` when given)."""
        self._guard_read()
        name = check_collection(collection)
        query = parse_query(where, prefix=prefix)
        if query.unfiltered:
            return await self._count(name)
        return await self._count_where(name, query)

    async def delete_many(self, collection: str, where: dict[str, Any] | None = None, *,
                          prefix: str | None = None) -> int:
        """Delete every document matching ``where`` and ``prefix`` (all of them without either), atomically:
        one commit. Returns how many were deleted."""
        self._guard_write()
        name = check_collection(collection)
        query = parse_query(where, prefix=prefix)
        return await self._delete_where(name, query)


class IndexOps(abc.ABC):
    """Indexes on a field path of a collection: persistent, used by queries whenever one fits."""

    @abc.abstractmethod
    def _guard_read(self) -> None: ...

    @abc.abstractmethod
    def _guard_write(self) -> None: ...

    @abc.abstractmethod
    async def _ensure_index(self, collection: str, path: str) -> bool: ...

    @abc.abstractmethod
    async def _drop_index(self, collection: str, path: str) -> bool: ...

    @abc.abstractmethod
    async def _indexes(self, collection: str) -> list[str]: ...

    @abc.abstractmethod
    async def _all_indexes(self) -> dict[str, list[str]]:
        """``{collection: [path, ...]}`` of every declared index, paths sorted (an empty collection's too; one
        without an index is left out). What ``copy``, backups and ``status`` carry and show: ``collections()`` lists
        only collections holding documents, and a bot declares its indexes at start, often before any document."""

    async def ensure_index(self, collection: str, path: str) -> bool:
        """Index ``path`` (dotted) of ``collection``: equality, ranges and ``order_by`` on it use the index. True
        if it was created, False if it existed. Safe to call at every start."""
        self._guard_write()
        name = check_collection(collection)
        return await self._ensure_index(name, ".".join(check_path(path)))

    async def drop_index(self, collection: str, path: str) -> bool:
        """Remove the index; True if there was one."""
        self._guard_write()
        name = check_collection(collection)
        return await self._drop_index(name, ".".join(check_path(path)))

    async def indexes(self, collection: str) -> list[str]:
        """The indexed paths of ``collection``, sorted."""
        self._guard_read()
        return await self._indexes(check_collection(collection))
