"""A cancellation that lands while PostgreSQL is committing waits for the answer (postgres/conn.py
``settle_commit``): when the cancelled call returns, its transaction has committed or it has not, and nothing
lands afterwards.

The commit is made slow for real: a deferred constraint trigger on the store's documents table sleeps at
``COMMIT`` (PostgreSQL runs deferred triggers inside the commit), so the cancellation arrives while the server is
committing. Before, the connection was abandoned mid-``COMMIT`` and the server finished it after the caller had
resumed: a read at once saw the old state and one a moment later the new one (the cause of the occasional
"a partial result" in the cancel-at-every-turn tests of forget and restore, whose reads are several queries).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from storage.stores.postgres import PostgresStore

SLEEP = 0.6


async def slow_commits(dsn: str) -> None:
    """Every commit that wrote a document sleeps ``SLEEP`` seconds in the server before it completes."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"""
            CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep({SLEEP}); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE OR DELETE ON storage_documents
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
        """)
    finally:
        await conn.close()


async def state(store: PostgresStore) -> dict[str, Any]:
    return dict([pair async for pair in store.items("members")])


async def cancel_during_commit(call: Any) -> bool:
    """Start ``call``, cancel it halfway through its slow commit, wait for it; True if it raised CancelledError."""
    task = asyncio.ensure_future(call)
    await asyncio.sleep(SLEEP / 2)
    assert not task.done(), "the commit was not slow: the trigger did not run"
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


@pytest.mark.parametrize("how", ["transaction", "forget_user"])
async def test_a_cancelled_commit_is_settled_when_the_call_returns(pg_store: PostgresStore, pg_dsn: str,
                                                                 how: str) -> None:
    await pg_store.save_member_data(12, 1, {"v": 0})
    await pg_store.save_member_data(13, 1, {"v": 0})
    before = await state(pg_store)
    await slow_commits(pg_dsn)

    async def in_transaction() -> None:
        async with pg_store.transaction() as tx:
            await tx.put("members", "1_12", {"user_id": "12", "guild_id": "1", "v": 1})
            await tx.put("members", "1_13", {"user_id": "13", "guild_id": "1", "v": 1})

    call = in_transaction() if how == "transaction" else pg_store.forget_user("12")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await cancel_during_commit(call)
    waited = loop.time() - started
    now = await state(pg_store)
    await asyncio.sleep(SLEEP + 0.3)  # whatever the server was still committing has landed by now
    later = await state(pg_store)
    assert now == later, "the cancelled call's commit landed after it had returned"
    assert now != before  # it was committing: it committed, and the caller still got its CancelledError
    assert waited >= SLEEP * 0.9  # the cancellation waited for the server's answer
