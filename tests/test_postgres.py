"""What only the PostgreSQL backend promises, against a real server: configuration from every environment style,
transaction-pooler safety, parameterized SQL, clear connection errors, locking across processes, the message table.

The behaviour both backends share is in test_store_contract.py; these tests need a server (see tests/_pg.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import multiprocessing
import random
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

import storage
from storage import DatabaseError, StoreConfig, TransactionError, ValidationError
from storage.backends.postgres.lane import LaneState
from storage.backends.postgres.schema import SCHEMA_VERSION
from storage.backends.postgres.store import PgTransaction
from storage.stores import PostgresStore
from tests import _pg_child
from tests._pg import Cluster, TestServer, dsn_parts, free_port, run_sync, with_database

PASSWORD = "p@ss:w/rd%#?&ü-not-in-messages"
NASTY = [
    "'); DROP TABLE storage_documents; --",
    "\"; DROP TABLE storage_messages; --",
    "back\\slash \\' \\\" \\\\",
    "$1 $$ $tag$ :name %s %(x)s ? ' '' '''",
    "%_% LIKE '%'",
    "日本語 😀 ∑ \u200b \ufeff e\u0301",
    "line\nbreak\ttab\rreturn",
    "\U0010ffff max code point",
]


@pytest.fixture(scope="module")
def env_dsn(pg_server: TestServer) -> Iterator[str]:
    """A database of its own for the environment tests: their DSNs carry no schema, so they use ``public``."""
    name = pg_server.database + "_env"
    run_sync(pg_server.create_database(name))
    try:
        yield with_database(pg_server.session_dsn, name)
    finally:
        run_sync(pg_server.drop_database(name))


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server of this module's own that checks passwords (the shared test server may trust everyone)."""
    cluster = Cluster.create(tmp_path_factory.mktemp("pg-auth"), password=PASSWORD)
    try:
        yield cluster
    finally:
        cluster.cleanup()


def env_for(style: str, dsn: str) -> dict[str, str]:
    """The environment a deployment of ``style`` would have, plus decoys that a lower priority would pick."""
    p = dsn_parts(dsn)
    decoy = "postgresql://decoy:decoy@127.0.0.1:1/decoy"
    if style == "DATABASE_PUBLIC_URL":
        return {"DATABASE_PUBLIC_URL": dsn, "DATABASE_URL": decoy, "PGHOST": "decoy.invalid"}
    if style == "DATABASE_URL":
        return {"DATABASE_URL": dsn, "PGHOST": "decoy.invalid", "DB_HOST": "decoy.invalid"}
    if style == "PG":
        return {"PGHOST": p["host"], "PGPORT": p["port"], "PGUSER": p["user"], "PGPASSWORD": p["password"],
                "PGDATABASE": p["database"], "DB_HOST": "decoy.invalid"}
    return {"DB_HOST": p["host"], "DB_PORT": p["port"], "DB_USER": p["user"], "DB_PASSWORD": p["password"],
            "DB_NAME": p["database"]}


ENV_STYLES = ["DATABASE_PUBLIC_URL", "DATABASE_URL", "PG", "DB_"]


async def where_am_i(store: Any) -> tuple[str, int]:
    async with store.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT current_database(), inet_server_port()")
    return row[0], row[1]


# -- configuration from the environment ------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ENV_STYLES)
async def test_every_environment_style_connects(style: str, env_dsn: str):
    config = StoreConfig.from_env(env_for(style, env_dsn))
    assert config.backend == "postgres"
    async with storage.open_store(config=config) as store:
        key = f"env-{style}"
        await store.put("env", key, {"style": style})
        assert await store.get("env", key) == {"style": style}
        assert await where_am_i(store) == (dsn_parts(env_dsn)["database"], int(dsn_parts(env_dsn)["port"]))


@pytest.mark.parametrize("style", ENV_STYLES)
async def test_every_environment_style_passes_a_password_with_special_characters(style: str,
                                                                                  auth_cluster: Cluster):
    dsn = f"postgresql://postgres:{quote(PASSWORD, safe='')}@127.0.0.1:{auth_cluster.port}/postgres"
    env = env_for(style, dsn)
    if style in ("PG", "DB_"):  # variables hold the raw password; the config must quote it into the DSN
        env["PGPASSWORD" if style == "PG" else "DB_PASSWORD"] = PASSWORD
    config = StoreConfig.from_env(env)
    assert PASSWORD not in repr(config)
    async with storage.open_store(config=config) as store:
        await store.put("env", "k", {"ok": True})
        assert await store.get("env", "k") == {"ok": True}


