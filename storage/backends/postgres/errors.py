"""Translating asyncpg and socket errors into :mod:`storage.errors`, at the Postgres backend's boundary.

The rule that matters most: an error means *retry later* (:class:`storage.ConnectionError`, the only thing
:func:`storage.safe_database_operation` retries) exactly when the server could not be reached or dropped us: a
refused or reset socket, a server restarting or shutting down ("the database system is starting up",
"terminating connection due to administrator command"), too many connections, a pool whose connections were
closed under it. Everything else is final: bad data is a :class:`ValidationError`, a failed or deadlocked
transaction a :class:`TransactionError`, the rest a :class:`DatabaseError`. The original exception is always the
``__cause__``.

Messages name where we tried to go (host, port, database, user) and never the password: they are built from the
redacted DSN, and any password that a driver message might echo is masked as well.
"""

from __future__ import annotations

import asyncio
import re
from typing import TypeGuard
from urllib.parse import parse_qs, unquote

import asyncpg

from ...dsn import dsn_user_and_rest, mask_secrets, scrub_exception
from ...errors import ConnectionError, DatabaseError, TransactionError, ValidationError

__all__ = ["DRIVER_ERRORS", "describe_target", "scrub_exception", "translate", "is_connection_error", "is_driver_error"]

#: What a call into asyncpg may raise that we translate. ``asyncio.TimeoutError`` (a connect timeout) is the
#: builtin ``TimeoutError``, an ``OSError``, only from Python 3.11 on: it is listed for 3.10.
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)



def is_driver_error(exc: BaseException | None) -> TypeGuard[BaseException]:
    """True for an error that :func:`translate` must turn into ours: one of :data:`DRIVER_ERRORS` that is not
    already a :class:`DatabaseError`. (``storage.ConnectionError`` and ``LockTimeoutError`` subclass builtins that
    are ``OSError``s, so a translated error passing back out through a ``with`` block would otherwise be wrapped a
    second time, burying the driver's error at ``__cause__.__cause__``.)"""
    return isinstance(exc, DRIVER_ERRORS) and not isinstance(exc, DatabaseError)


_CONNECTION_SQLSTATE_CLASSES = ("08",)  # connection exception
_CONNECTION_SQLSTATES = {
    "57P01",  # admin_shutdown: the server is stopping or restarting
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
    "57P05",  # idle_session_timeout: the server closed our idle connection
    "25P03",  # idle_in_transaction_session_timeout: likewise, and the connection is gone
    "53300",  # too_many_connections: transient by nature
}
_CLOSED_HINTS = ("connection is closed", "connection was closed", "pool is closed", "pool is closing",
                 "connection has been released", "the underlying connection is closed")


def describe_target(dsn: str | None) -> str:
    """``host:port/db as user`` for messages, from a DSN, without the password (unix sockets: their folder).

    Built on :func:`storage.dsn.split_userinfo` (the last ``@`` ends the user information), not on a URL parser,
    so that a password holding ``#``, ``/``, ``?`` or ``@`` is never mistaken for the host or the database."""
    if not dsn:
        return "<no dsn>"
    user, rest = dsn_user_and_rest(dsn)
    hosts = re.split(r"[/?#]", rest, maxsplit=1)[0]
    path, _, query_string = rest[len(hosts):].partition("#")[0].partition("?")
    query = parse_qs(query_string)
    if not hosts:  # postgresql:///db?host=/run/postgresql (a unix socket) or nothing: libpq's defaults
        hosts = (query.get("host") or ["localhost"])[0]
        port = (query.get("port") or [""])[0]
        hosts += f":{port}" if port else ""
    if "," not in hosts and not re.search(r":\d+$", hosts):
        hosts += ":5432"
    db = unquote(path.lstrip("/")) or (query.get("dbname") or [""])[0]
    user = unquote(user) or (query.get("user") or [""])[0]
    where = f"{hosts}/{db or '<default database>'}" + (f" as user {user}" if user else "")
    return mask_secrets(where, dsn)


def _mask(text: str, dsn: str | None) -> str:
    # A second line of defence: our messages are built without the password, but a driver's may echo the DSN or
    # the pieces of it that it could not parse (see storage.dsn).
    return mask_secrets(text, dsn)


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means the server could not be reached or the connection is gone (worth a retry)."""
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return True  # asyncpg's protocol state broke, seen when the server drops a session mid-query
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state.startswith(_CONNECTION_SQLSTATE_CLASSES) or state in _CONNECTION_SQLSTATES
    if isinstance(exc, asyncpg.InterfaceError):
        message = str(exc).lower()
        return any(hint in message for hint in _CLOSED_HINTS)
    return False


def translate(exc: BaseException, what: str, dsn: str | None) -> DatabaseError:
    """The :mod:`storage.errors` exception for a driver error raised while doing ``what`` (raise it ``from exc``)."""
    scrub_exception(exc, dsn)  # the __cause__ chain is printed with tracebacks: it must not hold the password
    detail = _mask(f"{type(exc).__name__}: {exc}", dsn)
    target = describe_target(dsn)
    if isinstance(exc, asyncio.TimeoutError):  # asyncpg's command timeout (the builtin TimeoutError on 3.11+)
        return ConnectionError(f"{what}: PostgreSQL at {target} did not answer within the command timeout "
                               "(StoreConfig.command_timeout, STORAGE_COMMAND_TIMEOUT); the connection was "
                               "abandoned; retry later")
    if is_connection_error(exc):
        return ConnectionError(f"{what}: PostgreSQL at {target} is unreachable or dropped the connection "
                               f"({detail}); retry later")
    state = getattr(exc, "sqlstate", None) or ""
    if state.startswith(("22", "23", "54")):  # data exception, integrity violation, program limit (too large)
        return ValidationError(f"{what}: PostgreSQL rejected the data ({detail})")
    if state.startswith("40"):  # serialization failure, deadlock detected
        return TransactionError(f"{what}: the transaction was rolled back by PostgreSQL ({detail}); retry it")
    if state == "25P02":
        return TransactionError(f"{what}: the transaction was aborted by an earlier error and can only be rolled "
                                f"back ({detail})")
    return DatabaseError(f"{what}: PostgreSQL at {target} failed ({detail})")
