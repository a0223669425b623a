"""Message analytics on every backend, checked against a plain-Python reference.

Random message streams (several seeds) are fed to the store in random batches, with duplicated ids, ids in every
accepted form and timestamps in every accepted notation; every query, with and without ``since``/``until``, must
then equal what the few lines of :class:`Reference` compute from the same stream. The reference parses and
compares real datetimes, so it does not share the implementation's text tricks. JSON-only tests at the end cover
the message log's files: other processes' appends, torn and corrupt lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import storage
from storage import CorruptDataError, StoreConfig, ValidationError
from storage.messages.columns import MessageColumns, columns_of
from storage.stores import JsonStore

UTC = timezone.utc
ROOT = Path(__file__).resolve().parent.parent
GUILDS = ["111111111111111111", "18446744073709551615", "7"]  # a 20-digit id that does not fit in a signed bigint
CHANNELS = ["9", "10", "222222222222222222", "18446744073709551614"]  # string order differs from numeric order
AUTHORS = ["5", "40", "333333333333333333", "333333333333333334", "18446744073709551613", "600"]
SENTIMENTS = ["positive", "negative", "neutral", "unknown"]
TOPICS = ["gaming", "music", "art", "code", "memes"]
START = datetime(2023, 11, 20, tzinfo=UTC)  # streams cross a year and several month boundaries


# ---------------------------------------------------------------------------------------------------------------
# the reference
def to_dt(value: Any) -> datetime:
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def canonical(dt: datetime) -> str:
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{dt.microsecond:06d}" if dt.microsecond else "") + "Z"


class Reference:
    """What the store must answer, from the raw records, the obvious way."""

    def __init__(self) -> None:
        self.messages: dict[str, dict[str, Any]] = {}

    def add(self, batch: Iterable[dict[str, Any]]) -> int:
        new = 0
        for raw in batch:
            mid = str(int(raw["message_id"]))
            if mid in self.messages:
                continue  # first wins within a batch, stored wins across batches
            analysis = raw.get("analysis") or {}
            self.messages[mid] = {
                "guild": str(int(raw["guild_id"])), "channel": str(int(raw["channel_id"])),
                "author": str(int(raw["author_id"])), "dt": to_dt(raw["timestamp"]),
                "sentiment": analysis.get("sentiment"), "topics": analysis.get("topics"),
                "reactions": raw.get("reactions", 0),
            }
            new += 1
        return new

    def select(self, guild: str, since: Any = None, until: Any = None) -> list[dict[str, Any]]:
        lo = to_dt(since) if since is not None else None
        hi = to_dt(until) if until is not None else None
        return [m for m in self.messages.values() if m["guild"] == guild
                and (lo is None or m["dt"] >= lo) and (hi is None or m["dt"] < hi)]

    def counts(self, guild: str, by: str | None, since: Any = None, until: Any = None) -> int | dict[str, int]:
        msgs = self.select(guild, since, until)
        if by is None:
            return len(msgs)
        if by == "day":
            return dict(Counter(m["dt"].strftime("%Y-%m-%d") for m in msgs))
        return dict(Counter(m[by] for m in msgs))

    @staticmethod
    def top(counter: Counter[str], limit: int) -> list[tuple[str, int]]:
        return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]

    def top_field(self, guild: str, field: str, limit: int, since: Any = None, until: Any = None) -> list:
        return self.top(Counter(m[field] for m in self.select(guild, since, until)), limit)

    def top_topics(self, guild: str, limit: int, since: Any = None, until: Any = None) -> list:
        counter: Counter[str] = Counter()
        for m in self.select(guild, since, until):
            counter.update(set(m["topics"] or ()))
        return self.top(counter, limit)

    def sentiments(self, guild: str, since: Any = None, until: Any = None) -> dict[str, int]:
        return dict(Counter(m["sentiment"] if m["sentiment"] is not None else "unknown"
                            for m in self.select(guild, since, until)))

    def last_activity(self, guild: str, author: str, since: Any = None, until: Any = None) -> str | None:
        times = [m["dt"] for m in self.select(guild, since, until) if m["author"] == author]
        return canonical(max(times)) if times else None


# ---------------------------------------------------------------------------------------------------------------
# random streams
def random_timestamp(rnd: random.Random, pool: list[datetime]) -> Any:
    """A time (reused often, to make ties; sometimes half a second after a used one) in a random notation."""
    if pool and rnd.random() < 0.25:
        dt = rnd.choice(pool)
        if rnd.random() < 0.3:
            dt += timedelta(milliseconds=500)  # "...:05.5Z" sorts before "...:05Z" as text: time order must win
    else:
        dt = START + timedelta(seconds=rnd.randrange(120 * 86400), microseconds=rnd.choice([0, 0, 0, 1, 250000]))
    pool.append(dt)
    form = rnd.randrange(6)
    if form == 0:
        return canonical(dt)
    if form == 1:
        return dt.isoformat()  # +00:00
    if form == 2:
        return dt.astimezone(timezone(timedelta(hours=-5))).isoformat()  # another offset, maybe another day
    if form == 3:
        return dt  # aware datetime
    if form == 4:
        return dt.replace(tzinfo=None)  # naive datetime: UTC
    return dt.replace(tzinfo=None).isoformat()  # naive text: UTC


def random_id(rnd: random.Random, value: str) -> Any:
    return int(value) if rnd.random() < 0.3 else value


def random_record(rnd: random.Random, mid: int, pool: list[datetime]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "message_id": random_id(rnd, str(mid)),
        "guild_id": random_id(rnd, rnd.choice(GUILDS)),
        "channel_id": random_id(rnd, rnd.choice(CHANNELS)),
        "author_id": random_id(rnd, rnd.choice(AUTHORS)),
        "timestamp": random_timestamp(rnd, pool),
    }
    for name in ("content_length", "attachments", "reactions"):
        if rnd.random() < 0.8:
            record[name] = rnd.randrange(0, 300)
    shape = rnd.randrange(6)
    if shape == 0:
        pass  # no analysis at all
    elif shape == 1:
        record["analysis"] = None
    else:
        analysis: dict[str, Any] = {}
        if rnd.random() < 0.8:
            analysis["sentiment"] = rnd.choice([*SENTIMENTS, None])
        if rnd.random() < 0.8:
            analysis["topics"] = rnd.choice([None, [], rnd.choices(TOPICS, k=rnd.randrange(1, 4))])  # repeats too
        record["analysis"] = analysis
    if rnd.random() < 0.1:
        record["content"] = "héllo ✨ \"quoted\"\nsecond line"  # extra fields are kept
    return record


def random_stream(seed: int, n: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    pool: list[datetime] = []
    ids = [rnd.randrange(1, int(n * 1.3)) for _ in range(n)]  # about a quarter are repeats
    ids += [2**64 - 1 - rnd.randrange(3) for _ in range(3)]  # the largest snowflakes, repeated too
    rnd.shuffle(ids)
    return [random_record(rnd, mid, pool) for mid in ids]


def batches(rnd: random.Random, records: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    i = 0
    while i < len(records):
        size = rnd.choice([1, 2, 7, 40, 150])
        yield records[i:i + size]
        i += size


def windows(rnd: random.Random, ref: Reference) -> list[tuple[Any, Any]]:
    """(since, until) pairs: open ends, bounds that are exactly a stored timestamp, month edges, every notation."""
    times = sorted({m["dt"] for m in ref.messages.values()})
    a, b = sorted(rnd.sample(times, 2))
    c = rnd.choice(times)
    return [
        (None, None),
        (canonical(a), None),
        (None, b),
        (a.astimezone(timezone(timedelta(hours=3))).isoformat(), canonical(b)),
        (datetime(2024, 1, 1), "2024-02-01T00:00:00Z"),  # a naive datetime is UTC
        (c, c + timedelta(microseconds=1)),  # exactly the messages of one instant
        (b, a),  # empty: until before since
    ]


async def record_stream(store: Any, ref: Reference, rnd: random.Random, records: list[dict[str, Any]]) -> None:
    for batch in batches(rnd, records):
        expected = ref.add(batch)
        if len(batch) == 1 and rnd.random() < 0.5:
            assert await store.record_message(batch[0]) is (expected == 1)
        else:
            assert await store.record_messages(batch) == expected


async def assert_queries_match(store: Any, ref: Reference, since: Any, until: Any) -> None:
    bounds = {"since": since, "until": until}
    for guild in [*GUILDS, "424242"]:
        assert await store.message_counts(guild, **bounds) == ref.counts(guild, None, since, until)
        assert await store.message_counts(int(guild), "channel", **bounds) == ref.counts(guild, "channel", since,
                                                                                         until)
        assert await store.message_counts(guild, by="author", **bounds) == ref.counts(guild, "author", since, until)
        assert await store.message_counts(guild, by="day", **bounds) == ref.counts(guild, "day", since, until)
        for limit in (1, 3, 100):
            assert await store.top_authors(guild, limit, **bounds) == ref.top_field(guild, "author", limit, since,
                                                                                    until)
            assert await store.top_channels(guild, limit=limit, **bounds) == ref.top_field(guild, "channel", limit,
                                                                                           since, until)
            assert await store.top_topics(guild, limit, **bounds) == ref.top_topics(guild, limit, since, until)
        assert await store.top_authors(guild, **bounds) == ref.top_field(guild, "author", 10, since, until)
        assert await store.sentiment_breakdown(guild, **bounds) == ref.sentiments(guild, since, until)
        for author in [*AUTHORS, "12345"]:
            assert await store.last_activity(guild, author, **bounds) == ref.last_activity(guild, author, since,
                                                                                           until)


async def scan(store: Any, guild: str | None = None) -> list[dict[str, Any]]:
    return [r async for r in store.scan_messages(guild, None, None)]


# ---------------------------------------------------------------------------------------------------------------
# queries against the reference
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_random_streams_match_the_reference(store, seed):
    rnd = random.Random(seed * 7919)
    ref = Reference()
    await record_stream(store, ref, rnd, random_stream(seed, 400))
    assert 250 < len(ref.messages) < 400  # the stream really had duplicates
    for since, until in windows(rnd, ref):
        await assert_queries_match(store, ref, since, until)


async def test_results_are_typed_and_sorted(store):
    ref = Reference()
    await record_stream(store, ref, random.Random(5), random_stream(5, 150))
    guild = GUILDS[0]
    by_day = await store.message_counts(guild, by="day")
    assert list(by_day) == sorted(by_day) and all(len(day) == 10 for day in by_day)
    for rows in (await store.top_authors(guild, 100), await store.top_channels(guild, 100),
                 await store.top_topics(guild, 100)):
        assert all(type(key) is str and type(n) is int for key, n in rows)
        assert rows == sorted(rows, key=lambda kv: (-kv[1], kv[0]))
    assert await store.top_authors(guild, 0) == []
    total = await store.message_counts(guild)
    assert sum((await store.sentiment_breakdown(guild)).values()) == total
    assert sum((await store.message_counts(guild, by="channel")).values()) == total
    last = await store.last_activity(guild, ref.top_field(guild, "author", 1)[0][0])
    assert isinstance(last, str) and last.endswith("Z")


async def test_scan_is_ordered_by_time_and_bounded(store):
    """``scan_messages``: what ``storage stats --channel`` streams over (backups read the same primitive)."""
    ref = Reference()
    await record_stream(store, ref, random.Random(6), random_stream(6, 200))
    for guild in (GUILDS[0], None):
        rows = [r async for r in store.scan_messages(guild, None, None)]
        times = [to_dt(r["timestamp"]) for r in rows]
        assert times == sorted(times)
        expected = ref.messages if guild is None else {k: m for k, m in ref.messages.items() if m["guild"] == guild}
        assert sorted(r["message_id"] for r in rows) == sorted(expected)
    since, until = datetime(2023, 12, 15, tzinfo=UTC), datetime(2024, 1, 20, 12, tzinfo=UTC)
    rows = [r async for r in store.scan_messages(GUILDS[1], since, until)]
    assert sorted(r["message_id"] for r in rows) == sorted(
        k for k, m in ref.messages.items() if m["guild"] == GUILDS[1] and since <= m["dt"] < until)
    assert [r async for r in store.scan_messages()] == [r async for r in store.scan_messages(None, None, None)]
    as_given = [r async for r in store.scan_messages(int(GUILDS[1]), "2023-12-15", "2024-01-20T12:30:00+00:30")]
    assert as_given == rows


async def test_scan_messages_checks_its_arguments(store, store_config):
    await store.record_messages([msg(1)])
    for args, field in [(("abc",), "guild_id"), ((True,), "guild_id"), ((100, "yesterday"), "since"),
                        ((100, None, 5), "until"), ((100, "2024-01-01T00:00:00+99:00"), "since")]:
        with pytest.raises(ValidationError) as info:
            async for _ in store.scan_messages(*args):
                pass
        assert info.value.field == field
    async with store.transaction():
        with pytest.raises(storage.TransactionError):
            async for _ in store.scan_messages(100):
                pass
    closed = await storage.open_store(config=store_config)
    await closed.close()
    with pytest.raises(storage.StoreClosedError):
        async for _ in closed.scan_messages():
            pass
    assert [r["message_id"] async for r in store.scan_messages(100, until="2024-01-15T12:00:00.000001Z")] == ["1"]
    assert [r async for r in store.scan_messages(100, since="2024-01-15T12:00:00.000001Z")] == []


# ---------------------------------------------------------------------------------------------------------------
# idempotency
def msg(mid: Any, **fields: Any) -> dict[str, Any]:
    record = {"message_id": mid, "guild_id": "100", "channel_id": "200", "author_id": "300",
              "timestamp": "2024-01-15T12:00:00Z", "content_length": 10, "attachments": 0, "reactions": 0,
              "analysis": {"sentiment": "positive", "topics": ["music"]}}
    record.update(fields)
    return record


async def test_duplicates_are_counted_once_and_the_first_wins(store):
    batch = [msg(1, channel_id="201"), msg("1", channel_id="202"), msg(2), msg(2, author_id="301")]
    assert await store.record_messages(batch) == 2
    assert await store.message_counts(100, by="channel") == {"200": 1, "201": 1}
    assert await store.message_counts(100, by="author") == {"300": 2}
    # across batches: the stored record wins; the return value counts only new ids
    assert await store.record_messages([msg(1, channel_id="203"), msg(3)]) == 1
    assert await store.record_message(msg(2, channel_id="204")) is False
    assert await store.record_message(msg(4)) is True
    assert await store.message_counts(100, by="channel") == {"200": 3, "201": 1}
    # a message id is unique across guilds too: the same id in another guild is the same message
    assert await store.record_message(msg(4, guild_id="999")) is False
    assert await store.message_counts(999) == 0


async def test_a_big_batch_is_validated_whole_before_anything_is_written(store):
    big = [msg(i, channel_id=str(200 + i % 7)) for i in range(1, 2601)]  # validated in a thread (> 2000)
    big[2400] = msg(2401, reactions=-3)
    with pytest.raises(ValidationError) as info:
        await store.record_messages(big)
    assert "record #2400" in str(info.value) and info.value.field == "reactions"
    assert await store.message_counts(100) == 0
    big[2400] = msg(1)  # a duplicate instead: the first wins
    assert await store.record_messages(big) == 2599
    assert await store.message_counts(100, by="channel") == {str(200 + c): n for c, n in sorted(
        Counter(i % 7 for i in range(1, 2601) if i != 2401).items())}


async def test_empty_and_generator_batches(store):
    assert await store.record_messages([]) == 0
    assert await store.record_messages(msg(i) for i in range(1, 6)) == 5
    assert await store.message_counts(100) == 5


# ---------------------------------------------------------------------------------------------------------------
# validation
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("missing message_id", {"message_id": None}, "message_id"),
    ("letters in an id", {"message_id": "12a"}, "message_id"),
    ("negative id", {"channel_id": -5}, "channel_id"),
    ("leading zero", {"author_id": "0123"}, "author_id"),
    ("id over 64 bits", {"guild_id": 2**64}, "guild_id"),
    ("bool id", {"author_id": True}, "author_id"),
    ("float id", {"channel_id": 12.0}, "channel_id"),
    ("missing guild_id", {"guild_id": None}, "guild_id"),
    ("missing timestamp", {"timestamp": None}, "timestamp"),
    ("bad timestamp", {"timestamp": "yesterday"}, "timestamp"),
    ("timestamp as a number", {"timestamp": 1700000000}, "timestamp"),
    ("out of range once in UTC", {"timestamp": "9999-12-31T23:00:00-05:00"}, "timestamp"),
    ("negative counter", {"reactions": -1}, "reactions"),
    ("string counter", {"content_length": "10"}, "content_length"),
    ("bool counter", {"attachments": True}, "attachments"),
    ("analysis not an object", {"analysis": ["positive"]}, "analysis"),
    ("sentiment not a string", {"analysis": {"sentiment": 0.8}}, "analysis.sentiment"),
    ("topics not a list", {"analysis": {"topics": "music"}}, "analysis.topics"),
    ("topic not a string", {"analysis": {"topics": ["music", 3]}}, "analysis.topics"),
    ("NaN in an extra field", {"score": float("nan")}, "record.score"),
    ("NUL in an extra field", {"content": "a\x00b"}, "record.content"),
    ("not JSON", {"extra": {1, 2}}, "record"),
    ("NUL in a sentiment", {"analysis": {"sentiment": "po\x00s"}}, "record.analysis.sentiment"),
    ("lone surrogate in a topic", {"analysis": {"topics": ["ok", "\ud800"]}}, "record"),
    ("NaN inside analysis", {"analysis": {"sentiment": "positive", "score": float("nan")}}, "record.analysis.score"),
    ("counter over 64 bits", {"reactions": 2**64}, "record.reactions"),
]


@pytest.mark.parametrize("name,bad,field", BAD_FIELDS, ids=[case[0] for case in BAD_FIELDS])
async def test_an_invalid_record_raises_and_writes_nothing(store, name, bad, field):
    assert await store.record_messages([msg(1)]) == 1
    record = msg(50)
    for key, value in bad.items():
        if value is None and key in ("message_id", "guild_id", "timestamp"):
            del record[key]
        else:
            record[key] = value
    batch = [msg(10), msg(11), record, msg(12)]
    with pytest.raises(ValidationError) as info:
        await store.record_messages(batch)
    assert info.value.field == field
    assert "record #2" in str(info.value)
    with pytest.raises(ValidationError):
        await store.record_message(record)
    assert await store.message_counts(100) == 1
    assert [r["message_id"] for r in await scan(store)] == ["1"]


@pytest.mark.parametrize("records", ["not records", b"bytes", {"message_id": 1}, 42, [None], [[("a", 1)]]])
async def test_a_batch_must_be_an_iterable_of_records(store, records):
    with pytest.raises(ValidationError):
        await store.record_messages(records)
    assert await store.message_counts(100) == 0


async def test_query_arguments_are_checked(store):
    await store.record_message(msg(1))
    with pytest.raises(ValidationError) as info:
        await store.message_counts(100, by="week")
    assert info.value.field == "by"
    for limit in (-1, True, 2.5, "3"):
        with pytest.raises(ValidationError):
            await store.top_authors(100, limit)
    for guild in ("abc", -1, None, 2**64):
        with pytest.raises(ValidationError):
            await store.message_counts(guild)
    with pytest.raises(ValidationError) as info:
        await store.top_topics(100, since="last tuesday")
    assert info.value.field == "since"
    with pytest.raises(ValidationError):
        await store.sentiment_breakdown(100, until=12)
    with pytest.raises(ValidationError):
        await store.last_activity(100, "x")
    with pytest.raises(ValidationError):
        await store.prune_messages(None)
    with pytest.raises(ValidationError):
        await store.prune_messages("not a time")
    assert await store.message_counts(100) == 1


# ---------------------------------------------------------------------------------------------------------------
# update_message
async def test_update_message_merges_changes(store):
    await store.record_messages([msg(1), msg(2, author_id="301")])
    assert await store.update_message(1, {"reactions": 5, "analysis": {"sentiment": "negative", "topics": ["art"]}})
    assert await store.update_message("1", {"reactions": 6, "edited": True, "message_id": 1, "guild_id": 100})
    assert await store.sentiment_breakdown(100) == {"negative": 1, "positive": 1}
    assert await store.top_topics(100) == [("art", 1), ("music", 1)]
    [first] = [r for r in await scan(store, "100") if r["message_id"] == "1"]
    assert first["reactions"] == 6 and first["edited"] is True and first["content_length"] == 10
    assert first["analysis"] == {"sentiment": "negative", "topics": ["art"]}  # shallow: analysis replaced whole
    assert await store.update_message(1, {}) is True  # exists, nothing to change
    assert await store.update_message(3, {"reactions": 1}) is False  # absent: nothing is created
    assert await store.message_counts(100) == 2
    # a re-sent original does not undo the update
    assert await store.record_message(msg(1)) is False
    assert await store.sentiment_breakdown(100) == {"negative": 1, "positive": 1}


@pytest.mark.parametrize("changes,field", [
    ({"guild_id": "101"}, "guild_id"),
    ({"channel_id": 201}, "channel_id"),
    ({"author_id": "301"}, "author_id"),
    ({"message_id": "2"}, "message_id"),
    ({"timestamp": "2024-02-15T12:00:00Z"}, "timestamp"),
    ({"reactions": -1}, "reactions"),
    ({"analysis": "great"}, "analysis"),
    ({"analysis": {"topics": [1]}}, "analysis.topics"),
    ({"channel_id": "x"}, "channel_id"),
    ({"score": float("inf")}, "changes.score"),
])
async def test_update_message_rejects_bad_changes(store, changes, field):
    await store.record_message(msg(1))
    with pytest.raises(ValidationError) as info:
        await store.update_message(1, changes)
    assert info.value.field == field
    [record] = await scan(store)
    assert record["reactions"] == 0 and record["channel_id"] == "200" and record["timestamp"] == "2024-01-15T12:00:00Z"


async def test_update_message_accepts_the_same_identity_in_another_notation(store):
    await store.record_message(msg(1))
    assert await store.update_message(1, {"timestamp": "2024-01-15T13:00:00+01:00", "author_id": 300,
                                          "reactions": 2})
    assert await store.message_counts(100) == 1
    with pytest.raises(ValidationError):
        await store.update_message(1, ["reactions", 3])
    with pytest.raises(ValidationError):
        await store.update_message("01", {"reactions": 3})


async def test_many_updates_last_one_wins(store):
    ref = Reference()
    await record_stream(store, ref, random.Random(8), random_stream(8, 120))
    rnd = random.Random(9)
    for _ in range(60):
        mid = rnd.choice(list(ref.messages))
        sentiment = rnd.choice([*SENTIMENTS, None])
        assert await store.update_message(mid, {"analysis": {"sentiment": sentiment}, "reactions": rnd.randrange(9)})
        ref.messages[mid]["sentiment"] = sentiment
        ref.messages[mid]["topics"] = None
    for guild in GUILDS:
        assert await store.sentiment_breakdown(guild) == ref.sentiments(guild)
        assert await store.top_topics(guild) == ref.top_topics(guild, 10)
        assert await store.message_counts(guild) == ref.counts(guild, None)


# ---------------------------------------------------------------------------------------------------------------
# prune_messages
@pytest.mark.parametrize("seed", [11, 12])
async def test_prune_keeps_exactly_the_newer(store, seed):
    rnd = random.Random(seed)
    ref = Reference()
    await record_stream(store, ref, rnd, random_stream(seed, 300))
    times = sorted(m["dt"] for m in ref.messages.values())
    bounds: list[Any] = [
        times[0] - timedelta(days=1),          # nothing is older
        datetime(2023, 12, 1, tzinfo=UTC),     # a month boundary
        canonical(rnd.choice(times[:len(times) // 2])),  # exactly a stored timestamp: it is kept
        rnd.choice(times[len(times) // 2:]).astimezone(timezone(timedelta(hours=-7))).isoformat(),
    ]
    for before in bounds:
        cut = to_dt(before)
        doomed = [k for k, m in ref.messages.items() if m["dt"] < cut]
        assert await store.prune_messages(before) == len(doomed)
        for key in doomed:
            del ref.messages[key]
        assert await store.prune_messages(before) == 0
        for guild in GUILDS:
            assert await store.message_counts(guild, by="day") == ref.counts(guild, "day")
            assert await store.top_authors(guild, 100) == ref.top_field(guild, "author", 100)
    # pruned ids are gone for good: recording them again counts them as new
    again = [msg(mid, timestamp="2025-01-01T00:00:00Z") for mid in ("1", "2", "3", "4", "5")]
    assert await store.record_messages(again) == ref.add(again)
    assert await store.prune_messages(datetime(9999, 1, 1, tzinfo=UTC)) == len(ref.messages)
    assert await scan(store) == []


async def test_prune_compares_times_not_texts(store):
    """``12:00:05Z`` is before ``12:00:05.25Z`` though it sorts after it as text."""
    await store.record_messages([msg(1, timestamp="2024-01-15T12:00:05Z"), msg(2, timestamp="2024-01-15T12:00:05.5Z"),
                                 msg(3, timestamp="2024-01-15T12:00:04.999999Z")])
    assert await store.prune_messages("2024-01-15T12:00:05.25Z") == 2
    assert [r["message_id"] for r in await scan(store)] == ["2"]
    assert await store.last_activity(100, 300) == "2024-01-15T12:00:05.500000Z"


async def test_prune_then_update_and_record(store):
    await store.record_messages([msg(1, timestamp="2024-01-01T00:00:00Z"), msg(2, timestamp="2024-01-20T00:00:00Z"),
                                 msg(3, timestamp="2024-03-05T00:00:00Z")])
    await store.update_message(2, {"reactions": 4})
    assert await store.prune_messages("2024-01-10T00:00:00Z") == 1
    assert await store.update_message(1, {"reactions": 1}) is False
    assert await store.update_message(2, {"reactions": 5}) is True
    assert await store.update_message(3, {"reactions": 6}) is True
    assert await store.record_messages([msg(2), msg(4)]) == 1
    rows = {r["message_id"]: r["reactions"] for r in await scan(store)}
    assert rows == {"2": 5, "3": 6, "4": 0}


# ---------------------------------------------------------------------------------------------------------------
# refresh_member_statistics
async def test_refresh_member_statistics(store):
    guild = "100"
    await store.save_member_data(300, guild, {"roles": ["mod"], "preferences": {"dm": False},
                                              "statistics": {"message_count": 999, "last_active": None,
                                                             "voice_minutes": 42}})
    await store.save_member_data(301, guild, {"roles": [], "statistics": {"message_count": 7}})  # no messages
    await store.save_member_data(300, "555", {"roles": ["other guild"]})
    # stored by an older version (the member rule refuses such a key now: storage/rules.py)
    await store._put_stored("members", {f"{guild}_not-a-member": {"note": "not a member key"}})
    await store.record_messages([
        msg(1, author_id="300", timestamp="2024-01-15T12:00:00Z"),
        msg(2, author_id="300", timestamp="2024-01-15T12:00:00.5Z"),
        msg(3, author_id="302", timestamp="2024-02-01T08:00:00+02:00"),  # no member doc yet
        msg(4, author_id="300", guild_id="555", timestamp="2025-01-01T00:00:00Z"),  # another guild
    ])
    assert await store.refresh_member_statistics(guild) == 3
    assert await store.get_member_data(300, guild) == {
        "roles": ["mod"], "preferences": {"dm": False},
        "statistics": {"message_count": 2, "last_active": "2024-01-15T12:00:00.500000Z", "voice_minutes": 42}}
    assert await store.get_member_data(301, guild) == {
        "roles": [], "statistics": {"message_count": 0, "last_active": None}}
    assert await store.get_member_data(302, guild) == {
        "user_id": "302", "guild_id": guild,
        "statistics": {"message_count": 1, "last_active": "2024-02-01T06:00:00Z"}}
    assert await store.get_member_data(300, "555") == {"roles": ["other guild"]}
    assert await store.get("members", f"{guild}_not-a-member") == {"note": "not a member key"}
    assert await store.refresh_member_statistics(guild) == 0  # nothing changed: nothing written
    # a window counts only its messages
    assert await store.refresh_member_statistics(guild, since="2024-01-15T12:00:00.1Z") == 1
    assert (await store.get_member_data(300, guild))["statistics"]["message_count"] == 1


async def test_refresh_member_statistics_matches_the_reference(store):
    ref = Reference()
    await record_stream(store, ref, random.Random(21), random_stream(21, 200))
    guild = GUILDS[1]
    authors = {m["author"] for m in ref.select(guild)}
    written = await store.refresh_member_statistics(guild)
    assert written == len(authors)
    for author in AUTHORS:
        data = await store.get_member_data(author, guild)
        mine = [m["dt"] for m in ref.select(guild) if m["author"] == author]
        if mine:
            assert data["statistics"] == {"message_count": len(mine), "last_active": canonical(max(mine))}
        else:
            assert data == {}


async def test_refresh_rejects_a_malformed_member_and_writes_nothing(store):
    await store._put_stored("members", {"100_300": {"statistics": "lots"}})  # stored by an older version
    await store.put("members", "100_301", {"roles": []})
    await store.record_messages([msg(1), msg(2, author_id="301")])
    with pytest.raises(ValidationError):
        await store.refresh_member_statistics(100)
    assert await store.get("members", "100_301") == {"roles": []}


async def test_refresh_looks_at_every_member_of_the_guild_and_nothing_else(store):
    """Members without messages in the range are reset (or left alone when they say so already); keys that are not
    ``<guild>_<snowflake>`` and other guilds' members are never touched; 20-digit ids are ids like any other."""
    guild, big = "18446744073709551615", "18446744073709551613"
    members = {
        f"{guild}_1": {"roles": ["no statistics"]},
        f"{guild}_2": {"statistics": None, "xp": 1},  # null counts as {}
        f"{guild}_3": {"statistics": {"message_count": 0, "last_active": None, "voice_minutes": 5}},
        f"{guild}_4": {"statistics": {"message_count": 0}},  # an absent last_active is None already
        f"{guild}_0": {"statistics": {"message_count": 3}},  # 0 is a snowflake
        f"{guild}_{big}": {"statistics": {"message_count": 2.0, "last_active": "2024-01-02T00:00:00Z"}},  # 2.0 == 2
        f"{guild}_007": {"statistics": {"message_count": 1}},  # not canonical: not a member key
        f"{guild}_18446744073709551616": {"statistics": {}},  # beyond 64 bits
        f"{guild}_abc": {"statistics": "not a member"},
        f"{guild}0_5": {"statistics": {}},  # another guild whose id starts with this one's
        "7_5": {"statistics": {}},
    }
    await store._put_stored("members", members)  # stored by an older version (storage/rules.py)
    await store.record_messages([
        msg(1, guild_id=guild, author_id=big, timestamp="2024-01-01T00:00:00Z"),
        msg(2, guild_id=guild, author_id=big, timestamp="2024-01-02T00:00:00Z"),
        msg(3, guild_id=guild, author_id="0", timestamp="2024-01-03T10:00:00.25+00:00"),
        msg(4, guild_id=guild, author_id="5", timestamp="2024-01-04T00:00:00Z"),  # no member document yet
        msg(5, guild_id="7", author_id="5"),
    ])

    async def stored() -> dict[str, Any]:
        return {key: doc async for key, doc in store.items("members")}

    none = {"message_count": 0, "last_active": None}
    assert await store.refresh_member_statistics(int(guild)) == 4
    assert await stored() == {
        **members,
        f"{guild}_1": {"roles": ["no statistics"], "statistics": none},
        f"{guild}_2": {"statistics": none, "xp": 1},
        f"{guild}_0": {"statistics": {"message_count": 1, "last_active": "2024-01-03T10:00:00.250000Z"}},
        f"{guild}_5": {"user_id": "5", "guild_id": guild,
                       "statistics": {"message_count": 1, "last_active": "2024-01-04T00:00:00Z"}},
    }
    assert await store.refresh_member_statistics(guild, until="2024-01-02T00:00:00Z") == 3
    assert (await store.get_member_data(big, guild))["statistics"] == {"message_count": 1,
                                                                       "last_active": "2024-01-01T00:00:00Z"}
    # an empty window (until before since): only what is not reset already is written
    assert await store.refresh_member_statistics(guild, since="2024-02-01", until="2024-01-01") == 1
    after = await stored()
    assert [after[f"{guild}_{user}"]["statistics"] for user in ("0", "5", big)] == [none] * 3
    assert await store.refresh_member_statistics(guild, since="2024-02-01", until="2024-01-01") == 0


