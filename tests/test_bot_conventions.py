"""The conventions a bot developer expects on day one (issue 17): one event loop per store with a clear error
otherwise, ``asyncio.run(open_store())`` accepted, int keys (snowflakes), and one canonical timestamp form.

Every behaviour runs on both backends through real stores (the ``store`` fixture, or a config for the tests that
must run their own event loops, which cannot run inside pytest-asyncio's).
"""

from __future__ import annotations

import asyncio
import enum
import random
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

import storage
from storage import StoreConfig
from storage.models import iso_utc


@pytest.fixture
def sync_config(backend: str, tmp_path, request: pytest.FixtureRequest) -> StoreConfig:
    """``store_config`` for the tests that run their own ``asyncio.run`` (plain, non-async tests)."""
    if backend == "json":
        return StoreConfig(backend="json", path=str(tmp_path / "data"), backup_dir=str(tmp_path / "b"),
                           source="tests")
    return StoreConfig(backend="postgres", dsn=request.getfixturevalue("pg_dsn"), backup_dir=str(tmp_path / "b"),
                       source="tests")


# -- event loops ----------------------------------------------------------------------------------------------------
def test_asyncio_run_open_store_then_use_elsewhere_says_what_to_do(sync_config: StoreConfig) -> None:
    """The classic mistake: open under one ``asyncio.run``, use under another (as ``bot.run()`` makes)."""
    store = asyncio.run(storage.open_store(config=sync_config))  # accepted: the opener is a coroutine
    assert isinstance(store, storage.Store)
    with pytest.raises(storage.EventLoopError) as caught:
        asyncio.run(store.get("settings", 1))
    assert isinstance(caught.value, storage.DatabaseError)
    message = str(caught.value)
    assert "setup_hook" in message and "asyncio.run" in message and "has since ended" in message
    for call in (store.put("settings", 1, {}), store.get_member_data(1, 2), store.message_counts(2)):
        with pytest.raises(storage.EventLoopError):
            asyncio.run(call)
    asyncio.run(store.close())  # the opening loop is gone: close gives back what needs no loop
    assert store.closed

    async def main() -> dict[str, object] | None:  # what the README shows: open inside the loop that uses it
        async with storage.open_store(config=sync_config) as again:
            await again.put("settings", 1, {"prefix": "?"})
            return await again.get("settings", 1)

    assert asyncio.run(main()) == {"prefix": "?"}


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in another thread (a second bot, a dashboard thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_a_store_of_a_running_loop_refuses_other_loops(store_config: StoreConfig,
                                                           other_loop: asyncio.AbstractEventLoop) -> None:
    def there(coro):  # run in the other loop, wait from here without blocking this loop's thread for long
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, other_loop))

    store = await there(storage.open_store(config=store_config).__aenter__())
    try:
        await there(store.put("settings", 5, {"n": 1}))
        with pytest.raises(storage.EventLoopError) as caught:
            await store.get("settings", 5)
        assert "has since ended" not in str(caught.value)
        with pytest.raises(storage.EventLoopError):
            async with store.transaction():
                pass
        with pytest.raises(storage.EventLoopError):
            await store.close()  # its loop still runs (and may be using it): refused too
        assert not store.closed
        assert await there(store.get("settings", 5)) == {"n": 1}  # the right loop is unaffected
    finally:
        await there(store.close())


async def test_open_store_is_awaitable_a_context_manager_and_a_task(store_config: StoreConfig) -> None:
    store = await storage.open_store(config=store_config)
    await store.put("settings", "a", {"v": 1})
    await store.close()
    async with storage.open_store(config=store_config) as store:
        assert await store.get("settings", "a") == {"v": 1}
    store = await asyncio.create_task(storage.open_store(config=store_config))
    assert await store.get("settings", "a") == {"v": 1}
    await store.close()
    opener = storage.open_store(config=store_config)
    opener.close()  # never driven: nothing was opened, nothing to warn about


# -- int keys -------------------------------------------------------------------------------------------------------
class Kind(enum.IntEnum):
    GUILD = 7


