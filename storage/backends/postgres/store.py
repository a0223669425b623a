"""The PostgreSQL backend, through asyncpg: the whole ``Store`` contract on a connection pool.

How it maps the contract:

* **One pool** (``asyncpg.create_pool``, sizes from ``StoreConfig.pool_min``/``pool_max``), exposed as
  :attr:`PostgresStore.pool` for migrations and hand-written SQL. Each new connection registers a ``jsonb`` codec
  (binary format, orjson) so documents go to the server as the bytes ``storage.codec`` produced and come back as
  fresh dicts. ``STORAGE_PGBOUNCER=1`` turns asyncpg's prepared statement cache off (``statement_cache_size=0``),
  which a transaction pooler needs, and nothing here relies on session state.
* **Atomicity and no lost updates** come from PostgreSQL itself: a ``put_many`` is one statement, ``update()``
  locks the row (``SELECT ... FOR UPDATE``) while ``fn`` runs, and ``transaction()`` is a real transaction on one
  connection (:attr:`PgTransaction.connection`) whose reads lock what they read. See postgres/documents.py.
* **Faults**: a refused connection, a server restart, a dropped socket raise :class:`storage.ConnectionError` (the
  original chained); the pool replaces dead connections by itself, so the same store works again as soon as the
  server is back, and :func:`storage.safe_database_operation` can simply retry. See postgres/errors.py.

Documents in jsonb
    jsonb keeps what JSON means, not how it was spelled: a document reads back equal (``==``) to what was
    written, but its keys come back in jsonb's order (shorter keys first). Numbers jsonb would give back in
    another form (``-0.0``, floats of 1e16 or more) are already stored in that form, on both backends (see
    storage/codec.py), so they read back identical.

Bounded waits
    Every statement and every wait for a pooled connection ends after ``config.command_timeout``; connections have
    TCP keepalives; a cancelled or timed-out operation terminates its connection instead of waiting on a server
    that may never answer. See postgres/conn.py. A store call from inside the task's own transaction is refused
    (base.py ``_guard_read``): it would wait for a connection the transaction may hold the last of.

Reads by key and the cache
    ``get`` goes through a :class:`storage.DatabaseCache` with ``ttl = config.cache_ttl`` (``STORAGE_CACHE_TTL``;
    ``0``, the default, turns it off: several bot shards writing the same members is common, and the JSON backend
    is always fresh, so exact reads are the default and the cache an opt-in for single-process bots). It
    holds the document's JSON *text* (immutable: every ``get`` decodes a fresh dict), never caches absence, and is
    invalidated by this store's own writes, transactional ones at commit. A write racing with a read never leaves
    the old value cached: a read only fills the cache if no write of this store finished while it was in flight.

    What another process sees: every write is committed when the call returns, so another process's
    ``get_many``/``items``/``count``/``update``/transactions see it at once, and so does its ``get`` of a key it has
    not read recently. But a key that *this* process read less than ``cache_ttl`` seconds ago may be served from
    its cache and miss another process's later write until the entry expires. One process per database (the usual
    bot) never sees stale data. With several processes writing the same keys, set ``cache_ttl=0`` (exact) or
    accept staleness up to the ttl for ``get``. ``update()`` and transactions never use the cache, so a
    read-modify-write never works on stale data whatever the ttl.

The lane
    Most one-statement calls run on one pool connection the store keeps between operations instead of paying the
    pool's acquire and release every time; concurrent calls and transactions borrow from the pool. See
    postgres/lane.py (its states, and when it goes back to the pool).

Connection reset
    asyncpg's pool normally sends a reset query (``RESET ALL; UNLISTEN *; ...``) every time a connection is given
    back, which doubles the cost of a one-statement ``get``. The statements this module runs leave no session
    state behind, so connections it borrowed skip that query; connections borrowed by anyone else through
    :attr:`pool` still get asyncpg's full reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from ...cache import DatabaseCache
from ...child import ChildLost, Recipe, child_items
from ...config import StoreConfig
from ...dsn import mask_secrets
from ...errors import (
    ConnectionError,
    DatabaseError,
    FeedUnavailableError,
    MigrationError,
    StoreClosedError,
    TransactionError,
    ValidationError,
)
from ...feed import ChangeFeed
from ...interfaces import BackendTransaction, MigrationLock
from ...offload import off_loop
from ...protocol import Document, UpdateFn
from ...query.plan import Query
from ..base import BackendBase, TransactionBase
from . import conn as pg_conn
from . import documents as sql
from . import indexes as pg_indexes
from . import notify
from . import query as pg_query
from .analyze import BULK_ROWS, LoadStatistics
from .coherent_cache import CoherentCache
from .errors import DRIVER_ERRORS, describe_target, is_connection_error, is_driver_error, scrub_exception, translate
from .feed import PgFeed
from .ingest import KEY_SIZE, RowEncoder, replay
from .lane import Lane
from .lifecycle import PgLifecycle, PgTxLifecycle
from .messages import COLUMNS, PgMessagesMixin
from .migration_lock import AdvisoryMigrationLock
from .schema import ensure_schema

_B = TypeVar("_B", bound="PostgresBackend")

__all__ = ["PostgresBackend", "PgTransaction", "CONNECT_TIMEOUT", "CLOSE_TIMEOUT"]

log = logging.getLogger("storage.postgres")

#: Seconds to wait for a new connection (asyncpg's default, 60 s, makes a down host look like a hang).
CONNECT_TIMEOUT = 15.0
#: Seconds ``close()`` waits for borrowed connections to come back before it terminates them.
CLOSE_TIMEOUT = 10.0
#: Seconds between two sweeps of expired documents (each a few short statements; see :meth:`purge_expired`).
SWEEP_INTERVAL = 60.0
#: Documents ``items()`` hands on between two loop turns: a page (1,000) decoded and used by a backup (encoded and
#: made canonical per document) was one loop step of 7-11 ms on a loaded host.
PAGE_TURN = 250
#: Seconds the indexed paths of a collection are remembered (see PostgresBackend._indexed_paths).
INDEX_CACHE_SECONDS = 30.0

# asyncpg reports a malformed DSN with a ValueError (ClientConfigurationError), at the first connection.
_OPEN_ERRORS: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, ValueError)
_ISOLATION_LEVELS = ("read_committed", "repeatable_read", "serializable")
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, asyncio.TimeoutError)


def _encode_jsonb(value: Any) -> bytes:
    """jsonb's binary format is a version byte (1) and the JSON text; already-encoded documents pass as they are."""
    return b"\x01" + (value if isinstance(value, bytes) else orjson.dumps(value))


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(memoryview(data)[1:])