async def test_pool_sizes_come_from_the_config(env_dsn: str):
    config = StoreConfig.from_env({"DATABASE_URL": env_dsn, "STORAGE_POOL_MIN": "2", "STORAGE_POOL_MAX": "3"})
    async with storage.open_store(config=config) as store:
        assert isinstance(store.pool, asyncpg.Pool)
        assert (store.pool.get_min_size(), store.pool.get_max_size()) == (2, 3)
        assert store.pool.get_size() >= 2  # pool_min connections are opened up front


# -- transaction poolers (pgbouncer) ---------------------------------------------------------------------------------
async def pooler_workload(store: Any) -> None:
    """Every kind of call, with ``DEALLOCATE ALL`` in between: a transaction pooler may run each transaction on
    another server connection, where statements prepared on the previous one do not exist."""

    async def pooler_switch() -> None:
        async with store.pool.acquire() as conn:
            await conn.execute("DEALLOCATE ALL")

    calls = [
        lambda: store.put("c", "a", {"n": 1}),
        lambda: store.get("c", "a"),
        lambda: store.put_many("c", {"b": {"n": 2}, "c": {"n": 3}}),
        lambda: store.get_many("c", ["a", "b"]),
        lambda: store.update("c", "a", lambda d: {"n": d["n"] + 1}),
        lambda: store.delete("c", "c"),
        lambda: store.count("c"),
        lambda: store.collections(),
        lambda: store.record_messages([message(i) for i in range(1, 4)]),
        lambda: store.record_messages([message(i) for i in range(2, 6)]),  # overlapping: the staging-table path
        lambda: store.update_message(2, {"reactions": 9}),
        lambda: store.top_authors(GUILD),
        lambda: store.message_counts(GUILD, by="day"),
    ]
    for call in calls:
        await call()
        await pooler_switch()
    assert [k async for k, _ in store.items("c")] == ["a", "b"]
    await pooler_switch()
    async with store.transaction() as tx:
        doc = await tx.get("c", "a")
        await tx.put("c", "a", {"n": doc["n"] * 10})
    await pooler_switch()
    assert await store.get("c", "a") == {"n": 20}
    assert await store.message_counts(GUILD) == 5


async def test_pgbouncer_flag_turns_the_statement_cache_off_and_survives_a_pooler(pg_dsn: str):
    env = {"DATABASE_URL": pg_dsn, "STORAGE_PGBOUNCER": "1", "STORAGE_POOL_MIN": "1", "STORAGE_POOL_MAX": "1"}
    config = StoreConfig.from_env(env)
    assert config.pgbouncer is True
    async with storage.open_store(config=config) as store:
        await pooler_workload(store)
        async with store.pool.acquire() as conn:  # the pool's only connection: the one every call used
            assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0


async def test_without_the_flag_a_pooler_breaks_prepared_statements(pg_dsn: str):
    """The control: the emulation above does bite a store that caches prepared statements."""
    config = StoreConfig(backend="postgres", dsn=pg_dsn, pool_min=1, pool_max=1, cache_ttl=0, source="tests")
    async with storage.open_store(config=config) as store:
        async with store.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") > 0
        with pytest.raises(DatabaseError, match="does not exist"):
            await pooler_workload(store)