async def test_int_keys_are_their_decimal_text_everywhere(store: storage.Store) -> None:
    guild_id = 1234567890123456789
    await store.put("settings", guild_id, {"prefix": "?"})
    assert await store.get("settings", str(guild_id)) == {"prefix": "?"}
    assert await store.get("settings", guild_id) == {"prefix": "?"}
    assert [k async for k, _ in store.items("settings")] == [str(guild_id)]
    assert await store.update("settings", guild_id, lambda d: {**d, "n": 1}) == {"prefix": "?", "n": 1}
    assert await store.put_many("settings", {1: {"a": 1}, 2: {"a": 2}}) == 2
    assert await store.put_many("settings", [(3, {"a": 3}), ("4", {"a": 4})]) == 2
    assert await store.get_many("settings", [1, "2", 3, 4, 5, 1]) == {"1": {"a": 1}, "2": {"a": 2}, "3": {"a": 3},
                                                                    "4": {"a": 4}}
    assert await store.put("settings", Kind.GUILD, {"k": 1}) is None
    assert await store.get("settings", "7") == {"k": 1}
    async with store.transaction() as tx:
        await tx.put("settings", 10, {"t": 1})
        assert await tx.get("settings", "10") == {"t": 1}
        assert await tx.delete("settings", 1) is True
        await tx.update("settings", 2, lambda d: {**d, "a": 20})
    assert await store.get("settings", 10) == {"t": 1}
    assert await store.get("settings", 1) is None
    assert await store.get("settings", 2) == {"a": 20}
    assert await store.delete("settings", 10) is True
    assert await store.delete("settings", 10) is False
    assert await store.count("settings") == 5


@pytest.mark.parametrize("bad", [-1, True, False, 1.0, None, b"1", 0.5])
async def test_other_keys_are_refused(store: storage.Store, bad: object) -> None:
    for call in (lambda: store.get("settings", bad), lambda: store.put("settings", bad, {}),
                 lambda: store.delete("settings", bad), lambda: store.put_many("settings", [(bad, {})]),
                 lambda: store.get_many("settings", [bad])):
        with pytest.raises(storage.ValidationError) as caught:
            await call()
        assert caught.value.field in ("key", None) or caught.value.field.startswith("key")
    assert await store.count("settings") == 0
    with pytest.raises(storage.ValidationError, match="guild_id"):
        async for _ in store.items("settings", prefix=12):  # type: ignore[arg-type]
            pass


# -- canonical timestamps -------------------------------------------------------------------------------------------
async def test_member_timestamps_are_stored_canonical(store: storage.Store) -> None:
    joined = datetime(2024, 5, 1, 21, 0, 6, tzinfo=timezone(timedelta(hours=9)))  # discord.py's member.joined_at
    stats = {"message_count": 1, "last_active": "2024-05-01T12:00:06.283+00:00"}
    await store.save_member_data(1, 2, {"join_date": joined, "statistics": stats})
    member = await store.get_member_data(1, 2)
    assert member["join_date"] == "2024-05-01T12:00:06Z"
    assert member["statistics"]["last_active"] == "2024-05-01T12:00:06.283000Z"
    given = {"join_date": "2024-05-01T12:00:06.000000Z", "roles": []}
    assert await store.batch_update_members([{"user_id": 3, "guild_id": 2, "data": given}]) == 1
    assert given["join_date"] == "2024-05-01T12:00:06.000000Z"  # the caller's dict is not changed
    assert (await store.get_member_data(3, 2))["join_date"] == "2024-05-01T12:00:06Z"


async def test_refresh_does_not_rewrite_members_saved_in_other_timestamp_forms(store: storage.Store) -> None:
    """A bot writes ``...06Z`` / ``+00:00`` / 3-digit fractions; the library's messages say ``...06.283000Z``:
    the same instants, so a refresh finds nothing to write."""
    rnd = random.Random(17)
    guild = 900000000000000001
    base = datetime(2024, 5, 1, 12, 0, 6, tzinfo=timezone.utc)
    records, members = [], []
    for user in range(1, 41):
        times = sorted(base + timedelta(seconds=rnd.randrange(0, 86400), milliseconds=rnd.choice([0, 283, 500]))
                       for _ in range(rnd.randint(1, 5)))
        for n, when in enumerate(times):
            records.append({"message_id": user * 100 + n, "guild_id": guild, "channel_id": 5, "author_id": user,
                            "timestamp": when.isoformat()})  # "+00:00", as discord.py's created_at gives
        last = times[-1]
        bot_form = rnd.choice([last, last.isoformat(), last.isoformat().replace("+00:00", "Z"),
                               last.strftime("%Y-%m-%dT%H:%M:%S") + (f".{last.microsecond // 1000:03d}Z"
                                                                      if last.microsecond else ".000Z")])
        members.append({"user_id": user, "guild_id": guild, "data": {
            "roles": ["member"], "statistics": {"message_count": len(times), "last_active": bot_form}}})
    assert await store.record_messages(records) == len(records)
    assert await store.batch_update_members(members) == len(members)
    assert await store.refresh_member_statistics(guild) == 0
    for update in members:
        stats = (await store.get_member_data(update["user_id"], guild))["statistics"]
        assert stats["last_active"] == iso_utc(update["data"]["statistics"]["last_active"])
        assert stats["last_active"] == await store.last_activity(guild, update["user_id"])
    # one real change is still seen
    await store.record_message({"message_id": 1, "guild_id": guild, "channel_id": 5, "author_id": 1,
                                "timestamp": base + timedelta(days=2)})
    assert await store.refresh_member_statistics(guild) == 1
