"""``open_store``: pick and open a backend, awaitable or as ``async with`` (like ``asyncpg.create_pool``)."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from .config import StoreConfig, backup_settings
from .errors import ValidationError
from .stores import AnyStore, store_class

__all__ = ["open_store", "StoreOpener"]


class StoreOpener:
    """What :func:`open_store` returns: ``await`` it for a store, or ``async with`` it to close the store after."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._store: AnyStore | None = None

    async def _open(self) -> AnyStore:
        return await store_class(self.config).open(self.config)

    def __await__(self) -> Generator[Any, None, AnyStore]:
        return self._open().__await__()

    async def __aenter__(self) -> AnyStore:
        self._store = await self._open()
        return self._store

    async def __aexit__(self, *exc: object) -> None:
        store, self._store = self._store, None
        if store is not None:
            await store.close()


def open_store(
    config: StoreConfig | None = None,
    *,
    backend: str | None = None,
    path: str | os.PathLike[str] | None = None,
    dsn: str | None = None,
    **options: Any,
) -> StoreOpener:
    """Open a store: from ``config``, from explicit ``backend``/``path``/``dsn``, or from the environment.

    Explicit arguments override the environment: ``open_store(backend="json", path="config")`` ignores
    ``DATABASE_URL``. ``options`` are other :class:`StoreConfig` fields (``pool_max=20``, ``pgbouncer=True``...).
    """
    if config is not None and (backend or path or dsn or options):
        raise ValidationError("pass either config= or backend/path/dsn options, not both", field="config")
    if config is None:
        if backend is None and path is None and dsn is None:
            base = StoreConfig.from_env()
            config = StoreConfig(**{**_fields(base), **options}) if options else base
        else:
            chosen = backend or ("postgres" if dsn else "json")
            # the backup settings come from the environment here too, unless given (STORAGE_BACKUP_DIR...)
            fields: dict[str, Any] = {"backend": chosen, "source": "arguments", **backup_settings(), **options}
            if path is not None:
                fields["path"] = os.fspath(path)
            if dsn is not None:
                fields["dsn"] = dsn
            config = StoreConfig(**fields)
    return StoreOpener(config)


def _fields(config: StoreConfig) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