async def _init_connection(conn: Any) -> None:
    pg_conn.configure_socket(conn)  # TCP keepalives: see postgres/conn.py
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=_encode_jsonb, decoder=_decode_jsonb,
                              format="binary")


class PostgresBackend(PgLifecycle, PgMessagesMixin, BackendBase):
    """The PostgreSQL backend. Open it with :func:`storage.open_store` (or ``await storage.PostgresStore.open(config)``,
    this backend with the features of :mod:`storage.stores`)."""

    backend_name = "postgres"

    def __init__(self, config: StoreConfig) -> None:
        super().__init__(config)
        #: The asyncpg pool: an escape hatch for migrations and hand-written SQL.
        self.pool: Any = None
        self._target = describe_target(config.dsn)
        #: The read cache (STORAGE_CACHE): coherent (postgres/coherent_cache.py, live once the listener is up),
        #: the ttl one, or none (a DatabaseCache with ttl 0 never stores).
        self._coherent: CoherentCache | None = None
        mode = config.cache_mode
        if mode == "coherent" and self._feed_possible():
            self._cache: DatabaseCache | CoherentCache = CoherentCache(config.cache_size)
            self._coherent = self._cache
        else:
            self._cache = DatabaseCache(ttl=config.cache_ttl if mode == "ttl" else 0, max_entries=config.cache_size)
        #: store.watch() and the coherent cache's invalidations (postgres/feed.py), once open
        self._pgfeed: PgFeed | None = None
        self._channel = ""  # the schema's notification channel (postgres/notify.py), known once open
        self._writes = 0  # bumped after every write of this store: a read in flight across one must not cache
        self._quiet: set[int] = set()  # server pids of connections our own code is using (see _reset_connection)
        # One pool connection kept between operations, so that most one-statement calls skip the pool's acquire and
        # release (see postgres/lane.py). Closed until the pool exists.
        self._lane = Lane(None, quiet=self._quiet, timeout=config.command_timeout, target=self._target)
        self._load_stats = LoadStatistics()  # ANALYZE after bulk loads (postgres/analyze.py)
        self._sweeper: asyncio.Task[None] | None = None  # the timer that purges expired documents
        #: collection -> (when read, its indexed paths): chooses the SQL shape of an ordered find (see query.py)
        self._indexed: dict[str, tuple[float, frozenset[str]]] = {}

    # where the data is (storage.interfaces)
    def location(self) -> str:
        return str(self.config.safe_dsn)

    def migration_lock(self) -> MigrationLock:
        if self.config.pool_max < 2:
            raise MigrationError("migrations need a pool of at least 2 connections (one holds the migration "
                                 "lock while another runs the migration): set STORAGE_POOL_MAX >= 2")
        return AdvisoryMigrationLock(self.pool, transaction_scoped=self.config.pgbouncer,
                                     command_timeout=self.config.command_timeout)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._target} closed={self._closed}>"

    # ---------------------------------------------------------------------------------------------------------------
    # opening and closing
    @classmethod
    async def open(cls: type[_B], config: StoreConfig | str) -> _B:
        """Connect, create the tables if needed, and return the store. Errors name the server, never the password."""
        if not isinstance(config, StoreConfig):
            config = StoreConfig(backend="postgres", dsn=os.fspath(config), source="arguments")
        store = cls(config)
        await store._connect()
        return store

    async def _connect(self) -> None:
        config = self.config
        try:
            self.pool = await asyncpg.create_pool(
                dsn=config.dsn,
                min_size=config.pool_min,
                max_size=config.pool_max,
                init=_init_connection,
                reset=self._reset_connection,
                statement_cache_size=0 if config.pgbouncer else 100,
                timeout=CONNECT_TIMEOUT,
                command_timeout=config.command_timeout,  # bounds every statement: see postgres/conn.py
                # read-only: the server itself refuses writes too (not through PgBouncer, which refuses the
                # parameter; the store's own guards refuse them there)
                server_settings=({"default_transaction_read_only": "on"}
                                 if config.read_only and not config.pgbouncer else None),
            )
        except _OPEN_ERRORS as exc:
            raise self._open_error(exc) from exc
        self._lane = Lane(self.pool, quiet=self._quiet, timeout=config.command_timeout, target=self._target)
        try:
            async with self.pool.acquire() as conn:  # with pool_min=0 this is the first connection
                await ensure_schema(conn, read_only=config.read_only)
                self._channel = notify.channel_for(await conn.fetchval("SELECT current_schema()"))
        except _OPEN_ERRORS as exc:
            self.pool.terminate()
            raise self._open_error(exc) from exc
        except BaseException:
            self.pool.terminate()
            raise
        if not config.read_only:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        if self._feed_possible():
            self._pgfeed = PgFeed(config.listen_dsn or str(config.dsn), self._channel, target=self._target,
                                  connect_timeout=CONNECT_TIMEOUT, cache=self._coherent, fetch=self._fetch_encoded)
            if self._coherent is not None and not await self._pgfeed.start_cache():
                log.warning("%s: the listening connection is not up yet: the coherent cache stays off until it is",
                            self._target)

    async def _sweep_forever(self) -> None:
        """Every :data:`SWEEP_INTERVAL` seconds: :meth:`purge_expired` (errors are logged; the next round retries)."""
        while not self._closed:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.purge_expired()
            except DatabaseError as exc:
                log.warning("%s: sweeping expired documents failed (%s); retrying in %ss", self._target, exc,
                            SWEEP_INTERVAL)

    async def purge_expired(self) -> int:
        """Delete the documents that are no longer visible (they already read as absent), in short batches of
        :data:`~storage.backends.postgres.documents.SWEEP_BATCH` rows through the partial index on ``expires_at``,
        each its own statement (no long lock; rows a writer holds are skipped until the next sweep); returns how
        many. Runs by itself every :data:`SWEEP_INTERVAL` seconds while the store is open."""
        self._guard_write()
        removed = 0
        while True:
            async with self._connection("sweep") as conn:
                n = await sql.sweep(conn, self._now())
            removed += n
            if n < sql.SWEEP_BATCH:
                return removed
            await asyncio.sleep(0)

    def _feed_possible(self) -> bool:
        """LISTEN needs a session of its own: not through a transaction pooler, unless a direct DSN is given."""
        return not self.config.pgbouncer or bool(self.config.listen_dsn)

    def _change_feed(self) -> ChangeFeed:
        if self._pgfeed is None:
            raise FeedUnavailableError(
                f"{self._target}: store.watch() needs LISTEN, which does not work through PgBouncer in transaction "
                "mode (STORAGE_PGBOUNCER=1): set STORAGE_LISTEN_DSN to a direct connection to the server")
        return self._pgfeed.feed

    async def _send_marker(self, payload: str) -> None:
        async with self._connection("close") as conn:
            await notify.send(conn, self._channel, [payload], None)

    async def _fetch_encoded(self, collection: str, keys: list[str]) -> dict[str, bytes]:
        """The current documents of ``keys``, encoded: what the feed publishes for a large document."""
        async with self._connection("watch") as conn:
            docs = await sql.get_many(conn, collection, keys, self._now())
        return {key: orjson.dumps(doc) for key, doc in docs.items()}

    def _open_error(self, exc: BaseException) -> DatabaseError:
        """A clear message for the first thing a user sees when the DSN, the password or the server is wrong."""
        target = self._target
        state = getattr(exc, "sqlstate", None) or ""
        scrub_exception(exc, self.config.dsn)  # the __cause__ of what we raise: printed with every traceback
        detail = mask_secrets(f"{type(exc).__name__}: {exc}", self.config.dsn)
        if state.startswith("28"):
            return DatabaseError(f"cannot open PostgreSQL at {target}: authentication failed, check the user and "
                                 f"password ({detail})")
        if state == "3D000":
            return DatabaseError(f"cannot open PostgreSQL at {target}: the database does not exist ({detail})")
        if isinstance(exc, ValueError) and not isinstance(exc, asyncpg.PostgresError):
            return ValidationError(f"invalid PostgreSQL DSN {self.config.safe_dsn}: {detail}", field="dsn")
        if is_connection_error(exc):
            return ConnectionError(f"cannot connect to PostgreSQL at {target}: is the server running and reachable "
                                   f"from here? ({detail})")
        return translate(exc, "opening the store", self.config.dsn)

    async def close(self) -> None:
        """Close the pool (waiting up to :data:`CLOSE_TIMEOUT` for borrowed connections); idempotent.

        From another loop once the opening one has ended (``asyncio.run(open_store())``, then ``close()`` later):
        the pool's connections belong to that dead loop and cannot be closed politely; the store is marked closed
        and they go when the process does (the server rolls back nothing: no transaction can be open on them)."""
        if self._closed:
            return
        if self._closing_elsewhere():
            self._closed = True
            return
        if self._pgfeed is not None and self._pgfeed.feed.active:
            await self._pgfeed.sync(self._send_marker, 1.0)  # watchers get this process's last changes first
        self._closed = True
        if self._pgfeed is not None:
            await self._pgfeed.close()
        await self._cache.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        pool = self.pool
        if pool is None:
            return
        await self._lane.close()  # a busy lane is given back by the call using it
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except _CLOSE_ERRORS as exc:
            log.warning("%s: closing the pool cleanly failed (%s); terminating its connections", self._target, exc)
            pool.terminate()

    # ---------------------------------------------------------------------------------------------------------------
    # connections
    async def _reset_connection(self, conn: Any) -> None:
        """The pool's reset hook: skip the reset query for connections only our own statements used."""
        if conn.get_server_pid() in self._quiet:
            return
        query = conn.get_reset_query()
        if query:
            await conn.execute(query)

    def _translate(self, exc: BaseException, what: str) -> DatabaseError:
        if self._closed and is_connection_error(exc):
            return StoreClosedError(f"the postgres store was closed during {what}")
        return translate(exc, what, self.config.dsn)

    def _acquire_error(self, exc: BaseException, what: str) -> DatabaseError:
        """What a failed wait for a pooled connection raises: a timeout says why it can happen."""
        if isinstance(exc, asyncio.TimeoutError):
            return ConnectionError(
                f"{what}: no connection to PostgreSQL at {self._target} became free within the command timeout "
                f"({self.config.command_timeout:g}s, STORAGE_COMMAND_TIMEOUT) in a pool of {self.config.pool_max} "
                "(STORAGE_POOL_MAX): all are in use by calls or transactions that have not finished, or the "
                "server does not answer; retry later, or use a larger pool")
        return self._translate(exc, what)

    def _connection(self, what: str, *, lane: bool = True) -> _Borrowed:
        """``async with`` a pooled connection; driver errors raised while using it come out translated."""
        return _Borrowed(self, what, lane)

    async def _notify_written(self, conn: Any, collection: str, items: list[tuple[str, bytes | None]],
                              sent: notify.Distinct | None = None) -> None:
        """Inside the writing transaction: tell every listener these keys were put (``None``: read the document);
        many keys are framed off the loop (notify.framed). ``sent``: the transaction's, if it notifies more."""
        texts = await notify.framed(collection, items)
        await notify.send(conn, self._channel, texts, sent)

    def _invalidate(self, collection: str, keys: Any) -> None:
        self._writes += 1
        cache = self._cache
        if len(cache):
            for key in keys:
                cache.invalidate_nowait((collection, key))

    # ---------------------------------------------------------------------------------------------------------------
    # document primitives
    async def _get(self, collection: str, key: str) -> Document | None:
        cache_key = (collection, key)
        coherent = self._coherent
        if coherent is not None:
            text = coherent.get_nowait(cache_key)
            if text is None:
                ticket = coherent.begin(cache_key)
                keep = False
                try:
                    async with self._connection("get") as conn:
                        text, expiring = await sql.get_text(conn, collection, key, self._now())
                    keep = not expiring  # an expiring document is never cached: the cache would outlive it
                finally:
                    coherent.end(cache_key, ticket, (text or "") if keep else None)
            if not text:
                return None
            found: Document = orjson.loads(text)
            return found
        text = self._cache.get_nowait(cache_key)
        if text is None:
            writes = self._writes
            async with self._connection("get") as conn:
                text, expiring = await sql.get_text(conn, collection, key, self._now())
            if text is None:
                return None
            if writes == self._writes and not expiring and isinstance(self._cache, DatabaseCache):
                self._cache.set_nowait(cache_key, text)
        doc: Document = orjson.loads(text)
        return doc

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Document]:
        async with self._connection("get_many") as conn:
            return await sql.get_many(conn, collection, keys, self._now())

    async def _expiries(self, collection: str, keys: list[str] | None) -> dict[str, datetime]:
        async with self._connection("expiries") as conn:
            return await sql.expiries(conn, collection, keys, self._now())

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]],
                           expires: datetime | None = None) -> None:
        try:
            async with self._connection("put") as conn:
                await notify.put(conn, self._channel, collection, items, expires, sent=None)
                await self._load_stats.after_load(conn, "storage_documents", len(items))
        finally:
            self._invalidate(collection, (key for key, _ in items))

    async def _put_columns(self, collection: str, keys: list[str], encoded: list[bytes],
                           expires: datetime | None = None) -> None:
        try:
            async with self._connection("put") as conn:
                await notify.put_columns(conn, self._channel, collection, keys, encoded, expires, sent=None)
                await self._load_stats.after_load(conn, "storage_documents", len(keys))
        finally:
            self._invalidate(collection, keys)

    async def _delete(self, collection: str, key: str) -> bool:
        try:
            async with self._connection("delete") as conn:
                return await notify.delete(conn, self._channel, collection, key, self._now())
        finally:
            self._invalidate(collection, (key,))

    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None,
                      expires: datetime | None = None) -> Document:
        try:
            async with self._connection("update") as conn, pg_conn.transaction(conn):
                doc = await sql.update(conn, collection, key, fn, default, in_transaction=False, now=self._now(),
                                       expires=expires)
                await self._notify_written(conn, collection, [(key, orjson.dumps(doc))])
                return doc
        finally:
            self._invalidate(collection, (key,))

    def _items(self, collection: str, prefix: str | None) -> AsyncIterator[tuple[str, Document]]:
        # Page by key rather than hold a cursor: no connection stays borrowed while the caller works on a page,
        # so writing to the store inside the loop cannot starve the pool.
        return _paged_items(self._connection, collection, prefix, self._now)

    async def _count(self, collection: str) -> int:
        async with self._connection("count") as conn:
            return await sql.count(conn, collection, self._now())

    async def collections(self) -> list[str]:
        self._guard_read()
        async with self._connection("collections") as conn:
            return await sql.collections(conn, self._now())

    # ---------------------------------------------------------------------------------------------------------------
    # queries and indexes (query.py, indexes.py)
    async def _indexed_paths(self, collection: str, use: Callable[[str], AbstractAsyncContextManager[Any]]
                             ) -> frozenset[str]:
        """The collection's indexed paths, re-read every :data:`INDEX_CACHE_SECONDS` (another process may add one;
        a stale answer only changes the shape of the SQL, never its result)."""
        hit = self._indexed.get(collection)
        now = time.monotonic()
        if hit is not None and now - hit[0] < INDEX_CACHE_SECONDS:
            return hit[1]
        async with use("indexes") as conn:
            paths = frozenset((await pg_indexes.indexed_paths(conn, collection)).get(collection, []))
        self._indexed[collection] = (now, paths)
        return paths

    async def _find(self, collection: str, query: Query) -> list[tuple[str, Document]]:
        indexed = await self._indexed_paths(collection, self._connection) if query.order and query.limit else None
        text, params = pg_query.build_find(collection, query, indexed or frozenset(), self._now())
        async with self._connection("find") as conn:
            if query.limit is not None and query.limit <= pg_query.FETCH_ROWS:
                return await pg_query.fetch_pairs(conn, text, params, query.limit)
            async with pg_conn.transaction(conn):
                return await pg_query.fetch_pairs(conn, text, params, query.limit)

    async def _count_where(self, collection: str, query: Query) -> int:
        text, params = pg_query.build_count(collection, query, self._now())
        async with self._connection("count") as conn:
            n: int = await conn.fetchval(text, *params)
            return n

    async def _delete_where(self, collection: str, query: Query) -> int:
        # the deleted keys: every listener is told of them in the deleting transaction (postgres/notify.py)
        text, params = pg_query.build_delete(collection, query, self._now(), returning=True)
        keys: list[str] = []
        try:
            async with self._connection("delete_many") as conn, pg_conn.transaction(conn):
                deleted, keys = await pg_query.delete_rows(conn, text, params, returning=True)
                await notify.send(conn, self._channel, notify.payloads(collection, [(k, None) for k in keys],
                                                                       delete=True), None)
        except BaseException:
            await self._cache.clear()  # it may have committed: forget everything rather than risk a stale read
            raise
        finally:
            self._invalidate(collection, keys)
        return deleted

    async def _ensure_index(self, collection: str, path: str) -> bool:
        self._indexed.pop(collection, None)
        async with self._connection("ensure_index", lane=False) as conn:
            return await pg_indexes.ensure(conn, collection, path)

    async def _drop_index(self, collection: str, path: str) -> bool:
        self._indexed.pop(collection, None)
        async with self._connection("drop_index", lane=False) as conn:
            return await pg_indexes.drop(conn, collection, path)

    async def _indexes(self, collection: str) -> list[str]:
        async with self._connection("indexes") as conn:
            return (await pg_indexes.indexed_paths(conn, collection)).get(collection, [])

    async def _all_indexes(self) -> dict[str, list[str]]:
        async with self._connection("indexes") as conn:
            return dict(sorted((await pg_indexes.indexed_paths(conn)).items()))

    # ---------------------------------------------------------------------------------------------------------------
    # transactions
    @asynccontextmanager
    async def transaction(self, *, isolation: str = "read_committed") -> AsyncIterator[BackendTransaction]:
        """A PostgreSQL transaction on one connection.

        ``isolation="read_committed"`` (the default) is pessimistic: reads lock what they read (see
        postgres/documents.py), so concurrent read-modify-write transactions wait for each other and never lose an
        update. Two of them reading the same documents in opposite orders can deadlock; PostgreSQL then aborts
        one, which raises :class:`storage.TransactionError` (retry it).

        ``"repeatable_read"`` or ``"serializable"`` read one snapshot without locking, which is what a consistent
        export wants; a write that conflicts with a concurrent one raises :class:`storage.TransactionError`.
        """
        if isolation not in _ISOLATION_LEVELS:
            raise ValidationError(f"isolation must be one of {', '.join(_ISOLATION_LEVELS)}, got {isolation!r}",
                                  field="isolation")
        token = self._enter_transaction()
        try:
            # Not on the lane: a transaction may last as long as the caller likes, and its escape hatch
            # (tx.connection) may leave session state that only the pool's reset clears.
            async with self._connection("transaction", lane=False) as conn:
                tx = PgTransaction(self, conn, locking_reads=isolation == "read_committed")
                xact = conn.transaction(isolation=isolation)
                await xact.start()
                try:
                    yield tx
                except BaseException as exc:
                    tx._finish()
                    self._reset_after(conn, tx)
                    if pg_conn.abandons(exc) or tx._abandoned:  # a ROLLBACK could wait forever on a frozen server
                        pg_conn.abandon(conn)
                    else:
                        await self._rollback(xact)
                    raise
                await tx._send_before_commit()
                with contextlib.suppress(TransactionError):
                    await tx._check_not_aborted()  # records the failure in tx._failed
                if tx._hatch_used and tx._failed is None:  # SQL we cannot describe: every watcher resyncs
                    with contextlib.suppress(DatabaseError):  # a failure is recorded in tx._failed: rolled back
                        async with tx._use("commit") as used:
                            await notify.send(used, self._channel, [notify.RESYNC_PAYLOAD], tx._sent)
                tx._finish()
                self._reset_after(conn, tx)
                if tx._failed is not None:
                    await self._rollback(xact)
                    raise TransactionError("the transaction was rolled back: a statement in it failed "
                                           f"({_describe(tx._failed)})") from tx._failed
                try:
                    await pg_conn.settle_commit(xact)  # a cancellation waits for the answer (see there)
                finally:
                    for collection, keys in tx._written.items():
                        self._invalidate(collection, keys)
                for table, rows in tx._loaded.items():  # committed: planner statistics for what it loaded
                    await self._load_stats.after_load(conn, table, rows)
                if tx._pruned:  # as after a store's prune_messages (VACUUM cannot run inside the transaction)
                    await self._vacuum(conn, index_cleanup=True)
        finally:
            self._leave_transaction(token)

    def _reset_after(self, conn: Any, tx: PgTransaction) -> None:
        """A connection that went through the escape hatch gets the pool's full reset when it is given back."""
        if tx._hatch_used:
            self._quiet.discard(conn.get_server_pid())

    async def _rollback(self, xact: Any) -> None:
        try:
            await xact.rollback()
        except DRIVER_ERRORS as exc:  # the connection is gone: the server rolled back already
            log.debug("%s: rollback failed (%s); the server discards the transaction", self._target, exc)


