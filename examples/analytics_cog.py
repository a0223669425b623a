"""A message-analytics cog for a discord.py bot, and a simulation that runs it without Discord.

Run ``python examples/analytics_cog.py``: it opens a JSON store in a temporary folder, feeds the cog a day of
simulated messages and reactions, then prints what the ``!stats`` command would answer.

In a real bot (discord.py 2.x)::

    store = await storage.open_store()                 # JSON in ./config, or Postgres from DATABASE_URL
    await bot.add_cog(AnalyticsCog(bot, store))

What it shows:

* Messages are **buffered and recorded in batches** (``record_messages``): one durable write per batch instead of
  one per message, which is what keeps a busy guild cheap. A batch is flushed when it is full or a few seconds
  old, and on unload. If a flush fails, the batch stays buffered and is retried: ``record_messages`` is
  idempotent by ``message_id``, so a retry never counts a message twice.
* **Reactions** change after the message was recorded: ``update_message`` stores the new count (an absolute
  value from Discord, so a replayed event is harmless). A message still in the buffer is updated in place.
* **Queries** answer a stats command; a **daily task** prunes old messages and refreshes members' statistics.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import storage

try:  # the cog plugs into discord.py when it is installed; the simulation below does not need it
    from discord.ext import commands

    CogBase: Any = commands.Cog
    listener: Callable[[], Callable[[Any], Any]] = commands.Cog.listener
except ImportError:
    CogBase = object

    def listener() -> Callable[[Any], Any]:
        return lambda fn: fn

RETENTION = timedelta(days=90)
POSITIVE = {"thanks", "great", "love", "nice", "gg"}
NEGATIVE = {"bug", "broken", "hate", "lag", "crash"}
TOPIC_WORDS = {"gaming": {"game", "gg", "lag"}, "music": {"song", "album"}, "programming": {"bug", "python", "crash"}}


def analyze(content: str) -> dict[str, Any]:
    """A stand-in for a real analysis pipeline: keyword sentiment and topics."""
    words = set(content.lower().split())
    score = len(words & POSITIVE) - len(words & NEGATIVE)
    sentiment = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return {"sentiment": sentiment, "topics": sorted(t for t, keys in TOPIC_WORDS.items() if words & keys)}


class AnalyticsCog(CogBase):  # type: ignore[misc]
    """Records every guild message; answers ``!stats``; prunes and refreshes statistics daily."""

    def __init__(self, bot: Any, store: storage.Store, *, batch_size: int = 500, flush_every: float = 2.0) -> None:
        self.bot = bot
        self.store = store
        self.batch_size = batch_size
        self.flush_every = flush_every
        self._buffer: dict[int, dict[str, Any]] = {}  # message id -> record, in arrival order
        self._in_flight: dict[int, dict[str, Any]] = {}  # the batch being recorded right now
        self._late: dict[int, int] = {}  # reaction counts that arrived for the batch in flight
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None

    # -- recording -----------------------------------------------------------------------------------------------
    @listener()
    async def on_message(self, message: Any) -> None:
        if message.guild is None or message.author.bot:
            return  # direct messages and bots are not analysed
        self._buffer[message.id] = {
            "message_id": message.id,
            "guild_id": message.guild.id,
            "channel_id": message.channel.id,
            "author_id": message.author.id,
            "timestamp": message.created_at,  # an aware datetime: stored as ISO text in UTC
            "content_length": len(message.content),
            "attachments": len(message.attachments),
            "reactions": sum(r.count for r in message.reactions),
            "analysis": analyze(message.content),
        }
        if len(self._buffer) >= self.batch_size:
            await self.flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())

    @listener()
    async def on_reaction_add(self, reaction: Any, user: Any) -> None:
        message = reaction.message
        total = sum(r.count for r in message.reactions)
        if message.id in self._buffer:
            self._buffer[message.id]["reactions"] = total
        elif message.id in self._in_flight:
            self._late[message.id] = total  # applied once the batch is stored
        else:
            # False when the message is not stored (older than the retention, or sent before the bot joined)
            await self.store.update_message(message.id, {"reactions": total})

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_every)
        await self.flush()

    async def flush(self) -> int:
        """Record the buffered messages; on failure they go back to the buffer for the next flush."""
        async with self._flush_lock:
            if not self._buffer:
                return 0
            self._in_flight, self._buffer = self._buffer, {}
            try:
                new = await storage.safe_database_operation(
                    self.store.record_messages, list(self._in_flight.values()), retry_delay=0.5)
            except BaseException:
                for message_id, total in self._late.items():
                    self._in_flight[message_id]["reactions"] = total
                self._buffer = {**self._in_flight, **self._buffer}
                raise
            finally:
                self._in_flight, late, self._late = {}, self._late, {}
            for message_id, total in late.items():
                await self.store.update_message(message_id, {"reactions": total})
            return new

    async def cog_unload(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()

    # -- the stats command ---------------------------------------------------------------------------------------
    async def stats_text(self, guild_id: int, days: int = 7) -> str:
        """What ``!stats [days]`` replies (a real command would be ``@commands.command()`` calling this)."""
        since = datetime.now(timezone.utc) - timedelta(days=days)
        total = await self.store.message_counts(guild_id, since=since)
        if not total:
            return f"No messages in the last {days} days."
        authors = await self.store.top_authors(guild_id, 3, since=since)
        channels = await self.store.top_channels(guild_id, 3, since=since)
        topics = await self.store.top_topics(guild_id, 3, since=since)
        mood = await self.store.sentiment_breakdown(guild_id, since=since)
        per_day = await self.store.message_counts(guild_id, by="day", since=since)
        lines = [f"**{total:,} messages in the last {days} days**",
                 "Top chatters: " + ", ".join(f"<@{a}> ({n})" for a, n in authors),
                 "Busiest channels: " + ", ".join(f"<#{c}> ({n})" for c, n in channels),
                 "Hot topics: " + (", ".join(f"{t} ({n})" for t, n in topics) or "-"),
                 "Mood: " + ", ".join(f"{k} {100 * n / total:.0f}%" for k, n in mood.items()),
                 "Busiest day: " + max(per_day.items(), key=lambda kv: kv[1])[0]]
        return "\n".join(lines)

    # -- daily maintenance ---------------------------------------------------------------------------------------
    async def daily_maintenance(self, guild_ids: list[int]) -> dict[str, int]:
        """Run from a ``tasks.loop(hours=24)``: drop what is past retention, refresh members' statistics."""
        await self.flush()
        pruned = await self.store.prune_messages(datetime.now(timezone.utc) - RETENTION)
        refreshed = 0
        for guild_id in guild_ids:
            refreshed += await self.store.refresh_member_statistics(guild_id)
        return {"pruned": pruned, "members_refreshed": refreshed}


