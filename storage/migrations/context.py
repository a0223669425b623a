"""What ``up()``/``down()`` receive: the store's document methods inside the step's own transaction.

Everything written through the context commits together with the ledger entry, or not at all, on both backends.
For work the Store API cannot express there are two explicit escape hatches, each ``None`` on the other backend:

* ``ctx.connection``: on PostgreSQL, the asyncpg connection *of the step's transaction*. DDL and SQL run on it
  commit or roll back with everything else (``CREATE INDEX CONCURRENTLY`` and other statements that refuse to run
  in a transaction cannot be used here).
* ``ctx.path``: on JSON, the data folder. Files changed there are **not** part of the transaction: if the step
  fails after reading ``ctx.path``, the migrator cannot know what was changed, so it leaves the store marked dirty
  for a human to check (and ``repair``) instead of pretending nothing happened. Never edit ``<collection>.json``
  there: the store owns those files; use the document methods. Make file work idempotent (safe to run twice).

Writes made through the store object itself inside a step raise :class:`storage.TransactionError` (they would
escape the transaction, and on JSON deadlock), which is why the context, not the store, is passed in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, TypeVar, overload

import orjson

from ..codec import check_collection
from ..config import StoreConfig
from ..errors import MigrationError, ValidationError
from ..members import MembersMixin
from ..protocol import Document, DocumentOps, Items, Key, UpdateFn
from .ledger import RESERVED
from .results import Direction

__all__ = ["MigrationContext"]

_T = TypeVar("_T")


class MigrationContext(MembersMixin):
    """The ``store`` argument of ``Migration.up``/``down``.

    Attributes: ``backend`` (``"json"``/``"postgres"``), ``direction`` (``"up"``/``"down"``), ``version``,
    ``config`` (the store's :class:`StoreConfig`), ``connection`` and ``path`` (escape hatches, see the module),
    ``notes`` (a JSON-able dict ``up()`` may fill and ``down()`` gets back), ``log`` (a logger named after the
    migration).
    """

    def __init__(self, tx: DocumentOps, *, version: str, name: str, direction: Direction, backend: str,
                 config: StoreConfig | None, connection: Any = None, path: Path | None = None,
                 notes: dict[str, Any] | None = None) -> None:
        self._tx = tx
        self._path = path
        self._active = True
        self.touched_files = False
        self.version = version
        self.direction = direction
        self.backend = backend
        self.config = config
        self.connection = connection
        self.notes: dict[str, Any] = notes if notes is not None else {}
        self.log = logging.getLogger(f"storage.migrations.{name}")

    def __repr__(self) -> str:
        return f"<MigrationContext {self.version} {self.direction} on {self.backend}>"

    @property
    def path(self) -> Path | None:
        """The JSON data folder (None on PostgreSQL). Reading it marks the step as touching files."""
        self._check()
        if self._path is not None:
            self.touched_files = True
        return self._path

    # -- guards ----------------------------------------------------------------------------------------------------
    def _check(self) -> None:
        if not self._active:
            raise MigrationError(f"the context of migration {self.version} is only usable inside its "
                                 f"{self.direction}() call")

    def _writable(self, collection: str) -> str:
        self._check()
        if collection in RESERVED:
            raise ValidationError(f"{collection!r} belongs to the migrator (the ledger); migrations may read it "
                                  "but not write it", field="collection")
        return collection

    def _close(self) -> None:
        self._active = False

    def _guard_write(self) -> None:
        """What the written-once member calls check first (MembersMixin.batch_update_members); the transaction
        checks itself when written to."""
        self._check()

    # -- the document methods ----------------------------------------------------------------------------------------
    @overload
    async def get(self, collection: str, key: Key) -> Document | None: ...

    @overload
    async def get(self, collection: str, key: Key, default: Document) -> Document: ...

    @overload
    async def get(self, collection: str, key: Key, default: _T) -> Document | _T: ...

    async def get(self, collection: str, key: Key, default: Any = None) -> Any:
        self._check()
        return await self._tx.get(collection, key, default)

    async def get_many(self, collection: str, keys: Iterable[Key]) -> dict[str, Document]:
        self._check()
        return await self._tx.get_many(collection, keys)

    async def put(self, collection: str, key: Key, doc: Document, **expiry: Any) -> None:
        """``expiry``: ``ttl=`` or ``expires_at=``, as on the store (storage/expiry.py)."""
        await self._tx.put(self._writable(collection), key, doc, **expiry)

    async def put_many(self, collection: str, items: Items, **expiry: Any) -> int:
        return await self._tx.put_many(self._writable(collection), items, **expiry)

    async def delete(self, collection: str, key: Key) -> bool:
        return await self._tx.delete(self._writable(collection), key)

    async def update(self, collection: str, key: Key, fn: UpdateFn, default: Document | None = None,
                     **expiry: Any) -> Document:
        return await self._tx.update(self._writable(collection), key, fn, default, **expiry)

    async def items(self, collection: str, prefix: str | None = None) -> AsyncIterator[tuple[str, Document]]:
        self._check()
        async for pair in self._tx.items(collection, prefix):
            yield pair

    async def count(self, collection: str, where: dict[str, Any] | None = None, *, prefix: str | None = None) -> int:
        self._check()
        return await self._tx.count(collection, where, prefix=prefix)

    async def find(self, collection: str, where: dict[str, Any] | None = None, *, prefix: str | None = None,
                   order_by: str | None = None, limit: int | None = None,
                   offset: int = 0) -> list[tuple[str, Document]]:
        self._check()
        return await self._tx.find(collection, where, prefix=prefix, order_by=order_by, limit=limit, offset=offset)

    async def delete_many(self, collection: str, where: dict[str, Any] | None = None, *,
                          prefix: str | None = None) -> int:
        return await self._tx.delete_many(self._writable(collection), where, prefix=prefix)

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]]) -> None:
        """For the seed's ``batch_update_members``: decoded again so only the public transaction API is used."""
        await self.put_many(collection, [(key, orjson.loads(raw)) for key, raw in items])

    # -- data transformation -----------------------------------------------------------------------------------------
    async def transform(self, collection: str, fn: UpdateFn, *, prefix: str | None = None) -> list[str]:
        """Apply ``fn(doc) -> doc`` to every document of ``collection`` (optionally only keys with ``prefix``).

        ``fn`` gets a fresh copy; it may return a new dict, or mutate and return None. Only documents that
        actually changed are written, in one ``put_many`` after the scan (no write while iterating). Returning
        the same content leaves a document untouched. Returns the keys of the documents that changed, in key
        order (``up()`` can keep them in ``notes`` so that ``down()`` reverts exactly those).
        """
        self._writable(check_collection(collection))
        if not callable(fn):
            raise ValidationError("fn must be callable: fn(doc) -> doc", field="fn")
        changed: list[tuple[str, Document]] = []
        async for key, doc in self.items(collection, prefix):
            before = orjson.dumps(doc)
            result = fn(doc)
            if result is None:
                result = doc
            if type(result) is not dict:
                raise ValidationError(f"transform of {collection}/{key} returned {type(result).__name__}, "
                                      "not a dict", field="fn")
            try:
                same = orjson.dumps(result) == before
            except TypeError:  # not JSON: put_many below raises a ValidationError naming the field
                same = False
            if not same:
                changed.append((key, result))
        if changed:
            await self.put_many(collection, changed)
        return [key for key, _doc in changed]