# -- SQL is parameterized --------------------------------------------------------------------------------------------
async def test_injection_strings_round_trip_exactly(pg_store: PostgresStore):
    docs = {key: {"key": key, "all": NASTY, key: {"nested": [key, key[::-1]]}} for key in NASTY}
    await pg_store.put_many("things", docs)
    await pg_store.put("things", "single " + NASTY[0], {"v": NASTY[1]})
    for key, doc in docs.items():
        assert await pg_store.get("things", key) == doc
    assert await pg_store.get_many("things", NASTY) == docs
    assert [k async for k, _ in pg_store.items("things")] == sorted([*NASTY, "single " + NASTY[0]])
    for key in NASTY:
        assert [k async for k, _ in pg_store.items("things", prefix=key[:6])] == sorted(
            k for k in [*NASTY, "single " + NASTY[0]] if k.startswith(key[:6]))
        assert await pg_store.update("things", key, lambda d: {**d, "n": 1}) == {**docs[key], "n": 1}
    async with pg_store.transaction() as tx:
        assert await tx.get("things", NASTY[0]) == {**docs[NASTY[0]], "n": 1}
        assert await tx.delete("things", NASTY[1]) is True
    await pg_store.record_messages([
        {**message(i), "analysis": {"sentiment": text, "topics": [text, NASTY[0]]}, "note": text}
        for i, text in enumerate(NASTY, start=1)])
    stored = {r["message_id"]: r async for r in pg_store.scan_messages()}
    for i, text in enumerate(NASTY, start=1):
        assert stored[str(i)]["analysis"] == {"sentiment": text, "topics": [text, NASTY[0]]}
        assert stored[str(i)]["note"] == text
    assert (await pg_store.top_topics(GUILD, limit=1)) == [(NASTY[0], len(NASTY))]
    assert await pg_store.count("things") == len(NASTY)  # the tables are all still there
    assert await pg_store.message_counts(GUILD) == len(NASTY)


async def test_nul_never_reaches_the_server(pg_store: PostgresStore):
    with pytest.raises(ValidationError):
        await pg_store.put("things", "k", {"v": "a\x00b"})
    with pytest.raises(ValidationError):
        await pg_store.record_messages([{**message(1), "analysis": {"topics": ["a\x00"]}}])
    assert await pg_store.count("things") == 0 and await pg_store.message_counts(GUILD) == 0


# -- errors at open: clear, and never the password -------------------------------------------------------------------
def assert_names_target_not_password(exc: BaseException, port: int, database: str, password: str) -> None:
    text = str(exc)
    assert "127.0.0.1" in text and str(port) in text and database in text, text
    assert password not in text and quote(password, safe="") not in text, text
    assert exc.__cause__ is not None


async def test_wrong_password_is_a_clear_error_without_the_password(auth_cluster: Cluster):
    wrong = "Wr0ng-Secret-Passw0rd"
    dsn = f"postgresql://postgres:{wrong}@127.0.0.1:{auth_cluster.port}/postgres"
    with pytest.raises(DatabaseError) as info:
        await storage.open_store(backend="postgres", dsn=dsn)
    assert not isinstance(info.value, storage.ConnectionError)  # retrying will not fix a password
    assert "authentication failed" in str(info.value)
    assert_names_target_not_password(info.value, auth_cluster.port, "postgres", wrong)


async def test_unknown_user_and_unknown_database_are_clear_errors(pg_server: TestServer):
    p = dsn_parts(pg_server.session_dsn)
    port = int(p["port"])
    dsn = f"postgresql://no_such_user_x:S3cret-Value@{p['host']}:{port}/{p['database']}"
    with pytest.raises(DatabaseError, match=r"authentication failed|does not exist") as info:
        await storage.open_store(backend="postgres", dsn=dsn)
    assert_names_target_not_password(info.value, port, p["database"], "S3cret-Value")
    missing = with_database(pg_server.session_dsn, "no_such_database_x")
    with pytest.raises(DatabaseError, match="database does not exist") as info:
        await storage.open_store(backend="postgres", dsn=missing)
    assert_names_target_not_password(info.value, port, "no_such_database_x", "S3cret-Value")


async def test_unreachable_server_is_a_connection_error_naming_it():
    port = free_port()  # nothing listens there
    secret = "Hunter2-Secret-Value"
    with pytest.raises(storage.ConnectionError) as info:
        await storage.open_store(backend="postgres", dsn=f"postgresql://bot:{secret}@127.0.0.1:{port}/botdb")
    assert_names_target_not_password(info.value, port, "botdb", secret)
    assert isinstance(info.value, ConnectionError)  # the builtin too
    assert "is the server running" in str(info.value)


async def test_malformed_dsn_is_a_validation_error(pg_server: TestServer):
    with pytest.raises(ValidationError) as info:
        await storage.open_store(backend="postgres", dsn="postgresql://u:Sekrit-Pw@127.0.0.1:notaport/db")
    assert "Sekrit-Pw" not in str(info.value)


