"""DatabaseCache (TTL, bounds, invalidation) and safe_database_operation (what it retries, how long it waits)."""

from __future__ import annotations

import asyncio

import pytest

import storage
from storage import DatabaseCache, ValidationError, safe_database_operation


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_cache_ttl_expiry():
    clock = Clock()
    cache = DatabaseCache(ttl=300, clock=clock)
    assert await cache.get("k") is None
    await cache.set("k", {"v": 1})
    clock.now = 299.9
    assert await cache.get("k") == {"v": 1}
    clock.now = 300.0
    assert await cache.get("k") is None
    assert len(cache) == 0


async def test_cache_invalidate_clear_and_bound():
    cache = DatabaseCache(ttl=10, max_entries=3)
    for i in range(5):
        await cache.set(i, i)
    assert len(cache) == 3 and await cache.get(0) is None and await cache.get(4) == 4
    assert await cache.invalidate(4) is True
    assert await cache.invalidate(4) is False
    await cache.clear()
    assert len(cache) == 0


async def test_cache_ttl_zero_disables():
    cache = DatabaseCache(ttl=0)
    await cache.set("k", 1)
    assert await cache.get("k") is None


def test_cache_rejects_bad_settings():
    with pytest.raises(ValueError):
        DatabaseCache(ttl=-1)
    with pytest.raises(ValueError):
        DatabaseCache(max_entries=0)


async def test_retry_recovers_from_connection_errors(monkeypatch):
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    attempts = []

    async def flaky(x: int, *, y: int) -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise storage.ConnectionError("server restarting")
        return x + y

    assert await safe_database_operation(flaky, 1, y=2) == 3
    assert sleeps == [1, 2]


async def test_retry_gives_up_after_max_retries(monkeypatch):
    async def no_sleep(delay: float) -> None:
        return None

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    calls = []

    async def down() -> None:
        calls.append(1)
        raise storage.ConnectionError("down")

    with pytest.raises(storage.ConnectionError):
        await safe_database_operation(down, max_retries=4, retry_delay=0.5)
    assert len(calls) == 4


async def test_retry_does_not_retry_validation_or_other_errors():
    calls = []

    async def bad() -> None:
        calls.append(1)
        raise ValidationError("bad", field="x")

    with pytest.raises(ValidationError):
        await safe_database_operation(bad)

    async def bug() -> None:
        calls.append(1)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await safe_database_operation(bug)
    assert len(calls) == 2


def test_error_hierarchy():
    assert issubclass(storage.ConnectionError, storage.DatabaseError)
    assert issubclass(storage.ConnectionError, ConnectionError)
    assert issubclass(storage.ValidationError, ValueError)
    for cls in (storage.MigrationError, storage.CorruptDataError, storage.BackupError, storage.LockTimeoutError,
                storage.StoreClosedError, storage.TransactionError):
        assert issubclass(cls, storage.DatabaseError)