async def test_refresh_checks_its_arguments_and_is_refused_inside_a_transaction(store, store_config):
    await store.record_messages([msg(1)])
    for args, bounds, field in [(("abc",), {}, "guild_id"), ((2**64,), {}, "guild_id"), ((True,), {}, "guild_id"),
                                ((100,), {"since": "yesterday"}, "since"), ((100,), {"until": 5}, "until")]:
        with pytest.raises(ValidationError) as info:
            await store.refresh_member_statistics(*args, **bounds)
        assert info.value.field == field
    async with store.transaction() as tx:
        with pytest.raises(storage.TransactionError):
            await store.refresh_member_statistics(100)
        await tx.put("members", "100_1", {"roles": []})
    assert await store.get_member_data(300, 100) == {}
    assert await store.get_member_data(1, 100) == {"roles": []}
    closed = await storage.open_store(config=store_config)
    await closed.close()
    with pytest.raises(storage.StoreClosedError):
        await closed.refresh_member_statistics(100)
    assert await store.refresh_member_statistics(100) == 2


async def test_refresh_names_the_first_malformed_member_and_creates_nothing(store):
    await store._put_stored("members", {"100_5": {"statistics": [1]}, "100_40": {"statistics": 7},
                                        "100_x": {"statistics": "not a member"}, "100_6": {"statistics": {}}})
    await store.record_messages([msg(1), msg(2, author_id="301"), msg(3, author_id="6")])
    with pytest.raises(ValidationError) as info:
        await store.refresh_member_statistics(100)
    assert str(info.value).startswith("members/100_40: statistics is a int, not an object")  # "100_40" < "100_5"
    assert info.value.field == "statistics"
    assert [key async for key, _doc in store.items("members")] == ["100_40", "100_5", "100_6", "100_x"]
    assert await store.get_member_data(6, 100) == {"statistics": {}}


