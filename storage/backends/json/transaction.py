"""A transaction on the JSON backend: serializable because it holds the store's lock from its first line to the
commit, and all-or-nothing because its changes are staged in memory and committed as one journal record.

Reads inside the transaction see its own writes (:class:`~storage.backends.json.tables.Staged`: the committed
documents with the staged changes over them). Nothing reaches the journal until the block ends; an exception or a
cancellation drops the staged changes, and forgets' and prunes' message work staged beside the message files
(json/tx_messages.py) is discarded with them. The store's ``transaction()`` (json/store.py) takes the lock,
runs the block and commits what :meth:`JsonTransaction._finish` returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from ... import cancellation
from ...codec import decode_doc
from ...documents import apply_update
from ...offload import off_loop
from ...protocol import Document, UpdateFn
from ...query.plan import Query
from ..base import TransactionBase
from .expiry import dead_keys, live_expiries, live_mapping
from .journal import Op
from .lifecycle import JsonTxLifecycle
from .listing import ITEMS_INLINE, ITEMS_TURN, select_keys
from .puts import column_ops, put_ops
from .query import Mode, QueryAnswers, run_query
from .restore import RestoreSwap
from .tables import Staged
from .tx_messages import TxMessages

if TYPE_CHECKING:
    from .store import JsonBackend

__all__ = ["JsonTransaction", "release_staged"]

log = logging.getLogger("storage.json")

#: Staged operations freed at a time by :func:`free_staged`.
FREE_SLICE = 1000


class JsonTransaction(QueryAnswers, JsonTxLifecycle, TransactionBase):
    """A transaction on a :class:`JsonBackend`: changes are staged in memory and committed as one journal line;
    forgets and prunes stage their message side beside the message files (json/tx_messages.py), and the same
    journal line decides it."""

    def __init__(self, store: JsonBackend) -> None:
        super().__init__(store)
        self._json = store
        self._staged = Staged(store._tables.data, store._tables.expires)
        self._ops: list[Op] = []
        self._next_turn = ITEMS_TURN  # staged operations after which the loop gets its next turn
        self._tx_messages = TxMessages(store.path)  # forgets' and prunes' message side (json/tx_messages.py)
        self._restore: RestoreSwap | None = None  # a restore's message swap (json/restore.py)
        self._steps = asyncio.Lock()

    def commit_restore(self, swap: RestoreSwap) -> None:
        """A restore's last step (:class:`RestoreSwap`): the commit swaps its messages, decided by the record."""
        if self._restore is not None:
            raise ValueError("one restore per transaction")
        self._restore = swap

    async def _discard_messages(self) -> None:
        """The transaction ends without message work to commit: remove what its steps staged (if any)."""
        try:
            await cancellation.run_in_thread(self._tx_messages.discard)
        except Exception as exc:  # only disk space: the next open removes a work folder without an intent
            log.warning("%s: could not remove a transaction's staged message files: %s", self._json.path, exc)

    def _finish(self) -> list[Op]:
        self._end()
        return self._ops

    async def _stage(self, ops: list[Op]) -> None:
        """Stage ``ops``; every ITEMS_TURN operations the event loop gets a turn, so a transaction that writes
        thousands of documents one call at a time (none of which waits) does not hold a bot's heartbeat."""
        self._staged.apply(ops)
        self._ops.extend(ops)
        if len(self._ops) >= self._next_turn:
            self._next_turn = len(self._ops) + ITEMS_TURN
            await asyncio.sleep(0)

    async def _get(self, collection: str, key: str) -> Document | None:
        raw = self._staged.live(collection, key, self._json._now_micros())
        return orjson.loads(raw) if raw is not None else None

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Document]:
        out = {}
        now = self._json._now_micros()
        for key in keys:
            raw = self._staged.live(collection, key, now)
            if raw is not None:
                out[key] = orjson.loads(raw)
        return out

    async def _expiries(self, collection: str, keys: list[str] | None) -> dict[str, datetime]:
        return live_expiries(self._staged.expiring_in(collection), keys, self._json._now_micros())

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]],
                           expires: datetime | None = None) -> None:
        self._json._check_writable(collection)
        await self._stage(put_ops(collection, items, expires))

    async def _put_columns(self, collection: str, keys: list[str], encoded: list[bytes],
                           expires: datetime | None = None) -> None:
        self._json._check_writable(collection)
        await self._stage(column_ops(collection, keys, encoded, expires))

    async def _delete(self, collection: str, key: str) -> bool:
        self._json._check_writable(collection)
        if self._staged.live(collection, key, self._json._now_micros()) is None:
            return False
        await self._stage([("d", collection, key)])
        return True

    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None,
                      expires: datetime | None = None) -> Document:
        self._json._check_writable(collection)
        raw = self._staged.live(collection, key, self._json._now_micros())
        _doc, encoded = apply_update(fn, orjson.loads(raw) if raw is not None else None, default)
        await self._stage(put_ops(collection, [(key, encoded)], expires))
        return decode_doc(encoded)

    async def _items(self, collection: str, prefix: str | None) -> AsyncIterator[tuple[str, Document]]:
        """The keys as they are when the iteration starts, in order (a large collection sorted in a worker thread);
        each document as it is when it is reached (one this transaction deleted meanwhile is skipped)."""
        await self._json._whole(collection)
        view = self._staged.live_view(collection, self._json._now_micros())
        keys = list(view)
        selected = await off_loop(select_keys, keys, prefix) if len(keys) > ITEMS_INLINE \
            else select_keys(keys, prefix)
        staged, loads, now = self._staged, orjson.loads, self._json._now_micros()
        for index, key in enumerate(selected):
            if index and not index % ITEMS_TURN:
                await asyncio.sleep(0)
            raw = staged.live(collection, key, now)
            if raw is not None:
                yield key, loads(raw)

    async def _count(self, collection: str) -> int:
        staged = self._staged
        if staged.size() > ITEMS_INLINE:
            # Counted in a worker thread over a copy of the staged changes (two C-level dict copies; the loop may
            # stage more meanwhile): a restore's count after staging 100k puts rebuilt the view on the loop, 43 ms.
            await self.whole(collection)
            frozen, now = staged.frozen(collection), self._json._now_micros()  # its changes alone
            return await off_loop(live_count, frozen, collection, now)
        if staged.expiring_in(collection) or collection in staged.names:
            await self.whole(collection)  # the view is then a copy with the changes over it
        return len(self._staged.live_view(collection, self._json._now_micros()))

    async def whole(self, collection: str) -> None:
        """Read a lazy committed collection whole off the loop (JsonStore._whole) before this transaction's view
        of it is walked or copied: :meth:`encoded_documents` callers that walk it on the loop call this first."""
        await self._json._whole(collection)

    async def _query(self, collection: str, query: Query, mode: Mode) -> Any:
        """Over this transaction's view; the committed indexes serve it while it changed nothing in the
        collection (the committed data cannot change while the transaction holds the lock)."""
        await self._json._whole(collection)
        view = self._staged.view(collection)
        committed = self._staged.base.get(collection)
        indexes = self._json._tables.indexes.of(collection) if view is committed else None
        dead = dead_keys(self._staged.expiring_in(collection), self._json._now_micros())  # json/expiry.py
        return await run_query(live_mapping(view, dead), indexes, query, mode)

    async def _delete_where(self, collection: str, query: Query) -> int:
        self._json._check_writable(collection)
        keys: list[str] = await self._query(collection, query, "keys")
        for start in range(0, len(keys), ITEMS_TURN):
            await self._stage([("d", collection, key) for key in keys[start:start + ITEMS_TURN]])
        return len(keys)

    def encoded_documents(self, collection: str) -> Mapping[str, bytes] | None:
        """The documents as this transaction sees them, as stored (encoded): what a backup writes, without a
        decode and re-encode of each (the committed collection, with this transaction's changes over it)."""
        self._guard_read()
        return self._staged.live_view(collection, self._json._now_micros())

    async def collections(self) -> list[str]:
        """The collections that hold documents, as this transaction sees them (like ``PgTransaction``'s: a backup
        or copy lists them here, since the store itself refuses calls inside its own transaction)."""
        self._guard_read()
        staged = self._staged
        changed = set(staged.names)
        for name in changed:
            await self._json._whole(name)
        now = self._json._now_micros()
        names = {name for name, coll in staged.base.items() if coll and name not in changed}
        names.update(name for name in changed if staged.keys(name))
        return sorted(name for name in names if staged.live_view(name, now))


