"""The public store classes: a backend with the features written once for every backend.

The layers, each importing only those below it::

    api, cli, commands                 open_store, python -m storage
    stores                             this module: backend + features
    members, messages, backup,         the features, written once over the backend contract
    migrations
    backends/json, backends/postgres   the two backends: storage primitives only, never a feature
    interfaces, documents, protocol    the contract between features and backends, the public document API
    models, codec, config, errors...   the bottom

A backend implements the primitives declared in :mod:`storage.interfaces` (a document put, a message scan, a
snapshot for backups, its own migration lock); the features call only those. A backend may override a primitive
for speed (a ``COPY``, an SQL aggregate), never a public method; the conformance tests prove both agree.
"""

from __future__ import annotations

from .backends.json.store import JsonBackend
from .backends.postgres.store import PostgresBackend
from .backup.operations import BackupMixin
from .config import StoreConfig
from .lifecycle import LifecycleMixin
from .members import MembersMixin
from .messages.queries import AnalyticsMixin

__all__ = ["JsonStore", "PostgresStore", "StoreFeatures", "AnyStore", "store_class"]


class StoreFeatures(BackupMixin, MembersMixin, AnalyticsMixin, LifecycleMixin):
    """Everything a store offers above its backend's primitives: the seed's member calls, message analytics,
    backups and restores, forgetting and exporting data."""


class JsonStore(JsonBackend, StoreFeatures):
    """A store in plain JSON files (see :mod:`storage.backends.json.store`)."""


class PostgresStore(PostgresBackend, StoreFeatures):
    """A store in PostgreSQL through asyncpg (see :mod:`storage.backends.postgres.store`)."""


#: What :func:`storage.open_store` gives: one of the two, each a :class:`storage.Store` and a
#: :class:`storage.interfaces.Backend` with the features.
AnyStore = JsonStore | PostgresStore


def store_class(config: StoreConfig) -> type[JsonStore] | type[PostgresStore]:
    """The one place where a config's backend name becomes a class."""
    return JsonStore if config.backend == "json" else PostgresStore
