"""Where the data lives, resolved from the environment the way Railway and local development set it.

Resolution order (first match wins), as documented in ``DESIGN.md``:

1. ``STORAGE_BACKEND`` = ``json`` | ``postgres`` forces the backend (``postgres`` still takes its DSN from 2-4).
2. ``DATABASE_PUBLIC_URL``, then ``DATABASE_URL``.
3. Railway's ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``.
4. Local ``DB_HOST``, ``DB_PORT``, ``DB_USER``, ``DB_PASSWORD``, ``DB_NAME``.
5. Otherwise the JSON backend in ``STORAGE_PATH`` (default ``./config``).

Also read: ``STORAGE_POOL_MIN``/``STORAGE_POOL_MAX`` (asyncpg pool sizes), ``STORAGE_PGBOUNCER=1`` (no prepared
statement cache, for transaction poolers), ``STORAGE_BACKUP_DIR`` (default ``./backups``) and
``STORAGE_BACKUP_KEEP`` (how many backups retention keeps), ``STORAGE_BACKUP_EXTRA`` (files outside the data
folder to include in backups), ``STORAGE_CACHE_TTL`` (seconds; PostgreSQL ``get``
cache, off by default: with it on, another process's write to a key this process read recently is seen only
after the entry expires), ``STORAGE_CACHE`` (``coherent``, the default on PostgreSQL where LISTEN works: a ``get``
cache every process's commits invalidate; ``ttl``: the ``STORAGE_CACHE_TTL`` one, picked when only that is set;
``off``), ``STORAGE_CACHE_SIZE`` (entries, default 100000), ``STORAGE_LISTEN_DSN`` (a direct connection for
LISTEN when the main DSN goes through PgBouncer), ``STORAGE_COMMAND_TIMEOUT`` (seconds, default 60: the longest
any one wait on the PostgreSQL server may take, a statement or a connection from the pool, before the call fails with
:class:`storage.ConnectionError` and a frozen connection is abandoned).

:meth:`StoreConfig.for_location` takes every one of these settings from the environment but the location, which the
caller names (``copy --to URL``, ``restore --into URL``).

A password never appears in ``repr``, logs or error messages: use :attr:`StoreConfig.safe_dsn` for display.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Literal
from urllib.parse import quote

from .dsn import dsn_identity, redact_dsn
from .errors import ValidationError

__all__ = ["StoreConfig", "redact_dsn", "backup_settings"]

Backend = Literal["json", "postgres"]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_URL_START = re.compile(r"(?i)postgres(?:ql)?://")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be an integer, got {raw!r}", field=name) from None
    if value < minimum:
        raise ValidationError(f"{name} must be >= {minimum}, got {value}", field=name)
    return value


def _seconds(env: Mapping[str, str], name: str, default: float, *, zero: bool) -> float:
    """A duration in seconds, fractions allowed (``STORAGE_CACHE_TTL=2.5``); ``zero``: whether 0 (off) is allowed."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError(f"{name} must be a number of seconds, got {raw!r}", field=name) from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValidationError(f"{name} must be a finite number of seconds {'>=' if zero else '>'} 0, got {raw!r}",
                              field=name)
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValidationError(f"{name} must be 1/0/true/false, got {raw!r}", field=name)


def _dsn_from_parts(host: str, port: str | None, user: str | None, password: str | None, db: str | None) -> str:
    auth = ""
    if user:
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    hostport = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if port:
        hostport += f":{port}"
    return f"postgresql://{auth}{hostport}/{quote(db or '', safe='')}"