class _Borrowed:
    """A connection borrowed for one operation: the lane when it is free (see postgres/lane.py), else one from the
    pool. (A class, not a generator-based context manager: it runs on every call, and this is measurably cheaper.)

    While borrowed, the connection's server pid is in ``store._quiet`` so that the pool's reset hook skips the
    reset query. A driver error raised inside the block leaves it as the matching :mod:`storage.errors`
    exception, with the original as ``__cause__``.
    """

    __slots__ = ("_acquire", "_conn", "_lane", "_pid", "_store", "_what")

    def __init__(self, store: PostgresBackend, what: str, lane: bool) -> None:
        self._store = store
        self._what = what
        self._lane = lane
        self._acquire: Any = None
        self._conn: Any = None
        self._pid = 0

    async def __aenter__(self) -> Any:
        store = self._store
        lane = store._lane
        if self._lane:
            conn = lane.take_nowait()
            if conn is not None:
                self._conn = conn
                return conn
            try:
                conn = await lane.take()
            except BaseException as exc:
                if is_driver_error(exc):
                    raise store._acquire_error(exc, self._what) from exc
                raise
            if conn is not None:
                self._conn = conn
                return conn
            self._lane = False  # busy or closed: borrow from the pool instead
        await lane.make_room()
        self._acquire = store.pool.acquire(timeout=store.config.command_timeout)
        try:
            conn = self._conn = await self._acquire.__aenter__()
        except BaseException as exc:
            if is_driver_error(exc):
                raise store._acquire_error(exc, self._what) from exc
            raise
        self._pid = conn.get_server_pid()
        store._quiet.add(self._pid)
        return conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        store = self._store
        if self._lane:
            lane = store._lane
            if lane.keep(self._conn, exc):
                return
            await lane.give_back(self._conn, exc)
            if is_driver_error(exc):
                raise store._translate(exc, self._what) from exc
            return
        try:
            if pg_conn.unsafe_after(exc):
                # The connection may be waiting on a server that does not answer, or asyncpg lost track of the
                # protocol (see postgres/conn.py): the pool must never hand it out again, nor wait on it.
                pg_conn.abandon(self._conn)
            try:
                await self._acquire.__aexit__(exc_type, exc, tb)
            except DRIVER_ERRORS as release_exc:
                if exc is None:
                    raise store._translate(release_exc, self._what) from release_exc
                log.debug("%s: releasing a connection failed too: %s", store._target, release_exc)
        finally:
            store._quiet.discard(self._pid)
        if is_driver_error(exc):
            raise store._translate(exc, self._what) from exc