# -- schema ----------------------------------------------------------------------------------------------------------
async def test_concurrent_first_opens_create_the_schema_once(pg_config: StoreConfig):
    stores = await asyncio.gather(*(storage.open_store(config=pg_config) for _ in range(6)))
    try:
        await asyncio.gather(*(s.put("things", f"k{i}", {"i": i}) for i, s in enumerate(stores)))
        assert await stores[0].count("things") == 6
        async with stores[0].pool.acquire() as conn:
            assert await conn.fetchval("SELECT value FROM storage_meta WHERE name = 'schema_version'") == str(
                SCHEMA_VERSION)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_database_that_is_not_utf8_is_refused(pg_server: TestServer):
    name = pg_server.database + "_ascii"
    conn = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'SQL_ASCII\' '
                           "LC_COLLATE 'C' LC_CTYPE 'C'")
        with pytest.raises(DatabaseError, match="UTF8"):
            await storage.open_store(backend="postgres", dsn=with_database(pg_server.session_dsn, name))
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


# -- locking: update() and transactions across processes -------------------------------------------------------------
@pytest.mark.parametrize("how", ["update", "transaction"])
def test_four_processes_increment_one_key_exactly(pg_config: StoreConfig, how: str):
    per_process = 40
    fields = dataclasses.asdict(pg_config)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        done = pool.starmap(_pg_child.increment, [(fields, "hot", per_process, how)] * 4)
    assert done == [per_process] * 4

    async def read() -> Any:
        async with storage.open_store(config=pg_config) as s:
            return await s.get("counters", "hot")

    assert run_sync(read()) == {"n": 4 * per_process}


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "absent"])
async def test_a_transaction_read_blocks_other_writers_until_commit(pg_config: StoreConfig, pg_store: PostgresStore,
                                                                   exists: bool):
    if exists:
        await pg_store.put("counters", "k", {"n": 0})
    other = await storage.open_store(config=pg_config)
    try:
        async with pg_store.transaction() as tx:
            doc = await tx.get("counters", "k", {"n": 0})
            writer = asyncio.create_task(other.update("counters", "k", lambda d: {"n": d.get("n", 0) + 1}))
            await asyncio.sleep(0.3)
            assert not writer.done()  # waiting for our lock: it cannot have read the document yet
            await tx.put("counters", "k", {"n": doc["n"] + 10})
        assert await writer == {"n": 11}  # it ran after our commit, on our result
        assert await pg_store.get("counters", "k") == {"n": 11}
    finally:
        await other.close()


async def test_a_snapshot_transaction_reads_one_moment_and_blocks_nobody(pg_config: StoreConfig,
                                                                        pg_store: PostgresStore):
    await pg_store.put_many("things", {"a": {"n": 1}, "b": {"n": 2}})
    other = await storage.open_store(config=pg_config)
    try:
        async with pg_store.transaction(isolation="repeatable_read") as tx:
            assert await tx.count("things") == 2
            await other.put("things", "c", {"n": 3})  # not blocked, and not seen
            await other.update("things", "a", lambda d: {"n": 100})
            assert await tx.get("things", "a") == {"n": 1}
            assert [k async for k, _ in tx.items("things")] == ["a", "b"]
        async with pg_store.transaction() as tx:
            assert isinstance(tx, PgTransaction)
            await tx.pin_snapshot()
            assert await tx.collections() == ["things"]
            await other.put("more", "x", {})
            assert await tx.collections() == ["things"]
        async with pg_store.transaction() as tx:
            await tx.get("things", "a")
            with pytest.raises(TransactionError):
                await tx.pin_snapshot()  # too late: a statement already ran
    finally:
        await other.close()


async def test_transaction_connection_is_the_transaction(pg_store: PostgresStore):
    with pytest.raises(RuntimeError):
        async with pg_store.transaction() as tx:
            assert isinstance(tx, PgTransaction)
            await tx.connection.execute("CREATE TABLE escape_hatch_probe (x int)")
            await tx.put("things", "a", {})
            raise RuntimeError("roll back both")
    async with pg_store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT to_regclass('escape_hatch_probe')") is None
    assert await pg_store.get("things", "a") is None