# ---------------------------------------------------------------------------------------------------------------
# closed stores
async def test_a_closed_store_refuses_analytics(store_config):
    s = await storage.open_store(config=store_config)
    await s.record_message(msg(1))
    await s.close()
    for call in (s.record_message(msg(2)), s.record_messages([msg(2)]), s.message_counts(100),
                 s.update_message(1, {"reactions": 1}), s.prune_messages("2030-01-01"), s.top_authors(100)):
        with pytest.raises(storage.DatabaseError):
            await call


# ---------------------------------------------------------------------------------------------------------------
# several stores on the same data
async def test_two_stores_see_and_deduplicate_each_others_messages(store, reopen, caplog):
    caplog.set_level(logging.WARNING)
    other = await reopen()
    try:
        assert await other.record_messages([msg(1)]) == 1  # the other store's id index is now loaded
        assert await store.record_messages([msg(i) for i in range(2, 50)]) == 48
        assert await other.record_messages([msg(i) for i in range(40, 60)]) == 10  # 40-49 came from `store`
        assert await other.record_message(msg(3)) is False
        assert await store.message_counts(100) == await other.message_counts(100) == 59
        assert await other.update_message(45, {"reactions": 9})  # written by `store`, updated by `other`
        assert [r["reactions"] for r in await scan(store) if r["message_id"] == "45"] == [9]
        assert await store.update_message(45, {"reactions": 10})
        assert [r["reactions"] for r in await scan(other) if r["message_id"] == "45"] == [10]
        # a prune by one store: the other must not keep treating pruned ids as stored, nor lose the others
        await store.record_message(msg(100, timestamp="2024-03-01T00:00:00Z"))
        assert await store.prune_messages("2024-02-01T00:00:00Z") == 59
        assert await other.record_messages([msg(1), msg(100), msg(101, timestamp="2024-03-02T00:00:00Z")]) == 2
        assert await other.update_message(100, {"reactions": 3})
        assert await store.message_counts(100) == 3
        assert await store.record_messages([msg(1), msg(101)]) == 0
    finally:
        await other.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # no fallback path