# -------------------------------------------------------------------------------------------------------------------
# a simulation: the few attributes of discord.py's objects that the cog reads
@dataclass
class Obj:
    id: int
    bot: bool = False


@dataclass
class Reaction:
    emoji: str
    count: int
    message: Any = None


@dataclass
class Message:
    id: int
    guild: Obj | None
    channel: Obj
    author: Obj
    created_at: datetime
    content: str
    attachments: list[str] = field(default_factory=list)
    reactions: list[Reaction] = field(default_factory=list)


def snowflake(when: datetime, rnd: random.Random) -> int:
    """A Discord-style id: milliseconds since the Discord epoch, shifted 22 bits, plus random low bits."""
    return ((int(when.timestamp() * 1000) - 1_420_070_400_000) << 22) | rnd.getrandbits(22)


async def simulate(path: Path, messages: int = 3000, seed: int = 7) -> None:
    rnd = random.Random(seed)
    now = datetime.now(timezone.utc)
    guild = Obj(snowflake(now - timedelta(days=900), rnd))
    channels = [Obj(snowflake(now - timedelta(days=800 - i), rnd)) for i in range(4)]
    users = [Obj(snowflake(now - timedelta(days=700 - i), rnd)) for i in range(40)] + [Obj(1, bot=True)]
    words = sorted(POSITIVE | NEGATIVE | {w for ws in TOPIC_WORDS.values() for w in ws} | {"hello", "ok", "lol"})

    async with storage.open_store(backend="json", path=path) as store:
        for user in users[:30]:  # members the bot already knows (say, from on_member_join)
            await store.save_member_data(user.id, guild.id, {"roles": ["member"], "statistics": {}})
        cog = AnalyticsCog(bot=None, store=store, batch_size=500)
        sent: list[Message] = []
        for i in range(messages):
            when = now - timedelta(days=100) + timedelta(days=100 * i / messages)
            text = " ".join(rnd.choices(words, k=rnd.randrange(1, 8)))
            message = Message(snowflake(when, rnd), guild, rnd.choice(channels), rnd.choice(users), when, text,
                              attachments=["a.png"] * (rnd.random() < 0.1))
            sent.append(message)
            await cog.on_message(message)
            if sent and rnd.random() < 0.2:  # someone reacts to a recent message
                target = rnd.choice(sent[-800:])
                if not target.reactions:
                    target.reactions.append(Reaction("👍", 0, target))
                target.reactions[0].count += 1
                await cog.on_reaction_add(target.reactions[0], rnd.choice(users))
        # Discord redelivers events after a reconnect: the replay must not count anything twice
        for message in sent[-200:]:
            await cog.on_message(message)
        await cog.cog_unload()

        print(cog_reply := await cog.stats_text(guild.id, days=7))
        assert cog_reply
        print()
        print("all-time messages:", await store.message_counts(guild.id), f"(sent: {len({m.id for m in sent})}"
              f", bots ignored: {sum(m.author.bot for m in sent)})")
        print("maintenance:", await cog.daily_maintenance([guild.id]))
        print("after pruning:", await store.message_counts(guild.id), "messages;",
              "a member's statistics:", (await store.get_member_data(users[0].id, guild.id))["statistics"])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="analytics-cog-") as folder:
        asyncio.run(simulate(Path(folder) / "data"))


if __name__ == "__main__":
    main()