#: Records per ``COPY`` when a restore replaces the messages.
RESTORE_COPY_ROWS = 10_000
#: Backed-up records from which a restore's ``COPY`` rows are read and encoded in a child process (storage/child.py,
#: postgres/copy_child.py): a thread encoding 1M records (Python, seconds) kept the event loop waiting 20-30 ms at a
#: time on a busy 2-core host; starting the child costs ~0.3 s of another core.
CHILD_COPY_RECORDS = 50_000


def _next_copy_data(batches: Iterator[list[dict[str, Any]]], encoder: RowEncoder,
                    rows: int = RESTORE_COPY_ROWS) -> bytes | None:
    """The next ``rows`` or more records' ``COPY`` rows, in id order, or None at the end (in a worker thread).

    The batches come small (decoded a few dozen at a time: ``backup.messages.DECODE_GROUP``) and each is encoded
    as it comes, so only rows are held: 10k decoded records held at once were ~40k containers, and the full
    collections they set off in this thread (85 in a restore of 1M, up to 48 ms each) held the GIL the event loop
    needs. The rows are keyed bytes (the id in 8 big-endian bytes first: they sort in id order), not ``(id, row)``
    tuples: a tuple is one more container allocation per record, and every 700 of those run a young collection,
    which moves whatever else is alive then (the loop's handles and futures, the group being decoded) on towards
    the oldest generation.
    """
    keyed: list[bytes] = []
    for batch in batches:
        keyed += map(encoder.record_keyed, batch)
        if len(keyed) >= rows:
            break
    if not keyed:
        return None
    keyed.sort()
    return b"".join([row[KEY_SIZE:] for row in keyed])