CHILD = """
import asyncio, sys
import storage
async def main(path, start, stop):
    async with storage.open_store(backend="json", path=path) as store:
        new = 0
        for i in range(start, stop, 25):
            new += await store.record_messages(
                [{"message_id": m, "guild_id": 100, "channel_id": 200 + m % 3, "author_id": 300,
                  "timestamp": f"2024-0{1 + m % 3}-10T00:00:00Z"} for m in range(i, min(i + 25, stop))])
        print(new)
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_processes_appending_concurrently_count_each_message_once(store, store_config):
    if store_config.backend != "json":
        pytest.skip("a second process on a JSON folder")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    children = [await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, store_config.path, str(a), str(b),
                                                     stdout=asyncio.subprocess.PIPE, env=env)
                for a, b in ((1, 600), (300, 900))]
    mine = 0
    for i in range(450, 1200, 50):
        mine += await store.record_messages([msg(m, timestamp=f"2024-0{1 + m % 3}-10T00:00:00Z")
                                             for m in range(i, i + 50)])
    outputs = [await child.communicate() for child in children]
    assert [child.returncode for child in children] == [0, 0]
    theirs = sum(int(out.decode()) for out, _err in outputs)
    assert mine + theirs == 1199  # ids 1..1199, each counted new by exactly one writer
    assert await store.message_counts(100) == 1199
    assert await store.message_counts(100, by="day") == {"2024-01-10": 399, "2024-02-10": 400, "2024-03-10": 400}


# ---------------------------------------------------------------------------------------------------------------
# the generic query implementations (what a backend without its own gets)
class GenericJsonStore(JsonStore):
    """The JSON backend without its column cache: its query primitives over blocks built from ``_scan_messages``."""

    def _scan_message_columns(self, guild_id: str | None, since: datetime | None,
                              until: datetime | None) -> AsyncIterator[MessageColumns]:
        return columns_of(self._scan_messages(guild_id, since, until))


@pytest.mark.parametrize("seed", [31, 32])
async def test_the_generic_queries_match_the_reference(tmp_path, seed):
    store = await GenericJsonStore.open(StoreConfig(backend="json", path=str(tmp_path / "generic"), source="tests"))
    try:
        rnd = random.Random(seed)
        ref = Reference()
        await record_stream(store, ref, rnd, random_stream(seed, 300))
        for _ in range(20):
            mid = rnd.choice(list(ref.messages))
            await store.update_message(mid, {"analysis": {"sentiment": "negative", "topics": ["art", "art"]}})
            ref.messages[mid].update(sentiment="negative", topics=["art"])
        for since, until in windows(rnd, ref):
            await assert_queries_match(store, ref, since, until)
        assert await store.refresh_member_statistics(GUILDS[0]) == len({m["author"] for m in ref.select(GUILDS[0])})
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------------------------
# the JSON message log's files
@pytest.fixture
def json_only(store_config):
    if store_config.backend != "json":
        pytest.skip("the JSON message log's files")
    return Path(store_config.path) / "messages"


async def test_files_are_per_guild_and_month_and_readable(store, json_only):
    await store.record_messages([msg(1), msg(2, guild_id="101", timestamp="2024-02-29T23:59:59.999999+00:00")])
    await store.update_message(1, {"reactions": 3})
    assert sorted(p.relative_to(json_only).as_posix() for p in json_only.rglob("*.jsonl")) == [
        "100/2024-01.jsonl", "101/2024-02.jsonl"]
    lines = (json_only / "100" / "2024-01.jsonl").read_bytes().splitlines()
    assert lines[0].startswith(b'{"message_id":"1",') and lines[1].startswith(b'{"update":{"message_id":"1",')
    assert b'"reactions":3' in lines[1] and len(lines) == 2


async def test_the_id_index_is_loaded_lazily(store, json_only, reopen):
    await store.record_messages([msg(i) for i in range(1, 20)])
    other = await reopen()
    try:
        assert await other.message_counts(100) == 19
        assert other._messages._index is None  # queries never need it
        assert await other.record_message(msg(5)) is False
        assert other._messages._index is not None and len(other._messages._index) == 19
    finally:
        await other.close()


async def test_a_torn_last_line_is_dropped_with_a_warning(store, json_only, reopen, caplog):
    await store.record_messages([msg(i) for i in range(1, 6)])
    path = json_only / "100" / "2024-01.jsonl"
    good = path.read_bytes()
    for torn in (b'{"message_id":"77","guild_id":"1', b"\x00\x00\x00\x00\n"):
        path.write_bytes(good + torn)  # a crash mid-append (possibly zero-filled, ending in a newline)
        assert await store.message_counts(100) == 5  # readers skip it: it could still be in flight
        other = await reopen()
        try:
            with caplog.at_level(logging.WARNING, logger="storage.json.messages"):
                assert await other.record_message(msg(6)) is True
            assert "dropping a torn final line" in caplog.text
            assert path.read_bytes().startswith(good) and path.read_bytes().endswith(b"\n")
            assert await other.message_counts(100) == await store.message_counts(100) == 6
            assert await store.record_message(msg(7)) is True  # `store` catches up past the cut
            assert await other.prune_messages("2024-01-15T12:00:00Z") == 0
        finally:
            await other.close()
        await store.prune_messages("2030-01-01T00:00:00Z")
        await store.record_messages([msg(i) for i in range(1, 6)])
        caplog.clear()


async def test_a_corrupt_line_in_the_middle_raises_and_changes_nothing(store, json_only, reopen):
    await store.record_messages([msg(i) for i in range(1, 6)])
    path = json_only / "100" / "2024-01.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    position = len(lines[0]) + len(lines[1])
    lines[2] = b"#" * (len(lines[2]) - 1) + b"\n"
    damaged = b"".join(lines)
    path.write_bytes(damaged)
    with pytest.raises(CorruptDataError) as info:
        await store.message_counts(100)
    assert info.value.path == str(path) and info.value.position == position
    assert f"byte {position}" in str(info.value)
    with pytest.raises(CorruptDataError) as info:
        await scan(store, "100")  # full records (backups) go through the same check
    assert info.value.position == position
    other = await reopen()  # a fresh id index reads the whole file
    try:
        with pytest.raises(CorruptDataError) as info:
            await other.record_message(msg(6))
        assert info.value.position == position
        with pytest.raises(CorruptDataError):
            await other.prune_messages("2025-01-01T00:00:00Z")
    finally:
        await other.close()
    assert path.read_bytes() == damaged


async def test_a_record_line_with_a_wrong_shape_is_corruption(store, json_only):
    await store.record_messages([msg(1), msg(2)])
    path = json_only / "100" / "2024-01.jsonl"
    path.write_bytes(b'{"message_id":"9","timestamp":"2024-01-01T00:00:00Z"}\n' + path.read_bytes())
    with pytest.raises(CorruptDataError) as info:
        await store.top_topics(100)
    assert info.value.position == 0


async def test_a_prune_leaves_no_temp_files_and_removes_empty_folders(store, json_only):
    await store.record_messages([msg(1, timestamp="2024-01-01T00:00:00Z"), msg(2, guild_id="101"),
                                 msg(3, timestamp="2024-01-20T00:00:00Z")])
    assert await store.prune_messages("2024-01-10T00:00:00Z") == 1
    assert sorted(p.name for p in (json_only / "100").iterdir()) == ["2024-01.jsonl"]
    assert await store.prune_messages("2024-02-01T00:00:00Z") == 2
    assert sorted(p.name for p in json_only.iterdir()) == ["rewrites.generation"]


async def test_the_query_cache_follows_appends_updates_and_prunes(store, json_only, reopen):
    other = await reopen()
    try:
        await store.record_messages([msg(i, author_id=str(300 + i % 3)) for i in range(1, 31)])
        assert await store.top_authors(100) == [("300", 10), ("301", 10), ("302", 10)]  # cache built
        await other.record_messages([msg(i, author_id="301") for i in range(31, 36)])  # appended elsewhere
        assert await store.top_authors(100, 1) == [("301", 15)]
        await other.update_message(3, {"analysis": {"sentiment": "negative"}})  # first update line in the file
        assert await store.sentiment_breakdown(100) == {"negative": 1, "positive": 34}
        await store.update_message(4, {"analysis": {"sentiment": None}})  # the cache now has rows by id
        await store.update_message(3, {"analysis": {"sentiment": "neutral", "topics": ["x"]}})
        assert await store.sentiment_breakdown(100) == {"neutral": 1, "positive": 33, "unknown": 1}
        assert await store.top_topics(100) == [("music", 33), ("x", 1)]
        await other.record_message(msg(99, timestamp="2024-02-01T00:00:00Z"))
        assert await other.prune_messages("2024-01-31T00:00:00Z") == 35  # a rewrite elsewhere
        assert await store.message_counts(100, by="day") == {"2024-02-01": 1}
        await other.record_messages([msg(i) for i in range(1, 4)])  # the same paths, new files
        assert await store.message_counts(100) == 4
    finally:
        await other.close()


# ---------------------------------------------------------------------------------------------------------------
# `storage stats`
def test_the_stats_command_prints_totals_top_lists_and_a_chart(tmp_path, capsys):
    from storage.cli import main

    path = str(tmp_path / "data")

    async def fill() -> None:
        async with storage.open_store(backend="json", path=path) as s:
            await s.record_messages([msg(i, channel_id=str(200 + i % 2), author_id=str(300 + i % 3),
                                         timestamp=f"2024-01-{1 + i % 5:02d}T10:00:00Z") for i in range(1, 31)])

    asyncio.run(fill())
    assert main(["stats", "100", "--path", path, "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "Messages: 30" in out and "Authors: 3" in out and "Channels: 2" in out
    assert "2024-01-01" in out and "2024-01-05" in out and "█" in out
    assert "Top authors" in out and "300" in out and "positive" in out
    assert main(["stats", "100", "--path", path, "--channel", "201", "--since", "2024-01-02", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected_days = Counter(f"2024-01-{1 + i % 5:02d}" for i in range(1, 31) if i % 2 == 1 and 1 + i % 5 >= 2)
    assert summary["messages"] == sum(expected_days.values()) and summary["per_day"] == dict(sorted(
        expected_days.items()))
    assert main(["stats", "not-a-guild", "--path", path]) == 1
    assert "guild_id" in capsys.readouterr().err


def test_the_activity_chart_groups_long_periods():
    from storage.commands.stats import Summary, bar, render

    assert bar(0, 10, 20) == "" and bar(10, 10, 4) == "████" and bar(1, 16, 1) == "▏"
    days = {(datetime(2024, 1, 1) + timedelta(days=d)).date().isoformat(): d % 7 + 1 for d in range(200)}
    text = render(Summary("1", None, None, None, messages=sum(days.values()), per_day=days,
                          sentiment={"unknown": sum(days.values())}), columns=80)
    assert "Activity per week" in text and "2024-01-01" in text
    text = render(Summary("1", None, None, None, messages=3, per_day={"2024-01-01": 3}, sentiment={"x": 3}))
    assert "Activity per day" in text
    assert "No messages" in render(Summary("1", None, None, None))