async def test_a_failed_statement_aborts_the_transaction_clearly(pg_store: PostgresStore):
    with pytest.raises(TransactionError, match="rolled back"):
        async with pg_store.transaction() as tx:
            await tx.put("things", "a", {})
            with pytest.raises(asyncpg.DivisionByZeroError):
                await tx.connection.execute("SELECT 1 / 0")
            with pytest.raises(TransactionError, match="aborted"):
                await tx.put("things", "b", {})
    assert await pg_store.get("things", "a") is None


async def test_leaving_normally_after_a_swallowed_escape_hatch_error_does_not_pretend_to_commit(
        pg_store: PostgresStore):
    with pytest.raises(TransactionError, match="rolled back"):
        async with pg_store.transaction() as tx:
            await tx.put("things", "a", {})
            with pytest.raises(asyncpg.DivisionByZeroError):
                await tx.connection.execute("SELECT 1 / 0")
    assert await pg_store.get("things", "a") is None


async def test_concurrent_overlapping_put_many_never_deadlock(pg_config: StoreConfig):
    rnd = random.Random(7)
    batches = []
    for n in range(4):
        keys = [f"k{i:04d}" for i in range(n * 250, n * 250 + 500)]
        rnd.shuffle(keys)
        batches.append({k: {"writer": n} for k in keys})
    stores = [await storage.open_store(config=pg_config) for _ in batches]
    try:
        for _ in range(3):
            await asyncio.gather(*(s.put_many("things", b) for s, b in zip(stores, batches)))
        assert await stores[0].count("things") == 1250
    finally:
        await asyncio.gather(*(s.close() for s in stores))


@pytest.mark.parametrize("statement, expected", [
    ("SELECT 'abc'::int", ValidationError),  # data exception
    ("INSERT INTO storage_meta VALUES ('schema_version', '9')", ValidationError),  # unique violation
    ("SELEC 1", DatabaseError),  # a bug, not bad data and not the network
    ("SELECT pg_terminate_backend(pg_backend_pid())", storage.ConnectionError),  # the server drops us
])
async def test_server_errors_leave_the_store_translated_by_kind(pg_store: PostgresStore, statement: str,
                                                                expected: type[Exception]):
    with pytest.raises(DatabaseError) as info:
        async with pg_store.transaction() as tx:
            await tx.connection.execute(statement)
    assert type(info.value) is expected
    assert isinstance(info.value.__cause__, (asyncpg.PostgresError, asyncpg.InterfaceError))
    await pg_store.put("things", "after", {"ok": True})  # the store is fine afterwards
    assert await pg_store.get("things", "after") == {"ok": True}


# -- the cache -------------------------------------------------------------------------------------------------------
def outside_transaction(coro: Any) -> Any:
    """Run ``coro`` as a task that did not inherit the current task's open transaction (a task created inside the
    block inherits it, and the store refuses calls from it like from the block itself)."""
    return contextvars.Context().run(asyncio.ensure_future, coro)


async def test_cache_is_invalidated_by_this_stores_writes_and_commits(pg_config: StoreConfig):
    async with storage.open_store(config=dataclasses.replace(pg_config, cache_ttl=300)) as store:
        await store.put("things", "a", {"v": 1})
        assert await store.get("things", "a") == {"v": 1}  # now cached
        assert len(store._cache) == 1
        await store.put("things", "a", {"v": 2})
        assert await store.get("things", "a") == {"v": 2}
        await store.update("things", "a", lambda d: {"v": 3})
        assert await store.get("things", "a") == {"v": 3}
        async with store.transaction() as tx:
            await tx.put("things", "a", {"v": 4})
            assert await outside_transaction(store.get("things", "a")) == {"v": 3}  # not committed yet
        assert await store.get("things", "a") == {"v": 4}
        await store.delete("things", "a")
        assert await store.get("things", "a") is None


async def test_cache_is_off_by_default_and_a_ttl_trades_freshness_for_speed(pg_config: StoreConfig):
    assert pg_config.cache_ttl == 0
    cached = dataclasses.replace(pg_config, cache_ttl=300)
    async with storage.open_store(config=cached) as reader, storage.open_store(config=pg_config) as writer:
        await writer.put("things", "a", {"v": 1})
        assert await reader.get("things", "a") == {"v": 1}
        await writer.put("things", "a", {"v": 2})
        assert await reader.get("things", "a") == {"v": 1}  # documented: stale until the entry expires
        assert await reader.get_many("things", ["a"]) == {"a": {"v": 2}}  # only get() is cached
        assert await reader.update("things", "a", lambda d: {"v": d["v"] + 1}) == {"v": 3}  # never stale


