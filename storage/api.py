"""``open_store``: pick and open a backend, awaitable or as ``async with`` (like ``asyncpg.create_pool``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Generator
from typing import Any

from .config import StoreConfig
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
        config = StoreConfig.choose(backend, None if path is None else os.fspath(path), dsn)
        if options:
            config = dataclasses.replace(config, **options)
    return StoreOpener(config)