def release_staged(tx: JsonTransaction) -> None:
    """Hand a large committed transaction's staged operations to a worker thread to free, piecewise, without
    waiting for it (no await: the transaction is committed and must be reported so). Dropped with the transaction
    on the loop, 100k operations and their staged view took 8-11 ms in one step (a restore's last)."""
    ops, staged = tx._ops, tx._staged
    if len(ops) + staged.size() <= ITEMS_INLINE:
        return
    tx._ops, changes, staged.changes = [], staged.changes, {}
    asyncio.get_running_loop().run_in_executor(None, free_staged, ops, changes)


def free_staged(ops: list[Op], changes: dict[str, dict[str, bytes | None]]) -> None:
    """Empty ``ops`` and ``changes`` FREE_SLICE at a time (in a worker thread, which can give the GIL back between
    two slices; freeing them whole is one C call that holds it throughout)."""
    while ops:
        del ops[-FREE_SLICE:]
    while changes:
        _name, mine = changes.popitem()
        while mine:
            for _ in range(min(len(mine), FREE_SLICE)):
                mine.popitem()


def live_count(staged: Staged, collection: str, now: int) -> int:
    """How many documents of ``collection`` ``staged`` shows at ``now`` (in a worker thread, over a frozen copy)."""
    return len(staged.live_view(collection, now))
