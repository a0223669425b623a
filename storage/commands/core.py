"""``demo``, ``status`` and ``compact``: the everyday commands (``check`` has its own module).

``demo`` is the README's first command: a realistic simulated bot session against the configured store (the JSON
default in ``./config`` unless the environment says otherwise), so a new user sees the library work end to end,
and how fast, before writing any code.
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import open_store
from ..backup.messages import MessageOps
from ..cli import CommandRefused, add_store_options, config_from_args, existing_store_config
from ..errors import DatabaseError
from ..migrations.ledger import read_applied
from ..migrations.version import parse_version
from ..models import member_key

__all__ = ["register"]

DISCORD_EPOCH_MS = 1_420_070_400_000
CHANNELS = ("general", "gaming", "memes", "help", "announcements")
TOPICS = ("gaming", "discussion", "music", "anime", "programming", "memes", "news")
SENTIMENTS = ("positive", "neutral", "negative")
#: The collection where the demo notes each guild it filled (seed and clock), so that it can tell its own data
#: from a real bot's and replay itself instead of doubling the data.
DEMO_MARKER = "_demo"
DEMO_COLLECTIONS = ("members", "economy")


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="simulate a bot session (members joining and chatting) and print stats")
    add_store_options(demo)
    demo.add_argument("--guild", type=int, default=987654321, help="guild id to simulate (default %(default)s)")
    demo.add_argument("--members", type=int, default=500, help="members joining (default %(default)s)")
    demo.add_argument("--messages", type=int, default=5000, help="messages sent (default %(default)s)")
    demo.add_argument("--seed", type=int, default=None, help="random seed (default: a new session each run)")
    demo.add_argument("--force", action="store_true",
                      help="fill a store that already holds data the demo did not write (default: refuse)")
    demo.set_defaults(func=run_demo)

    status = sub.add_parser("status", help="which backend is configured and what it holds")
    add_store_options(status)
    status.set_defaults(func=run_status)

    compact = sub.add_parser("compact", help="JSON backend: fold the journal into plain JSON files now")
    add_store_options(compact)
    compact.add_argument("--merge-external", action="store_true",
                         help="a snapshot was edited while the journal still held newer changes to it: keep both "
                              "(the journal's values win for the documents it changed, the edit stays for the rest)")
    compact.set_defaults(func=run_compact)


def _snowflake(when: datetime, rng: random.Random) -> str:
    """A plausible Discord id for an event at ``when`` (ms since the Discord epoch, shifted left 22 bits)."""
    ms = int(when.timestamp() * 1000) - DISCORD_EPOCH_MS
    return str((ms << 22) | rng.getrandbits(22))


class _Timer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, int, float]] = []

    def add(self, what: str, count: int, started: float) -> None:
        self.rows.append((what, count, time.perf_counter() - started))


async def _foreign_data(store: Any, demo_guilds: set[str]) -> list[str]:
    """What ``store`` holds that no demo run wrote (empty: nothing, or only the demo's guilds' data)."""
    foreign = []
    prefixes = tuple(f"{guild}_" for guild in demo_guilds)
    for name in await store.collections():
        if name == DEMO_MARKER:
            continue
        if name in DEMO_COLLECTIONS and prefixes:
            n = sum([1 async for key, _ in store.items(name) if not key.startswith(prefixes)])
        else:
            n = await store.count(name)
        if n:
            foreign.append(f"{n} {name} document(s)")
    total = await MessageOps(store).count()
    ours = sum([await store.message_counts(guild) for guild in demo_guilds])
    if total > ours:
        foreign.append(f"{total - ours} message(s)")
    return foreign


async def run_demo(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    guild = str(args.guild)
    timer = _Timer()
    print(f"storage demo: about to fill {config.describe()} with {args.members} fake members and "
          f"{args.messages} messages in guild {guild}")
    async with open_store(config=config) as store:
        runs = {key: doc async for key, doc in store.items(DEMO_MARKER)}
        foreign = await _foreign_data(store, set(runs))
        if foreign and not args.force:
            raise CommandRefused(
                f"{config.describe()} already holds data the demo did not write ({', '.join(foreign)}); the demo "
                "would add fake members to it. Point --path/--dsn at another store, or pass --force")
        previous = runs.get(guild)
        if previous is not None:
            # Same seed, same clock: the same ids, so saves overwrite and record_messages skips what is there.
            seed, now = int(previous["seed"]), datetime.fromisoformat(previous["anchor"])
            print(f"the demo already filled guild {guild} here: replaying the same session (nothing is doubled)")
        else:
            seed = args.seed if args.seed is not None else random.randrange(2**32)
            now = datetime.now(timezone.utc).replace(microsecond=0)
            await store.put(DEMO_MARKER, guild, {"seed": seed, "anchor": now.isoformat()})
        rng = random.Random(seed)
        # 1. members join: the seed's own call, one durable save each
        started = time.perf_counter()
        user_ids = []
        for _ in range(args.members):
            joined = now - timedelta(days=rng.uniform(1, 365))
            user_id = _snowflake(joined, rng)
            user_ids.append(user_id)
            await store.save_member_data(user_id, guild, {
                "user_id": user_id,
                "guild_id": guild,
                "join_date": joined.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "roles": ["member"],
                "preferences": {"notifications": rng.random() < 0.8, "language": rng.choice(["ja", "en"])},
                "statistics": {"message_count": 0, "last_active": None},
            })
        timer.add("members joined (save_member_data)", args.members, started)

        # 2. they chat: message-analytics records, ingested in bulk like a bot's flush loop would
        started = time.perf_counter()
        channels = {name: _snowflake(now - timedelta(days=400), rng) for name in CHANNELS}
        weights = [rng.paretovariate(1.2) for _ in user_ids]  # a few members talk a lot
        records = []
        for _ in range(args.messages):
            sent = now - timedelta(seconds=rng.uniform(0, 7 * 86400))
            records.append({
                "message_id": _snowflake(sent, rng),
                "guild_id": guild,
                "channel_id": channels[rng.choice(CHANNELS)],
                "author_id": rng.choices(user_ids, weights)[0],
                "timestamp": sent.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "content_length": rng.randint(1, 400),
                "attachments": int(rng.random() < 0.1),
                "reactions": rng.randint(0, 5),
                "analysis": {"sentiment": rng.choice(SENTIMENTS), "topics": rng.sample(TOPICS, rng.randint(0, 2))},
            })
        new = 0
        for i in range(0, len(records), 1000):
            new += await store.record_messages(records[i:i + 1000])
        timer.add("messages recorded (record_messages)", new, started)

        started = time.perf_counter()
        refreshed = await store.refresh_member_statistics(guild)
        timer.add("member statistics refreshed", refreshed, started)

        # 3. a moderator promotes the top talkers in one batch (one malformed row is skipped and logged)
        top = await store.top_authors(guild, limit=10)
        updates: list[dict[str, Any]] = []
        for author, _count in top:
            member = await store.get_member_data(author, guild)
            member["roles"] = sorted(set(member.get("roles", [])) | {"regular"})
            updates.append({"user_id": author, "guild_id": guild, "data": member})
        updates.append({"user_id": "not-a-snowflake", "guild_id": guild, "data": {}})
        started = time.perf_counter()
        promoted = await store.batch_update_members(updates)
        timer.add("members promoted (batch_update_members)", promoted, started)

        # 4. an atomic counter, as a !daily command would keep it
        started = time.perf_counter()
        for user_id in user_ids[:100]:
            await store.update("economy", member_key(user_id, guild),
                               lambda d: {**d, "points": d.get("points", 0) + 10}, default={"points": 0})
        timer.add("daily points (update, atomic)", min(100, len(user_ids)), started)

        total = await store.message_counts(guild)
        per_day = await store.message_counts(guild, by="day")
        sentiment = await store.sentiment_breakdown(guild)
        topics = await store.top_topics(guild, limit=5)
        names = {v: k for k, v in channels.items()}
        top_channels = await store.top_channels(guild, limit=5)
        members_total = await store.count("members")

    print()
    print(f"{'operation':<42}{'count':>8}{'seconds':>10}{'per second':>12}")
    for what, count, seconds in timer.rows:
        rate = f"{count / seconds:,.0f}" if seconds > 0 and count else "-"
        print(f"{what:<42}{count:>8}{seconds:>10.3f}{rate:>12}")
    print()
    print(f"guild {guild}: {members_total} members, {total} messages stored")
    print("top authors:   " + ", ".join(f"{a[-6:]}…={c}" for a, c in top[:5]))
    print("top channels:  " + ", ".join(f"#{names.get(c, c)}={n}" for c, n in top_channels))
    print("top topics:    " + ", ".join(f"{t}={n}" for t, n in topics))
    print("sentiment:     " + ", ".join(f"{s}={n}" for s, n in sorted(sentiment.items())))
    if isinstance(per_day, dict) and per_day:
        peak = max(per_day.values())
        print("activity (last days):")
        for day in sorted(per_day)[-8:]:
            print(f"  {day} {'█' * max(1, round(40 * per_day[day] / peak))} {per_day[day]}")
    where = config.path if config.backend == "json" else config.safe_dsn
    print(f"\ndata is in {where}; run `python -m storage status` to inspect it")
    return 0


async def _message_summary(store: Any) -> str | None:
    """``N messages in G guild(s), oldest ..., newest ...``, None without messages.

    From the backend's own summary (SQL aggregates; the JSON column cache, built in a worker thread): scanning
    every record here took ~2.3 s of event-loop time at 1M messages (issue 15). Oldest and newest are by time.
    """
    count, guilds, oldest, newest = await store._message_summary()
    if not count:
        return "0"
    return f"{count} in {guilds} guild(s), oldest {oldest}, newest {newest}"


async def _migration_version(store: Any) -> str:
    try:
        applied = await read_applied(store)
    except DatabaseError as exc:
        return f"unreadable ledger ({exc}); run 'python -m storage check'"
    if not applied:
        return "none applied"
    current = max(applied, key=lambda a: parse_version(a.version))
    return f"{current.version} ({len(applied)} applied)"


async def _declared_indexes(store: Any) -> dict[str, list[str]]:
    """Every collection's declared indexes (``ensure_index``), also a collection that holds no document yet."""
    indexes: dict[str, list[str]] = await store._all_indexes()
    return indexes