async def test_with_cache_ttl_zero_another_process_write_is_seen_at_once(pg_config: StoreConfig):
    # exact: no read cache at all (the default coherent cache may serve the old value until the change's
    # notification arrives, a few milliseconds: tests/test_feed.py tests that bound)
    exact = dataclasses.replace(pg_config, cache_ttl=0, cache="off")
    async with storage.open_store(config=exact) as reader, storage.open_store(config=exact) as writer:
        await writer.put("things", "a", {"v": 1})
        assert await reader.get("things", "a") == {"v": 1}
        await writer.put("things", "a", {"v": 2})
        assert await reader.get("things", "a") == {"v": 2}


# -- faults in use ---------------------------------------------------------------------------------------------------
async def test_a_pool_closed_under_the_store_raises_connection_error(pg_store: PostgresStore):
    await pg_store.pool.close()
    with pytest.raises(storage.ConnectionError) as info:
        await pg_store.get("things", "a")
    assert isinstance(info.value.__cause__, asyncpg.InterfaceError)


async def test_killed_connections_are_replaced_by_the_pool(pg_store: PostgresStore):
    await pg_store.put("things", "a", {"v": 1})
    killer = await asyncpg.connect(pg_store.config.dsn)  # same application_name as the store's connections
    try:
        killed = await killer.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = current_setting('application_name') AND pid <> pg_backend_pid()")
    finally:
        await killer.close()
    assert killed >= 1
    got = await storage.safe_database_operation(pg_store.get_many, "things", ["a"], retry_delay=0.05)
    assert got == {"a": {"v": 1}}
    assert await pg_store.get("things", "a") == {"v": 1}


# -- the lane: one pool connection kept between operations -------------------------------------------------------
async def backend_pids(store: PostgresStore, calls: int) -> set[int]:
    """The server pids that ``calls`` sequential one-statement operations ran on."""
    pids = set()
    for _ in range(calls):
        async with store._connection("test") as conn:
            pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
    return pids


async def test_sequential_calls_reuse_one_connection_and_concurrent_ones_spread(pg_config: StoreConfig):
    async with storage.open_store(config=dataclasses.replace(pg_config, pool_min=0, pool_max=4)) as store:
        assert len(await backend_pids(store, 20)) == 1
        before = store.pool.get_size()
        await asyncio.gather(*(store.put("things", f"k{i}", {"i": i}) for i in range(40)))
        assert store.pool.get_size() > 1 or before > 1  # the lane was busy: the others borrowed from the pool
        assert {k: d["i"] async for k, d in store.items("things")} == {f"k{i}": i for i in range(40)}


async def test_the_lane_is_taken_kept_and_given_back_after_trouble(pg_config: StoreConfig):
    async with storage.open_store(config=dataclasses.replace(pg_config, pool_min=0, pool_max=4)) as store:
        lane = store._lane
        assert lane.state is LaneState.EMPTY  # nothing taken yet
        async with store._connection("test") as conn:
            assert lane.state is LaneState.BUSY and lane.connection is conn
            async with store._connection("test") as other:  # meanwhile: from the pool
                assert other is not conn
        assert lane.state is LaneState.IDLE and lane.connection is conn
        pid = lane.pid
        with pytest.raises(ZeroDivisionError):
            async with store._connection("test"):
                raise ZeroDivisionError  # any exception: back to the pool, with its full reset
        assert lane.state is LaneState.EMPTY and lane.connection is None
        assert store.pool.get_idle_size() == store.pool.get_size() == 2  # both back in the pool
        assert pid not in store._quiet  # so the pool's reset query runs on it
        async with store._connection("test") as conn:
            await conn.execute("BEGIN")  # a transaction left open: back to the pool, which rolls it back
            opened = lane.pid
        assert lane.state is LaneState.EMPTY
        watcher = await asyncpg.connect(pg_config.dsn)
        try:
            state = await watcher.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", opened)
        finally:
            await watcher.close()
        assert state == "idle"  # not "idle in transaction"
        async with store._connection("test") as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == lane.pid
        assert lane.state is LaneState.IDLE and lane.pid in store._quiet
    assert lane.state is LaneState.CLOSED


