"""Fixtures shared by the suite: one ``store`` fixture parameterized over every backend.

Every behaviour of the Store runs on each backend in ``BACKENDS`` through the same tests; a backend is done when
the conformance tests pass on it unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

import storage
from storage import StoreConfig
from storage.backends.json import holding, offsets
from storage.stores import PostgresStore
from tests._pg import TestServer

BACKENDS = ["json", "postgres"]


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    """The session's PostgreSQL: ``STORAGE_TEST_DSN``'s server, or a throwaway one started with pgserver."""
    with TestServer.start(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: TestServer) -> Iterator[str]:
    """A DSN to storage of this test's own (an empty schema, dropped afterwards; see tests/_pg.py)."""
    name, dsn = pg_server.new_schema()
    try:
        yield dsn
    finally:
        pg_server.drop_schema(name)


@pytest.fixture
def pg_config(pg_dsn: str) -> StoreConfig:
    """A PostgreSQL config on this test's own empty schema (for the Postgres-only tests)."""
    return StoreConfig(backend="postgres", dsn=pg_dsn, source="tests")


@pytest.fixture
async def pg_store(pg_config: StoreConfig) -> AsyncIterator[PostgresStore]:
    """A PostgresStore opened on ``pg_config`` (directly, not through open_store), closed afterwards."""
    s = await PostgresStore.open(pg_config)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_config(backend: str, tmp_path, request: pytest.FixtureRequest) -> StoreConfig:
    """A config pointing at fresh, empty storage for this test."""
    if backend == "json":
        return StoreConfig(backend="json", path=str(tmp_path / "data"), backup_dir=str(tmp_path / "backups"),
                           lock_timeout=30, source="tests")
    dsn: str = request.getfixturevalue("pg_dsn")
    return StoreConfig(backend="postgres", dsn=dsn, backup_dir=str(tmp_path / "backups"), source="tests")


@pytest.fixture
async def store(store_config: StoreConfig) -> AsyncIterator[storage.Store]:
    s = await storage.open_store(config=store_config)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def reopen(store_config: StoreConfig) -> Callable[[], Awaitable[storage.Store]]:
    """Open another store on the same data (another "process" in-process: own locks, own memory)."""

    async def _open() -> storage.Store:
        return await storage.open_store(config=store_config)

    return _open


@pytest.fixture(autouse=True)
def offers_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON: a writer waiting for another store's lock always offers its record to the holder (json/slots.py),
    however fast this disk's fsyncs are (``holding.OFFER_MIN_SYNC`` = 0 in this process; tests/_fault_child.py and
    tests/_slots_child.py do the same in theirs), so that the suite runs the cross-process group commit wherever two
    stores meet; tests/test_json_slots.py checks the threshold itself."""
    monkeypatch.setattr(holding, "OFFER_MIN_SYNC", 0.0)


@pytest.fixture
def sidecar_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON: every snapshot gets its key -> offset sidecar however small it is (``offsets.MIN_SNAPSHOT_BYTES`` = 0
    in this process), so that the lazy open is tested on small stores. A child process sets it itself."""
    monkeypatch.setattr(offsets, "MIN_SNAPSHOT_BYTES", 0)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--postgres-only", action="store_true",
        help="run only the tests that talk to the session's PostgreSQL (CI's run against a second server: the "
             "JSON-only tests would only repeat the first run)")


def talks_to_postgres(item: pytest.Item) -> bool:
    """Whether a test uses the session's PostgreSQL: it asks for ``pg_server`` (directly or through ``pg_dsn``,
    ``pg_config``, ``pg_store``), it is the PostgreSQL instance of a parameterized test (``store_config`` asks
    for ``pg_dsn`` only then), or its name says PostgreSQL (a test that moves data between the backends asks for
    ``pg_dsn`` in its body). Over-inclusive on purpose: a test wrongly kept costs seconds, one wrongly left out a
    server's coverage. Checked against a full run that logged every test touching the session's server."""
    if "pg_server" in getattr(item, "fixturenames", ()) or "postgres" in item.name:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "postgres" in callspec.id


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--postgres-only"):
        return
    kept = [item for item in items if talks_to_postgres(item)]
    config.hook.pytest_deselected(items=[item for item in items if not talks_to_postgres(item)])
    items[:] = kept