async def run_status(args: argparse.Namespace) -> int:
    config = existing_store_config(args)
    print(f"backend: {config.describe()}")
    async with open_store(config=config) as store:
        indexes = await _declared_indexes(store)
        names = sorted({*await store.collections(), *indexes})  # a collection indexed but still empty too
        shown = [name for name in names if not name.startswith("_")]  # _migrations, _demo...: internals
        print(f"collections: {len(shown)}")
        for name in shown:
            print(f"  {name:<32}{await store.count(name):>10} documents")
            if indexes.get(name):
                print(f"    indexes: {', '.join(indexes[name])}")
        messages = await _message_summary(store)
        if messages is not None:
            print(f"messages: {messages}")
        stats = getattr(store, "stats", None)
        if callable(stats):
            info = stats()
            print(f"journal: {info['journal_bytes']} bytes (generation {info['journal_generation']})")
            for name, why in info["foreign_files"].items():
                print(f"  note: {name}.json is not a collection ({why}); left alone")
        backups = await store.list_backups()  # type: ignore[attr-defined]
        last = f"{backups[-1].id} ({backups[-1].created_at:%Y-%m-%d %H:%M:%S} UTC)" if backups else "none"
        print(f"last backup: {last} (backup folder {config.backup_dir})")
        print(f"migration version: {await _migration_version(store)}")
    return 0


async def run_compact(args: argparse.Namespace) -> int:
    config = existing_store_config(args)
    if config.backend != "json":
        print("compact applies to the JSON backend only (PostgreSQL manages its own storage)")
        return 2
    from ..stores import JsonStore

    store = await JsonStore.open(config, merge_external=args.merge_external)
    try:
        await store.compact()
    finally:
        await store.close()
    print(f"compacted {config.path}")
    return 0
