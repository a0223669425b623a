"""PostgreSQL servers for the tests: the machine's (``STORAGE_TEST_DSN``) or a throwaway one made with pgserver.

* :class:`Cluster` is a data directory initialized by ``pgserver.get_server`` (which also knows how to run
  PostgreSQL as root: through a ``pgserver`` system user) and then run with pgserver's ``pg_ctl`` on a TCP port of
  127.0.0.1, so that every way of configuring a DSN (URLs, ``PGHOST``..., ``DB_HOST``...) can reach it and a test
  can stop and start it at will (the fault tests restart their own cluster, never the shared one).
* :class:`TestServer` is what the session shares: a server and one database created for this pytest session (so
  that two sessions on the same machine server never meet), in which every test gets its own *schema*, selected
  through the DSN's ``search_path``. Every object the library creates lives in the search path's first schema, so
  a schema is as clean as a new database for it, and creating plus dropping one costs ~20 ms instead of ~300 ms
  for ``CREATE DATABASE`` + ``DROP DATABASE`` (on a suite that opens a few hundred Postgres stores, that is a
  minute per run). Connections a test forgot to close are terminated before its schema is dropped (found by the
  ``application_name`` that the DSN sets).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import uuid
import warnings
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import asyncpg

__all__ = ["ENV_DSN", "Cluster", "TestServer", "run_sync", "with_database", "with_params", "dsn_parts",
           "free_port"]

ENV_DSN = "STORAGE_TEST_DSN"
T = TypeVar("T")


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine on a private event loop (from synchronous fixtures; leaves the current loop alone)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database, safe=""), parts.query, parts.fragment))


def with_params(dsn: str, **params: str) -> str:
    parts = urlsplit(dsn)
    query = "&".join(p for p in (parts.query, urlencode(params)) if p)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def dsn_parts(dsn: str) -> dict[str, str]:
    """host, port, user, password, database of a TCP DSN (for the PG*/DB_* environment tests)."""
    parts = urlsplit(dsn)
    return {"host": parts.hostname or "127.0.0.1", "port": str(parts.port or 5432), "user": parts.username or "",
            "password": parts.password or "", "database": parts.path.lstrip("/")}


class Cluster:
    """A PostgreSQL data directory made by pgserver, served on ``127.0.0.1:<port>`` by pgserver's ``pg_ctl``."""

    def __init__(self, pgdata: Path, system_user: str | None, port: int, socket_dir: Path,
                 password: str | None, settings: dict[str, str]) -> None:
        self.pgdata = pgdata
        self.system_user = system_user
        self.port = port
        self.socket_dir = socket_dir
        self.password = password
        self.settings = settings
        self.running = False

    @classmethod
    def create(cls, base: Path, *, password: str | None = None, settings: dict[str, str] | None = None) -> Cluster:
        """``initdb`` through ``pgserver.get_server`` (trust auth on its unix socket), then serve on TCP.

        With ``password``, TCP connections need it (scram-sha-256): the wrong-password test needs a server
        that checks passwords, which the machine's trust-auth server does not.
        """
        with warnings.catch_warnings():  # platformdirs warns at import time when XDG_RUNTIME_DIR is unset
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import pgserver

        pgdata = base / "pgdata"
        server = pgserver.get_server(pgdata, cleanup_mode=None)  # we stop it ourselves (cleanup below)
        if password is not None:
            run_sync(_set_password(server.get_uri(), password))
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=server.system_user)
        if password is not None:
            hba = pgdata / "pg_hba.conf"
            hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))
        socket_dir.chmod(0o777)
        cluster = cls(pgdata, server.system_user, free_port(), socket_dir, password, settings or {})
        cluster.start()
        atexit.register(cluster.cleanup)  # if the session dies before its finalizers run
        return cluster

    def dsn(self, database: str = "postgres") -> str:
        auth = "postgres" + (f":{quote(self.password, safe='')}" if self.password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(database, safe='')}"

    def _pg_ctl(self, *args: str) -> None:
        import pgserver

        pgserver.pg_ctl(list(args), pgdata=self.pgdata, user=self.system_user, timeout=120)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir}"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._pg_ctl("-w", "-t", "60", "-l", str(self.pgdata / "log"), "-o", options, "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect everyone and shut down cleanly; ``immediate``: like a crash (recovery on start)."""
        self._pg_ctl("-w", "-t", "60", "-m", mode, "stop")
        self.running = False

    def cleanup(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.socket_dir, ignore_errors=True)


async def _set_password(uri: str, password: str) -> None:
    conn = await asyncpg.connect(uri)
    try:
        await conn.execute(f"ALTER ROLE postgres PASSWORD '{password}'")  # a test constant, not input
    finally:
        await conn.close()


class TestServer:
    """The session's server (``admin_dsn``: a database where it may create databases) and its own database."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, admin_dsn: str, cluster: Cluster | None) -> None:
        self.admin_dsn = admin_dsn
        self.cluster = cluster
        self.database = f"storage_tests_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.session_dsn = with_database(admin_dsn, self.database)
        self._names = itertools.count(1)

    @classmethod
    @contextlib.contextmanager
    def start(cls, base: Path) -> Iterator[TestServer]:
        env = os.environ.get(ENV_DSN, "").strip()
        cluster = None
        if env:
            admin = env
        else:
            # A throwaway server: durability settings off, it is deleted at the end anyway.
            cluster = Cluster.create(base, settings={"fsync": "off", "full_page_writes": "off"})
            admin = cluster.dsn()
        server = cls(admin, cluster)
        try:
            run_sync(server.create_database(server.database))
            yield server
        finally:
            try:
                run_sync(server.drop_database(server.database))
            finally:
                if cluster is not None:
                    cluster.cleanup()

    async def _admin(self, *statements: str, dsn: str | None = None) -> None:
        conn = await asyncpg.connect(dsn or self.admin_dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def create_database(self, name: str) -> None:
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')

    async def drop_database(self, name: str) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def new_schema(self) -> tuple[str, str]:
        """A fresh schema in the session database: its name and a DSN whose ``search_path`` selects it."""
        name = f"t{next(self._names)}"
        run_sync(self._admin(f"CREATE SCHEMA {name}", dsn=self.session_dsn))
        return name, with_params(self.session_dsn, search_path=name, application_name=f"storage-tests-{name}")

    def drop_schema(self, name: str) -> None:
        run_sync(self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = 'storage-tests-{name}' AND datname = current_database() "
            "AND pid <> pg_backend_pid()",
            f"DROP SCHEMA {name} CASCADE", dsn=self.session_dsn))

