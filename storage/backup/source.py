"""Which store a backup came from, so that retention prunes only the backups of the store it runs for.

A backup folder is often shared: a bot with a JSON store and a PostgreSQL one, a test copy, or a typo
(``--path reall``) that opens an empty store. Retention that counted every backup in the folder let an empty
store's backup push out a real store's backups. The manifest therefore records the source store's identity:

* JSON files: ``{"backend": "json", "path": <the data folder's real absolute path>}``;
* PostgreSQL: ``{"backend": "postgres", "host", "port", "database"[, "search_path"]}``, taken from the DSN. Never
  the user's password, nor the user name (the same database reached as another role is the same store).

Manifests written before this field existed have ``source.location`` (the absolute folder, or the DSN with its
password masked), from which the same identity is derived. A manifest with no usable source is **unknown**: it is
listed, verified and restorable, but retention never removes it (only a person can, by deleting its folder).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..config import StoreConfig
from ..dsn import dsn_identity

__all__ = ["Source", "store_source", "manifest_source", "same_store", "describe_source"]

Source = dict[str, str]


def store_source(config: StoreConfig) -> Source:
    """The identity of the store ``config`` opens (:meth:`StoreConfig.identity`)."""
    return config.identity()


def manifest_source(manifest: Mapping[str, Any]) -> Source | None:
    """The identity a manifest records (``source.store``), or derives from an older manifest's ``location``;
    ``None`` when unknown."""
    source = manifest.get("source")
    if not isinstance(source, Mapping):
        return None
    store = source.get("store")
    if isinstance(store, Mapping) and all(isinstance(v, str) for v in store.values()) and "backend" in store:
        return dict(store)
    backend, location = source.get("backend"), source.get("location")
    if not isinstance(location, str) or not location:
        return None
    if backend == "json" and os.path.isabs(location):
        return {"backend": "json", "path": location}
    if backend == "postgres":
        derived = dsn_identity(location)
        return derived if "?" not in derived.values() else None
    return None


def same_store(a: Source | None, b: Source | None) -> bool:
    """Whether two identities name the same store (an unknown one matches nothing, not even another unknown)."""
    return a is not None and b is not None and a == b


def describe_source(source: Source | None) -> str:
    """A short label for listings: the folder, or ``postgresql://host:port/database`` (no user, no password)."""
    if source is None:
        return "unknown"
    if source.get("backend") == "json":
        return source.get("path", "?")
    host = source.get("host", "?")
    host = f"[{host}]" if ":" in host else host
    label = f"postgresql://{host}:{source.get('port', '?')}/{source.get('database', '?')}"
    if source.get("search_path"):
        label += f"?search_path={source['search_path']}"
    return label
