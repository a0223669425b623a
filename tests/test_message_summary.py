"""``_message_summary`` (what ``status`` prints about messages) against a reference computed from a full scan, on
both backends: counts, distinct guilds, and the oldest / newest record by time (timestamps with and without a
fraction, where text order and time order differ), after inserts, updates and a prune."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import storage
from storage.models import parse_timestamp


def _records(rng: random.Random, start: int, n: int) -> list[dict[str, object]]:
    base = datetime(2024, 1, 1, tzinfo=timezone.utc)
    out: list[dict[str, object]] = []
    for i in range(start, start + n):
        when = base + timedelta(seconds=rng.randrange(0, 90 * 86400), microseconds=rng.choice([0, 0, 500_000, 7]))
        text = when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{when.microsecond:06d}" if when.microsecond else "") + "Z"
        out.append({"message_id": str(7_000_000 + i), "guild_id": str(100 + rng.randrange(4)),
                    "channel_id": "200", "author_id": str(300 + rng.randrange(5)), "timestamp": text,
                    "content_length": rng.randrange(50)})
    return out


async def _reference(store: storage.Store) -> tuple[int, int, str | None, str | None]:
    rows = [r async for r in store.scan_messages()]  # type: ignore[attr-defined]
    if not rows:
        return 0, 0, None, None
    by_time = sorted(rows, key=lambda r: parse_timestamp(r["timestamp"]))
    return (len(rows), len({r["guild_id"] for r in rows}), by_time[0]["timestamp"], by_time[-1]["timestamp"])


async def test_summary_matches_a_full_scan(store: storage.Store) -> None:
    rng = random.Random(15)
    assert tuple(await store._message_summary()) == (0, 0, None, None)  # type: ignore[attr-defined]
    await store.record_messages(_records(rng, 0, 300))  # type: ignore[attr-defined]
    assert tuple(await store._message_summary()) == await _reference(store)  # type: ignore[attr-defined]
    await store.record_messages(_records(rng, 300, 50))  # type: ignore[attr-defined]  # the cache extends
    await store.update_message("7000003", {"content_length": 1})  # type: ignore[attr-defined]
    assert tuple(await store._message_summary()) == await _reference(store)  # type: ignore[attr-defined]
    await store.prune_messages(datetime(2024, 2, 1, tzinfo=timezone.utc))  # type: ignore[attr-defined]
    assert tuple(await store._message_summary()) == await _reference(store)  # type: ignore[attr-defined]