def _describe(exc: BaseException) -> str:
    """An earlier failure, for a message (a timeout's or a cancellation's own text is empty)."""
    if pg_conn.abandons(exc):
        return f"{type(exc).__name__}: cancelled or timed out, the connection was abandoned"
    return str(exc) or type(exc).__name__


class PgTransaction(PgTxLifecycle, TransactionBase):
    """What ``store.transaction()`` yields: the document operations on the transaction's own connection.

    Calls on one transaction are serialized (a connection runs one statement at a time), so it is safe to use it
    from several coroutines. After a statement fails the transaction can only be rolled back: later calls raise
    :class:`storage.TransactionError`, and so does leaving the block normally.
    """

    _store: PostgresBackend

    def __init__(self, store: PostgresBackend, connection: Any, *, locking_reads: bool = True) -> None:
        super().__init__(store)
        self._locking_reads = locking_reads
        self._connection = connection
        self._hatch_used = False
        self._failed: BaseException | None = None
        self._lock = asyncio.Lock()
        #: keys written, per collection, for the cache after the commit: dicts of ``None`` rather than sets, which
        #: the garbage collector does not track (a restore's 100k keys were 100k referents every full collection walked)
        self._written: dict[str, dict[str, None]] = {}
        #: ``(collection, key)`` of deletes whose notifications are not sent yet, in order (see :meth:`_delete`)
        self._unsent: list[tuple[str, str]] = []
        #: every notification this transaction sent, so that none repeats another (postgres/notify.py)
        self._sent = notify.Distinct()
        self._loaded: dict[str, int] = {}  # bulk rows per table, ANALYZEd after the commit (postgres/analyze.py)
        self._abandoned = False  # a statement was cancelled or timed out: the connection was terminated
        self._used = False  # a statement ran: too late to change the isolation level
        #: After :meth:`pin_snapshot`: the exported snapshot, which another connection can read in too (a backup
        #: reads the messages that way, see PgMessagesMixin._scan_messages).
        self.snapshot_id: str | None = None

    @property
    def connection(self) -> Any:
        """The transaction's asyncpg connection: an escape hatch (DDL, hand-written SQL) inside this transaction.

        If a statement run on it fails, PostgreSQL aborts the whole transaction: leaving the block then raises
        :class:`storage.TransactionError` instead of committing (nothing is written).
        """
        self._hatch_used = True
        return self._connection

    async def _check_not_aborted(self) -> None:
        """Before commit, when the escape hatch was used: a failed statement there aborted the transaction, and
        ``COMMIT`` would silently roll back. One cheap statement finds out."""
        if self._failed is None and self._hatch_used:
            async with self._use("commit"):
                await self._connection.execute("SELECT 1")

    def _finish(self) -> None:
        self._end()

    @asynccontextmanager
    async def _use(self, what: str) -> AsyncIterator[Any]:
        async with self._lock:
            if self._failed is not None:
                raise TransactionError(f"{what}: the transaction was aborted by an earlier error "
                                       f"({_describe(self._failed)}); "
                                       "leave the block to roll it back") from self._failed
            self._used = True
            try:
                if self._unsent and what != "delete":  # the deletes' notifications go before anything else's
                    await self._send_unsent()
                yield self._connection
            except BaseException as exc:
                if pg_conn.abandons(exc):
                    # Cancelled or timed out mid-statement: PostgreSQL aborts the transaction anyway, and waiting
                    # for it to say so could take forever on a frozen server (see postgres/conn.py).
                    self._failed, self._abandoned = exc, True
                    pg_conn.abandon(self._connection)
                elif is_driver_error(exc):
                    self._failed = exc
                if is_driver_error(exc):
                    raise self._store._translate(exc, what) from exc
                raise

    replaces_messages = True  # _replace_messages below: a restore swaps documents and messages in one transaction

    async def pin_snapshot(self) -> str | None:
        """Make every read of this transaction see one snapshot (``REPEATABLE READ``); call it first. Returns the
        exported snapshot's id, in which a message scan on another connection reads the same instant.

        What a consistent export (a backup, a copy) needs: reads no longer lock, and a concurrent writer is never
        blocked; a write of this transaction that conflicts with a concurrent one raises TransactionError.
        """
        self._guard_read()
        if self._locking_reads:
            if self._used:
                raise TransactionError("pin_snapshot() must come before any other call in the transaction")
            async with self._use("pin_snapshot") as conn:
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            self._locking_reads = False
        # else opened with isolation="repeatable_read" or "serializable" already
        if self.snapshot_id is None:
            async with self._use("pin_snapshot") as conn:
                self.snapshot_id = await conn.fetchval("SELECT pg_export_snapshot()")
        return self.snapshot_id

    async def _replace_messages(self, batches: Iterable[list[dict[str, Any]]]) -> int:
        """Delete every message and insert ``batches`` (records already checked, normalized, ids unique) in this
        transaction, so that a restore swaps the documents and the messages together or not at all. Returns how
        many were inserted. (The old rows are dead until autovacuum, which a whole-table delete wakes up soon.)"""
        self._guard_write()
        encoder = RowEncoder()
        inserted = sent = 0
        async with self._use("restoring messages") as conn:
            await conn.execute("DELETE FROM storage_messages")

            async def copy(data: bytes) -> None:
                nonlocal inserted
                status: str = await conn.copy_to_table("storage_messages", source=replay([data]), columns=COLUMNS,
                                                       format="binary")
                inserted += int(status.rsplit(" ", 1)[1])

            rest: Iterator[list[dict[str, Any]]]
            if isinstance(batches, Recipe) and batches.count >= CHILD_COPY_RECORDS:
                # read and encoded in a child process (storage/child.py): this thread only passes the rows on
                chunks = child_items("storage.backends.postgres.copy_child:copy_chunks", *batches.recipe())
                rest = iter(())
                try:
                    while (item := await off_loop(next, chunks, None)) is not None:
                        await copy(item[1])
                        sent += item[0]
                        batches.done(item[0])
                except ChildLost:  # the rest here (its errors too), from where the child stopped
                    rest = batches.after(sent)
                finally:
                    await off_loop(chunks.close)
            else:
                rest = iter(batches)
            # Reading a batch from the backup file and encoding it (10k records) held the loop ~130 ms: a worker
            # thread does both, one batch at a time (nothing else uses the iterator or the encoder meanwhile).
            while (data := await off_loop(_next_copy_data, rest, encoder)) is not None:
                await copy(data)
        self._note_load("storage_messages", inserted)
        return inserted

    def _note_load(self, table: str, rows: int) -> None:
        if rows >= BULK_ROWS:
            self._loaded[table] = self._loaded.get(table, 0) + rows

    async def collections(self) -> list[str]:
        """The collections that hold documents, as this transaction sees them."""
        self._guard_read()
        async with self._use("collections") as conn:
            return await sql.collections(conn, self._now())

    def _wrote(self, collection: str, keys: Any) -> None:
        self._written.setdefault(collection, {}).update(dict.fromkeys(keys))

    def _feed_channel(self) -> str:
        return self._store._channel

    async def _get(self, collection: str, key: str) -> Document | None:
        async with self._use("get") as conn:
            if self._locking_reads:
                return await sql.get_locked(conn, collection, key, self._now())
            return await sql.get(conn, collection, key, self._now())

    async def _get_many(self, collection: str, keys: list[str]) -> dict[str, Document]:
        async with self._use("get_many") as conn:
            if self._locking_reads:
                return await sql.get_many_locked(conn, collection, keys, self._now())
            return await sql.get_many(conn, collection, keys, self._now())

    async def _expiries(self, collection: str, keys: list[str] | None) -> dict[str, datetime]:
        async with self._use("expiries") as conn:
            return await sql.expiries(conn, collection, keys, self._now())

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]],
                           expires: datetime | None = None) -> None:
        self._wrote(collection, (key for key, _ in items))
        async with self._use("put") as conn:
            await notify.put(conn, self._store._channel, collection, items, expires, sent=self._sent)
        self._note_load("storage_documents", len(items))

    async def _put_columns(self, collection: str, keys: list[str], encoded: list[bytes],
                           expires: datetime | None = None) -> None:
        self._wrote(collection, keys)
        async with self._use("put") as conn:
            await notify.put_columns(conn, self._store._channel, collection, keys, encoded, expires,
                                     sent=self._sent)
        self._note_load("storage_documents", len(keys))

    async def _delete(self, collection: str, key: str) -> bool:
        """Deletes notify together: their notifications wait in ``_unsent`` until the transaction's next other
        statement or its commit (:meth:`_use`), then go framed, ~170 keys a notification. Sent one per delete, a
        transaction deleting a 20k-member guild delivered 20k notifications at its commit, and the listener's
        connection queued a callback per notification: loop iterations of thousands of callbacks (stalls of
        40-52 ms). Delivery is unchanged: PostgreSQL delivers a transaction's notifications at its commit, in
        the order sent, and nothing else is sent between them and the deletes they follow."""
        self._wrote(collection, (key,))
        async with self._use("delete") as conn:
            deleted = await sql.delete(conn, collection, key, self._now())
        if deleted:
            self._unsent.append((collection, key))
        return deleted

    async def _send_unsent(self) -> None:
        """Send the deletes' pending notifications (under ``_use``'s lock, on the transaction's connection)."""
        unsent, self._unsent = self._unsent, []
        start = 0
        while start < len(unsent):
            collection = unsent[start][0]
            end = start
            while end < len(unsent) and unsent[end][0] == collection:
                end += 1
            notes = await notify.framed(collection, [(key, None) for _, key in unsent[start:end]], delete=True)
            await notify.send(self._connection, self._store._channel, notes, self._sent)
            start = end

    async def _send_before_commit(self) -> None:
        """The deletes' notifications not sent yet, before the commit (a failure is recorded: rolled back)."""
        if self._unsent and self._failed is None:
            with contextlib.suppress(DatabaseError, TransactionError):
                async with self._use("commit"):
                    pass

    async def _update(self, collection: str, key: str, fn: UpdateFn, default: Document | None,
                      expires: datetime | None = None) -> Document:
        self._wrote(collection, (key,))
        async with self._use("update") as conn:
            doc = await sql.update(conn, collection, key, fn, default, in_transaction=True, now=self._now(),
                                   expires=expires)
            await self._store._notify_written(conn, collection, [(key, orjson.dumps(doc))], self._sent)
            return doc

    def _items(self, collection: str, prefix: str | None) -> AsyncIterator[tuple[str, Document]]:
        return _paged_items(self._use, collection, prefix, self._now)

    async def _count(self, collection: str) -> int:
        async with self._use("count") as conn:
            return await sql.count(conn, collection, self._now())

    async def _find(self, collection: str, query: Query) -> list[tuple[str, Document]]:
        indexed = await self._store._indexed_paths(collection, self._use) if query.order and query.limit else None
        text, params = pg_query.build_find(collection, query, indexed or frozenset(), self._now())
        async with self._use("find") as conn:
            return await pg_query.fetch_pairs(conn, text, params, query.limit)

    async def _count_where(self, collection: str, query: Query) -> int:
        text, params = pg_query.build_count(collection, query, self._now())
        async with self._use("count") as conn:
            n: int = await conn.fetchval(text, *params)
            return n

    async def _delete_where(self, collection: str, query: Query) -> int:
        # keys: to notify and invalidate
        text, params = pg_query.build_delete(collection, query, self._now(), returning=True)
        async with self._use("delete_many") as conn:
            deleted, keys = await pg_query.delete_rows(conn, text, params, returning=True)
            await notify.send(conn, self._store._channel, notify.payloads(collection, [(k, None) for k in keys],
                                                                          delete=True), self._sent)
        self._wrote(collection, keys)
        return deleted


async def _paged_items(use: Callable[[str], AbstractAsyncContextManager[Any]], collection: str,
                       prefix: str | None, now: Callable[[], datetime]) -> AsyncIterator[tuple[str, Document]]:
    """``items()`` one page of keys at a time, each page on a connection from ``use`` (the pool's or the tx's);
    the visibility of expiring documents is decided once, at the first page (the iteration is one instant)."""
    after = ""
    instant = now()
    while True:
        async with use("items") as conn:
            page = await sql.items_page(conn, collection, prefix, after, instant)
        loads = orjson.loads
        for index, (key, text) in enumerate(page):
            if index and not index % PAGE_TURN:
                await asyncio.sleep(0)  # what the caller does per document (a backup encodes it twice) runs here
            yield key, loads(text)  # decoded as it is handed on (see sql.items_page)
        if len(page) < sql.PAGE_SIZE:
            return
        after = page[-1][0]
