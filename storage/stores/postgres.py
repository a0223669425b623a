"""The PostgreSQL store: the PostgreSQL backend with every feature.

Imported only when a PostgreSQL store is asked for (:func:`storage.stores.store_class`, or the name
``storage.PostgresStore``): asyncpg and the backend's modules cost a JSON-only bot about 5 MiB of memory and a
fifth of ``import storage``'s time for nothing.
"""

from __future__ import annotations

from ..backends.postgres.store import PostgresBackend
from .features import StoreFeatures

__all__ = ["PostgresStore"]


class PostgresStore(PostgresBackend, StoreFeatures):
    """A store in PostgreSQL through asyncpg (see :mod:`storage.backends.postgres.store`)."""
