"""``open_store``: pick and open a backend, awaitable or as ``async with`` (like ``asyncpg.create_pool``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from .config import StoreConfig
from .errors import ValidationError
from .stores import store_class

if TYPE_CHECKING:
    from .stores import AnyStore

__all__ = ["open_store", "StoreOpener"]


class StoreOpener(Coroutine[Any, Any, "AnyStore"]):
    """What :func:`open_store` returns: ``await`` it for a store, or ``async with`` it to close the store after.

    It is also a coroutine object (``collections.abc.Coroutine``), because ``asyncio.run`` and
    ``asyncio.create_task`` accept nothing else: ``asyncio.run(storage.open_store())`` opens and returns a store.
    That store belongs to the loop ``asyncio.run`` then ends, though, so any later call on it raises
    :class:`storage.EventLoopError` saying where to open it instead (``close()`` still releases its files). Open
    the store inside the loop that uses it: ``async def main(): async with storage.open_store() as store: ...``
    with ``asyncio.run(main())``, or in a discord.py bot's ``setup_hook``.
    """

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._store: AnyStore | None = None
        self._coro: Coroutine[Any, Any, AnyStore] | None = None  # made when driven as a coroutine (send/throw)

    async def _open(self) -> AnyStore:
        return await store_class(self.config).open(self.config)

    def __await__(self) -> Generator[Any, None, AnyStore]:
        return self._open().__await__()

    # -- the coroutine protocol, for a task driving the opener directly (asyncio.run, create_task, gather) --------
    def _driven(self) -> Coroutine[Any, Any, AnyStore]:
        if self._coro is None:
            self._coro = self._open()
        return self._coro

    def send(self, value: Any) -> Any:
        return self._driven().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:  # the one-argument form (the three-argument one is deprecated in 3.12)
            return self._driven().throw(typ)
        return self._driven().throw(typ, val, tb)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

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