async def test_closing_while_a_call_holds_the_lane_gives_it_back_when_the_call_ends(
        pg_config: StoreConfig, caplog: pytest.LogCaptureFixture):
    store = await storage.open_store(config=pg_config)
    started = asyncio.Event()

    async def call() -> int:
        async with store._connection("test") as conn:
            started.set()
            return int(await conn.fetchval("SELECT 1 FROM pg_sleep(0.2)"))

    task = asyncio.ensure_future(call())
    await started.wait()
    assert store._lane.state is LaneState.BUSY
    await store.close()  # waits for the call, which gives the lane back on its way out
    assert await task == 1
    assert store._lane.state is LaneState.CLOSED
    assert "terminating its connections" not in caplog.text
    assert store.pool.get_size() == 0


async def test_a_pool_of_one_has_no_lane_and_still_serves_everything(pg_config: StoreConfig):
    async with storage.open_store(config=dataclasses.replace(pg_config, pool_min=1, pool_max=1)) as store:
        assert store._lane.state is LaneState.CLOSED
        async with store.transaction() as tx:
            await tx.put("things", "a", {"v": 1})
        await asyncio.gather(*(store.update("things", "a", lambda d: {"v": d["v"] + 1}) for _ in range(10)))
        assert await store.get("things", "a") == {"v": 11}


async def test_a_long_transaction_does_not_hold_the_lane(pg_config: StoreConfig):
    async with storage.open_store(config=dataclasses.replace(pg_config, pool_min=0, pool_max=2)) as store:
        await store.put("things", "a", {"v": 1})
        async with store.transaction() as tx:  # one connection for as long as the caller likes
            await tx.put("things", "b", {"v": 2})
            for _ in range(5):  # the other one: the lane (another task's reads; this one's would be refused)
                assert await outside_transaction(store.get("things", "a")) == {"v": 1}
        assert await store.get("things", "b") == {"v": 2}


async def test_a_cancelled_call_on_the_lane_leaves_nothing_half_done(pg_store: PostgresStore):
    batch = [message(i) for i in range(1, 30_001)]
    task = asyncio.ensure_future(pg_store.record_messages(batch))
    for _ in range(500):  # until the COPY is under way
        await asyncio.sleep(0.002)
        if pg_store._lane.state is LaneState.BUSY:
            break
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pg_store.message_counts(GUILD) in (0, 30_000)  # the COPY's transaction: all or nothing
    assert await pg_store.record_messages(batch[:10]) in (0, 10)
    await pg_store.put("things", "after", {"ok": True})
    assert await pg_store.get("things", "after") == {"ok": True}


async def test_a_lane_whose_session_is_killed_while_idle_is_replaced(pg_config: StoreConfig):
    async with storage.open_store(config=pg_config) as store:
        await store.put("things", "a", {"v": 1})
        killer = await asyncpg.connect(pg_config.dsn)
        try:
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", store._lane.pid)
        finally:
            await killer.close()
        for _ in range(200):  # asyncpg sees the socket close and calls the termination listener
            if store._lane.state is LaneState.EMPTY:
                break
            await asyncio.sleep(0.01)
        assert store._lane.state is LaneState.EMPTY
        assert await storage.safe_database_operation(store.get, "things", "a", retry_delay=0.05) == {"v": 1}
        assert store._lane.state is LaneState.IDLE  # a fresh one


async def test_closing_gives_the_lane_back_without_waiting(pg_config: StoreConfig, caplog: pytest.LogCaptureFixture):
    store = await storage.open_store(config=pg_config)
    await store.put("things", "a", {"v": 1})
    assert store._lane.state is LaneState.IDLE
    await store.close()
    # a lane not given back makes the pool wait CLOSE_TIMEOUT for it, then terminate its connections and say so
    assert "terminating its connections" not in caplog.text
    assert store.pool.get_size() == 0


# -- messages --------------------------------------------------------------------------------------------------------
GUILD = "987654321"