def _dsn_from_env(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The PostgreSQL DSN steps 2-4 find, and which variables it came from."""
    for name in ("DATABASE_PUBLIC_URL", "DATABASE_URL"):
        if env.get(name, "").strip():
            return env[name].strip(), name
    for prefix, db_var in (("PG", "PGDATABASE"), ("DB_", "DB_NAME")):
        host = env.get(f"{prefix}HOST", "").strip()
        if host:
            return (
                _dsn_from_parts(host, env.get(f"{prefix}PORT"), env.get(f"{prefix}USER"),
                                env.get(f"{prefix}PASSWORD"), env.get(db_var)),
                f"{prefix}* variables",
            )
    return None, None


def backup_settings(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """The backup fields of a config from ``STORAGE_BACKUP_DIR``, ``STORAGE_BACKUP_KEEP`` and
    ``STORAGE_BACKUP_EXTRA`` (paths or globs of files outside the data folder, separated by ``,`` or ``:``).

    Also used by ``open_store(backend=..., path=...)``: the backup folder follows the setting everywhere.
    """
    env = os.environ if environ is None else environ
    extra = [p.strip() for p in env.get("STORAGE_BACKUP_EXTRA", "").replace(os.pathsep, ",").split(",")]
    return {"backup_dir": env.get("STORAGE_BACKUP_DIR", "").strip() or "backups",
            "backup_keep": _int(env, "STORAGE_BACKUP_KEEP", 0, 0) or None,
            "backup_extra": tuple(p for p in extra if p)}


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Everything needed to open a store. Immutable; build one with :meth:`from_env` or directly."""

    backend: Backend = "json"
    path: str = "config"
    dsn: str | None = dataclasses.field(default=None, repr=False)
    pool_min: int = 1
    pool_max: int = 10
    pgbouncer: bool = False
    lock_timeout: float = 60.0
    cache_ttl: float = 0.0
    backup_dir: str = "backups"
    backup_keep: int | None = None
    backup_extra: tuple[str, ...] = ()
    command_timeout: float = 60.0
    source: str = "default"
    #: Open for reading only: no write lock is taken, nothing on disk or in the database is changed, and every
    #: write raises :class:`storage.errors.ReadOnlyError` (``check``, ``backup create`` and ``copy --from`` use it).
    read_only: bool = False
    #: PostgreSQL read cache (STORAGE_CACHE): "coherent" (invalidated by every process's commits, see
    #: storage/backends/postgres/coherent_cache.py), "ttl" (``cache_ttl``, this process's writes only) or "off";
    #: None picks "ttl" when ``cache_ttl`` > 0, else "coherent".
    cache: Literal["off", "coherent", "ttl"] | None = None
    #: Most entries the read cache holds (least recently used go first): STORAGE_CACHE_SIZE.
    cache_size: int = 100_000
    #: A direct PostgreSQL connection for LISTEN when ``dsn`` goes through PgBouncer (STORAGE_LISTEN_DSN).
    listen_dsn: str | None = dataclasses.field(default=None, repr=False)

    @property
    def cache_mode(self) -> Literal["off", "coherent", "ttl"]:
        """The read cache asked for (see :attr:`cache`); the coherent one still needs a working change feed."""
        if self.cache is not None:
            return self.cache
        return "ttl" if self.cache_ttl > 0 else "coherent"
    #: What expiring documents (``put(..., ttl=)``) are measured against: a function returning an aware datetime;
    #: None means the system's UTC time. Tests inject a controllable clock here (both backends use it; PostgreSQL
    #: gets its value as a parameter). See :mod:`storage.expiry`.
    clock: Callable[[], datetime] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.backend not in ("json", "postgres"):
            raise ValidationError(f"backend must be 'json' or 'postgres', got {self.backend!r}", field="backend")
        if self.backend == "postgres" and not self.dsn:
            raise ValidationError(
                "the postgres backend needs a DSN: set DATABASE_PUBLIC_URL, DATABASE_URL, PGHOST... or DB_HOST...",
                field="dsn",
            )
        if self.backend == "postgres" and self.dsn and not _URL_START.match(self.dsn):
            # Refused here, before a driver parses it: asyncpg reads postgresql:/u:pw@h/db as a database named
            # "u:pw@h/db" and puts that name (the password in it) in its error message.
            raise ValidationError(
                f"a PostgreSQL DSN must start with postgresql:// or postgres://, got {redact_dsn(self.dsn)}",
                field="dsn",
            )
        if self.pool_min < 0 or self.pool_max < 1 or self.pool_min > self.pool_max:
            raise ValidationError(
                f"pool sizes must satisfy 0 <= min <= max, max >= 1 (got {self.pool_min}, {self.pool_max})",
                field="pool_max",
            )
        if self.cache not in (None, "off", "coherent", "ttl"):
            raise ValidationError(f"cache must be 'off', 'coherent' or 'ttl', got {self.cache!r}", field="cache")
        if self.cache_size < 1:
            raise ValidationError(f"cache_size must be >= 1, got {self.cache_size!r}", field="cache_size")
        if self.listen_dsn and not _URL_START.match(self.listen_dsn):
            raise ValidationError(f"STORAGE_LISTEN_DSN must start with postgresql:// or postgres://, got "
                                  f"{redact_dsn(self.listen_dsn)}", field="listen_dsn")
        if not 0 < self.command_timeout < float("inf"):
            raise ValidationError(f"command_timeout must be a number of seconds > 0, got {self.command_timeout!r}",
                                  field="command_timeout")

    @property
    def safe_dsn(self) -> str | None:
        """The DSN with its password masked: safe to log."""
        return redact_dsn(self.dsn)

    def __repr__(self) -> str:
        return (
            f"StoreConfig(backend={self.backend!r}, path={self.path!r}, dsn={self.safe_dsn!r}, "
            f"pool_min={self.pool_min}, pool_max={self.pool_max}, pgbouncer={self.pgbouncer}, "
            f"source={self.source!r})"
        )

    __str__ = __repr__

    def identity(self) -> dict[str, str]:
        """Which store this config opens, for backup manifests and per-store retention: the data folder's real
        path, or the server, port, database and ``search_path`` of the DSN (never a user name or password)."""
        if self.backend == "postgres":
            return dsn_identity(str(self.dsn or ""))
        return {"backend": "json", "path": os.path.realpath(os.path.abspath(self.path))}

    def describe(self) -> str:
        """One line for humans: which backend, where, and why it was chosen."""
        where = self.safe_dsn if self.backend == "postgres" else os.path.abspath(self.path)
        return f"{self.backend} at {where} (from {self.source})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreConfig:
        """Resolve the configuration from ``environ`` (default ``os.environ``); see the module docstring."""
        env = os.environ if environ is None else environ
        common = {"path": env.get("STORAGE_PATH", "").strip() or "config", **_settings(env)}
        forced = env.get("STORAGE_BACKEND", "").strip().lower()
        if forced not in ("", "json", "postgres"):
            raise ValidationError(f"STORAGE_BACKEND must be 'json' or 'postgres', got {forced!r}",
                                  field="STORAGE_BACKEND")
        dsn, dsn_source = _dsn_from_env(env)
        if forced == "json":
            return cls(backend="json", dsn=dsn, source="STORAGE_BACKEND=json", **common)  # type: ignore[arg-type]
        if forced == "postgres":
            if dsn is None:
                raise ValidationError(
                    "STORAGE_BACKEND=postgres but no DSN: set DATABASE_PUBLIC_URL, DATABASE_URL, PGHOST... "
                    "or DB_HOST...", field="dsn")
            return cls(backend="postgres", dsn=dsn, source=f"STORAGE_BACKEND=postgres, {dsn_source}",
                       **common)  # type: ignore[arg-type]
        if dsn is not None:
            return cls(backend="postgres", dsn=dsn, source=str(dsn_source), **common)  # type: ignore[arg-type]
        return cls(backend="json", source="STORAGE_PATH" if env.get("STORAGE_PATH") else "default",
                   **common)  # type: ignore[arg-type]

    @classmethod
    def choose(cls, backend: str | None = None, path: str | None = None, dsn: str | None = None, *,
               environ: Mapping[str, str] | None = None, source: str = "arguments") -> StoreConfig:
        """The one place where explicit choices meet the environment (``open_store(...)`` and the command line's
        ``--backend``/``--path``/``--dsn``): with none given, :meth:`from_env`; otherwise the given location (a DSN
        alone means PostgreSQL, a path alone JSON) and every other setting from the environment."""
        env = os.environ if environ is None else environ
        if backend is None and path is None and dsn is None:
            return cls.from_env(env)
        chosen = backend or ("postgres" if dsn else "json")
        if chosen == "postgres" and dsn is None:
            dsn = _dsn_from_env(env)[0]  # --backend postgres alone: the environment says where
        return cls(backend=chosen, path=path or env.get("STORAGE_PATH", "").strip() or "config",  # type: ignore[arg-type]
                   dsn=dsn, source=source, **_settings(env))  # type: ignore[arg-type]

    @classmethod
    def for_location(cls, location: str, environ: Mapping[str, str] | None = None, *,
                     source: str = "command line") -> StoreConfig:
        """The store at ``location`` (a ``postgresql://`` URL, anything else a JSON folder) with every other setting
        (pool sizes, ``STORAGE_PGBOUNCER``, timeouts, cache, backups) from ``environ`` (default ``os.environ``).

        What a command that names a second store needs (``copy --to URL``, ``restore --into URL``): behind PgBouncer
        it must not use prepared statements there either. The environment's own location is ignored, so an
        incomplete one (``STORAGE_BACKEND=postgres`` without a DSN) does not stand in the way.
        """
        env = os.environ if environ is None else environ
        if _URL_RE.match(location):
            scheme = location.split("://", 1)[0].lower()
            if scheme not in ("postgres", "postgresql"):
                raise ValidationError(f"unsupported URL scheme {scheme!r}: use postgresql://... or a folder path",
                                      field="location")
            return cls(backend="postgres", dsn=location, source=source, **_settings(env))  # type: ignore[arg-type]
        return cls(backend="json", path=location, source=source, **_settings(env))  # type: ignore[arg-type]


def _cache_mode(env: Mapping[str, str]) -> str | None:
    raw = env.get("STORAGE_CACHE", "").strip().lower()
    if not raw:
        return None
    if raw not in ("off", "coherent", "ttl"):
        raise ValidationError(f"STORAGE_CACHE must be off, coherent or ttl, got {raw!r}", field="STORAGE_CACHE")
    return raw


_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _settings(env: Mapping[str, str]) -> dict[str, object]:
    """Every setting of the environment except where the data is (backend, DSN, ``STORAGE_PATH``)."""
    return {
        "pool_min": _int(env, "STORAGE_POOL_MIN", 1, 0),
        "pool_max": _int(env, "STORAGE_POOL_MAX", 10, 1),
        "pgbouncer": _bool(env, "STORAGE_PGBOUNCER"),
        "cache_ttl": _seconds(env, "STORAGE_CACHE_TTL", 0.0, zero=True),
        "command_timeout": _seconds(env, "STORAGE_COMMAND_TIMEOUT", 60.0, zero=False),
        "cache": _cache_mode(env),
        "cache_size": _int(env, "STORAGE_CACHE_SIZE", 100_000, 1),
        "listen_dsn": env.get("STORAGE_LISTEN_DSN", "").strip() or None,
        **backup_settings(env),
    }
