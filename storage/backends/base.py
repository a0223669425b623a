"""What both backends share: the closed / read-only / transaction guards of a store.

The public document API and its argument checks are in :mod:`storage.documents`; the contract a backend fulfils
(its primitives, what backups and migrations need of it) in :mod:`storage.interfaces`. The features written once
for every backend (members, message analytics, backups) sit a layer above and are mixed into the public store
classes in :mod:`storage.stores`: a backend never imports them.
"""

from __future__ import annotations

import asyncio
import contextvars
from asyncio import _get_running_loop  # bound once: the check below runs on every call
from datetime import datetime

from ..config import StoreConfig
from ..errors import DatabaseError, EventLoopError, ReadOnlyError, StoreClosedError, TransactionError
from ..expiry import checked_now
from ..interfaces import Backend, BackendTransaction

__all__ = ["BackendBase", "TransactionBase"]

#: ids of the stores that have a transaction open in the current task (and tasks it spawned).
_open_transactions: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "storage_open_transactions", default=frozenset())


class BackendBase(Backend):
    """Lifecycle and guards every backend shares; subclasses add storage."""

    backend_name = "base"

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._closed = False
        self._transactions_open = 0  # in any task: only then can the current one be in one (a cheap first test)
        #: The event loop that opened the store (its connections, locks and futures belong to it); None until the
        #: first call when the store was built outside a loop.
        self._loop: asyncio.AbstractEventLoop | None = _get_running_loop()

    @property
    def closed(self) -> bool:
        return self._closed

    def _now(self) -> datetime:
        return checked_now(self.config.clock)

    def _guard_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the {self.backend_name} store is closed")
        # One C call and an identity test on every call: 0.2-0.4 us on CPython 3.11, where _get_running_loop makes
        # a getpid() system call (benchmarks/bench_loop_check.py: 5-9% of a 4.6 us JSON get_member_data, under 1%
        # of any PostgreSQL call). It turns asyncpg's bare "attached to a different loop" RuntimeError (or, on
        # JSON, a lock or future quietly bound to the wrong loop) into an error that says what to do.
        loop = _get_running_loop()
        if loop is not self._loop and loop is not None:
            if self._loop is not None:
                raise self._loop_error()
            self._loop = loop

    def _loop_error(self) -> EventLoopError:
        gone = self._loop is not None and self._loop.is_closed()
        return EventLoopError(
            f"this {self.backend_name} store was opened in another event loop"
            + (" that has since ended (as `asyncio.run(storage.open_store())` does)" if gone else "")
            + "; a store works only in the event loop that opened it. Open it in the loop that uses it: in a "
            "discord.py bot, `self.store = await storage.open_store()` in `setup_hook` and "
            "`await self.store.close()` in `close()`; in a script, inside the `async def main()` given to "
            "`asyncio.run`")

    def _closing_elsewhere(self) -> bool:
        """For ``close()``: True when called from another loop after the opening loop ended (the store can only
        give back what needs no loop, see the backends' ``close``); raises :class:`EventLoopError` when the opening
        loop still runs (it may be using the store right now)."""
        loop = _get_running_loop()
        if loop is self._loop or loop is None or self._loop is None:
            return False
        if not self._loop.is_closed():
            raise self._loop_error()
        return True

    def _guard_read(self) -> None:
        """Every call on the store, read or write, is refused inside the current task's own transaction: the
        transaction holds what the call would wait for (the JSON store's lock, a PostgreSQL connection of a pool
        that may have no other free), so it could only deadlock or, on PostgreSQL, read around the transaction.

        The usual call (open, no transaction anywhere, in the store's own loop) is one test of three values: this
        runs on every call, and a JSON ``get`` costs a few microseconds in all."""
        if self._closed or self._transactions_open or _get_running_loop() is not self._loop:
            self._guard_unusual()

    def _guard_unusual(self) -> None:
        """:meth:`_guard_read` when its quick test did not pass: which guard applies, and its error."""
        self._guard_open()
        if self._transactions_open and id(self) in _open_transactions.get():
            raise TransactionError(
                "this store has a transaction open in the current task: call the transaction object "
                "(`async with store.transaction() as tx: await tx.get(...)`), not the store, or it would deadlock")

    def _guard_write(self) -> None:
        self._guard_read()
        if self.config.read_only:
            raise ReadOnlyError(f"the {self.backend_name} store was opened read-only: writes are refused")

    def _enter_transaction(self) -> contextvars.Token[frozenset[int]]:
        """A read-only store has transactions too (a consistent view for backups and copies); writing in one
        raises :class:`ReadOnlyError`."""
        self._guard_read()
        self._transactions_open += 1
        return _open_transactions.set(_open_transactions.get() | {id(self)})

    def _leave_transaction(self, token: contextvars.Token[frozenset[int]]) -> None:
        self._transactions_open -= 1
        _open_transactions.reset(token)

    async def __aenter__(self) -> BackendBase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class TransactionBase(BackendTransaction):
    """The guards both backends' transactions share: usable only while open, and only for reads on a read-only
    store. Subclasses set up their staging or connection and call :meth:`_finish` when the block ends."""

    def __init__(self, store: BackendBase) -> None:
        self._store = store
        self._active = True

    def _guard_read(self) -> None:
        if not self._active:
            raise DatabaseError("the transaction is finished")
        self._store._guard_open()

    def _guard_write(self) -> None:
        self._guard_read()
        if self._store.config.read_only:
            raise ReadOnlyError(f"the {self._store.backend_name} store was opened read-only: its transactions "
                                "only read")

    def _now(self) -> datetime:
        return self._store._now()

    def _end(self) -> None:
        self._active = False