def message(i: int, **fields: Any) -> dict[str, Any]:
    return {"message_id": i, "channel_id": 10 + i % 3, "author_id": 100 + i % 4, "guild_id": GUILD,
            "timestamp": f"2024-01-01T00:00:{i % 60:02d}Z", "content_length": i, **fields}


async def test_message_ids_use_the_whole_unsigned_64_bit_range(pg_store: PostgresStore):
    ids = [1, 9, 10, 2**63 - 1, 2**63, 2**64 - 1]
    records = [{**message(1), "message_id": i, "author_id": i, "channel_id": i} for i in ids]
    assert await pg_store.record_messages(records) == len(ids)
    scanned = [r async for r in pg_store.scan_messages(GUILD)]
    assert [r["message_id"] for r in scanned] == [str(i) for i in ids]  # numeric order within a timestamp
    assert {r["author_id"] for r in scanned} == {str(i) for i in ids}
    assert await pg_store.top_authors(GUILD, limit=3) == sorted((str(i), 1) for i in ids)[:3]  # ties: as text
    async with pg_store.pool.acquire() as conn:
        shown = await conn.fetch("SELECT message_id FROM storage_message_records ORDER BY message_id")
    assert [int(row[0]) for row in shown] == ids
    assert await pg_store.update_message(2**64 - 1, {"reactions": 7}) is True


async def test_records_round_trip_with_extra_fields_and_odd_analysis(pg_store: PostgresStore):
    records = [
        message(1),
        message(2, analysis={"sentiment": None, "topics": ["a"]}),
        message(3, analysis={"topics": [], "score": 0.5, "labels": {"x": [1, None]}}),
        message(4, analysis={"sentiment": "positive"}, edited=True, attachments_meta=[{"size": 3}]),
        message(5, timestamp="2024-02-29T23:59:59.000001+00:00", reactions=2**63 - 1),
    ]
    assert await pg_store.record_messages(records) == 5
    from storage.messages.records import normalize_messages

    expected = {r["message_id"]: r for r in normalize_messages(records)}
    assert {r["message_id"]: r async for r in pg_store.scan_messages()} == expected


async def test_duplicates_against_stored_ids_are_skipped_in_one_batch(pg_store: PostgresStore):
    assert await pg_store.record_messages([message(i) for i in range(1, 101)]) == 100
    assert await pg_store.record_messages([message(i, content_length=999) for i in range(50, 201)]) == 100
    assert await pg_store.message_counts(GUILD) == 200
    first = [r async for r in pg_store.scan_messages(GUILD) if r["message_id"] == "50"]
    assert first[0]["content_length"] == 50  # the stored record won
    assert await pg_store.record_message(message(7)) is False
    assert await pg_store.record_message(message(1000)) is True


async def test_concurrent_overlapping_batches_count_each_message_once(pg_config: StoreConfig):
    rnd = random.Random(5)
    batches = []
    for n in range(4):  # 1..600, 301..900, 601..1200, 901..1500, each shuffled
        ids = list(range(1 + n * 300, 601 + n * 300))
        rnd.shuffle(ids)
        batches.append([message(i) for i in ids])
    stores = [await storage.open_store(config=pg_config) for _ in batches]
    try:
        counts = await asyncio.gather(*(s.record_messages(b) for s, b in zip(stores, batches)))
        assert sum(counts) == 1500
        assert await stores[0].message_counts(GUILD) == 1500
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_counter_too_large_for_bigint_is_refused_and_nothing_written(pg_store: PostgresStore):
    with pytest.raises(ValidationError) as info:
        await pg_store.record_messages([message(1), message(2, reactions=2**63)])
    assert info.value.field == "reactions"
    assert await pg_store.message_counts(GUILD) == 0


async def test_scan_streams_with_a_cursor(pg_store: PostgresStore):
    await pg_store.record_messages([message(i) for i in range(1, 5001)])
    seen = 0
    async for _record in pg_store.scan_messages(GUILD):
        seen += 1
        if seen == 1:  # the scan's connection sits in its transaction, between two fetches of its cursor
            async with pg_store.pool.acquire() as conn:
                scanning = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = current_setting("
                    "'application_name') AND state = 'idle in transaction' AND query LIKE '%FROM storage_scan%'")
            assert scanning == 1
    assert seen == 5000
