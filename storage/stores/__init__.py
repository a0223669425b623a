"""The public store classes: a backend with the features written once for every backend.

The layers, each importing only those below it::

    api, cli, commands                 open_store, python -m storage
    stores                             this package: backend + features (features.py, json.py, postgres.py)
    members, messages, backup,         the features, written once over the backend contract
    migrations
    backends/json, backends/postgres   the two backends: storage primitives only, never a feature
    interfaces, documents, protocol    the contract between features and backends, the public document API
    models, codec, config, errors...   the bottom

A backend implements the primitives declared in :mod:`storage.interfaces` (a document put, a message scan, a
snapshot for backups, its own migration lock); the features call only those. A backend may override a primitive
for speed (a ``COPY``, an SQL aggregate), never a public method; the conformance tests prove both agree.

:class:`PostgresStore` (and with it asyncpg) is imported on first use, not by ``import storage``: a bot on the
JSON default never loads the PostgreSQL backend (about 5 MiB of resident memory, measured in benchmarks/README.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import StoreConfig
from .features import StoreFeatures
from .json import JsonStore

if TYPE_CHECKING:
    from typing import TypeAlias

    from .postgres import PostgresStore

    #: What :func:`storage.open_store` gives: one of the two, each a :class:`storage.Store` and a
    #: :class:`storage.interfaces.Backend` with the features.
    AnyStore: TypeAlias = JsonStore | PostgresStore

__all__ = ["JsonStore", "PostgresStore", "StoreFeatures", "AnyStore", "store_class"]


def store_class(config: StoreConfig) -> type[JsonStore] | type[PostgresStore]:
    """The one place where a config's backend name becomes a class."""
    if config.backend == "json":
        return JsonStore
    from .postgres import PostgresStore

    return PostgresStore


def __getattr__(name: str) -> Any:
    """``PostgresStore`` and ``AnyStore``, made on first use (the PostgreSQL backend loads asyncpg)."""
    if name in ("PostgresStore", "AnyStore"):
        from .postgres import PostgresStore

        return PostgresStore if name == "PostgresStore" else JsonStore | PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
