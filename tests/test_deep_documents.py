"""Documents nested deeper than can be stored (issue 11, item 8): a ValidationError naming the limit, nothing written.

orjson serializes at most ``storage.codec.MAX_DEPTH`` (254) nested containers; before, a document nested about a
thousand levels made the checks themselves raise ``RecursionError`` (and its ``repr`` in an error message did too).
Every write call, on both backends, just over the limit and far over it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import storage
from storage.codec import MAX_DEPTH

GUILD = "42"
DEPTHS = [MAX_DEPTH + 1, 1_000, 50_000]


def nested(containers: int, leaf: Any = 1) -> Any:
    """``containers`` dicts and lists inside each other (alternating) around ``leaf``."""
    value = leaf
    for i in range(containers):
        value = {"a": value} if i % 2 else [value]
    return value


def nested_dict(levels: int) -> dict[str, Any]:
    """A document of ``levels`` containers in all (itself included)."""
    return {"deep": nested(levels - 1)}


def message(i: int, **extra: Any) -> dict[str, Any]:
    return {"message_id": i, "channel_id": 1, "author_id": 2, "guild_id": GUILD,
            "timestamp": "2024-03-01T12:00:00Z", **extra}


WRITES: dict[str, Callable[[Any, int], Awaitable[Any]]] = {
    "put": lambda s, n: s.put("things", "k", nested_dict(n)),
    "put_many": lambda s, n: s.put_many("things", [("j", {"ok": 1}), ("k", nested_dict(n))]),
    "update": lambda s, n: s.update("things", "k", lambda d: nested_dict(n)),
    "update_default": lambda s, n: s.update("things", "new", lambda d: d, default=nested_dict(n)),
    "save_member_data": lambda s, n: s.save_member_data(1, 2, {"extra": nested(n - 1)}),
    "record_messages_analysis": lambda s, n: s.record_messages([message(7), message(8, analysis={
        "sentiment": "positive", "deep": nested(n - 2)})]),
    "record_messages_extra_field": lambda s, n: s.record_messages([message(9, extra=nested(n - 1))]),
    "record_message": lambda s, n: s.record_message(message(10, extra=nested(n - 1))),
    "record_messages_counter": lambda s, n: s.record_messages([message(11, attachments=nested(n))]),
    "update_message": lambda s, n: s.update_message(1, {"analysis": {"deep": nested(n - 2)}}),
    "update_message_identity": lambda s, n: s.update_message(1, {"channel_id": nested(n)}),
}


async def _state(store: Any) -> tuple[Any, ...]:
    return (await store.get("things", "k"), await store.get("things", "j"), await store.get("things", "new"),
            await store.get_member_data(1, 2), await store.message_counts(GUILD),
            [r async for r in store.scan_messages(GUILD)])


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("call", sorted(WRITES))
async def test_a_too_deep_document_is_refused_by_every_write_call_and_nothing_is_written(store: Any, call: str,
                                                                                        depth: int):
    await store.put("things", "k", {"v": 1})
    await store.save_member_data(1, 2, {"v": 1})
    await store.record_messages([message(1, analysis={"sentiment": "neutral"})])
    before = await _state(store)
    with pytest.raises(storage.ValidationError) as info:
        await WRITES[call](store, depth)
    assert isinstance(info.value, storage.DatabaseError)
    if call not in ("record_messages_counter", "update_message_identity"):  # refused for their type first
        assert f"limit of {MAX_DEPTH} levels" in str(info.value)
    assert len(str(info.value)) < 2_000
    assert await _state(store) == before


@pytest.mark.parametrize("depth", DEPTHS)
async def test_batch_update_members_skips_and_logs_a_too_deep_row(store: Any, depth: int,
                                                                 caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR, logger="storage"):
        written = await store.batch_update_members([
            {"user_id": 1, "guild_id": 2, "data": {"extra": nested(depth - 1)}},
            {"user_id": 3, "guild_id": 2, "data": {"v": 3}},
        ])
    assert written == 1
    assert await store.get_member_data(1, 2) == {}
    assert await store.get_member_data(3, 2) == {"v": 3}
    assert f"limit of {MAX_DEPTH} levels" in caplog.text and "#0" in caplog.text


async def test_a_document_exactly_at_the_limit_is_stored_and_read_back(store: Any):
    doc = nested_dict(MAX_DEPTH)
    await store.put("things", "k", doc)
    assert await store.get("things", "k") == doc
    assert await store.update("things", "k", lambda d: d) == doc
