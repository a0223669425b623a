"""The bot's one cog: everything it stores and every command that reads it, on ``storage``.

* a member joins: their record (``join_date``, roles, default preferences), kept if they had one (a re-join);
* a message (not a command): its analytics record (``record_message``) and the author's counter, an atomic
  ``update`` (no increment is lost however many messages arrive at once, also with several shards on one store);
* ``!stats``: top authors and a per-day chart (a code block), from the message analytics queries;
* ``!rank``: the ten members with the most messages, a ``find`` over member documents ordered by their counter;
* ``!prefix [new]``: the guild's command prefix, a document in ``settings`` keyed by the guild id (an int key);
* ``!mydata`` / ``!forgetme``: a member's data request, ``export_user`` (sent as a JSON file) and ``forget_user``;
* the bot leaves a guild: ``forget_guild`` removes everything the guild owned;
* a daily backup (``discord.ext.tasks``), pruned to the last :data:`KEEP_BACKUPS`.

The cog never opens or closes the store: the bot does, in ``setup_hook`` and ``close()`` (see ``bot.py``), in the
one event loop that runs everything.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import discord
import orjson
from discord.ext import commands, tasks

import storage
from storage.models import MEMBERS, iso_utc, member_key, parse_timestamp

log = logging.getLogger("examplebot")

SETTINGS = "settings"
DEFAULT_PREFIX = "!"
KEEP_BACKUPS = 7
CHART_DAYS = 14
CHART_WIDTH = 30


def fresh_member(member: discord.Member) -> storage.Member:
    """A new member record in the seed's shape (the store puts ``join_date`` in canonical form)."""
    return {
        "user_id": str(member.id),
        "guild_id": str(member.guild.id),
        "join_date": iso_utc(member.joined_at or datetime.now(timezone.utc)),
        "roles": [role.name for role in member.roles if not role.is_default()],
        "preferences": {"notifications": True, "language": "en"},
        "statistics": {"message_count": 0, "last_active": None},
    }


def count_message(author_id: int, guild_id: int, when: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The ``update`` function for one message: +1, and the latest time (compared as times: canonical text is not
    ordered like time as a string, ``...:06Z`` sorts after ``...:06.5Z``)."""

    def bump(doc: dict[str, Any]) -> dict[str, Any]:
        doc.setdefault("user_id", str(author_id))
        doc.setdefault("guild_id", str(guild_id))
        stats = doc.get("statistics")
        if not isinstance(stats, dict):
            stats = doc["statistics"] = {}
        stats["message_count"] = int(stats.get("message_count") or 0) + 1
        last = stats.get("last_active")
        if last is None or parse_timestamp(last) < parse_timestamp(when):
            stats["last_active"] = when
        return doc

    return bump


def format_stats(guild_name: str, top: list[tuple[str, int]], per_day: dict[str, int],
                 names: dict[str, str]) -> str:
    """``!stats``'s answer: the top authors, then one bar per day (most recent :data:`CHART_DAYS` days)."""
    lines = [f"**Activity in {guild_name}**", "Top authors:"]
    lines += [f"{rank}. {names.get(author, author)}: {count}" for rank, (author, count) in enumerate(top, 1)]
    if not top:
        lines.append("(no messages yet)")
    days = sorted(per_day)[-CHART_DAYS:]
    peak = max((per_day[d] for d in days), default=0)
    chart = [f"{day} {'#' * max(1, round(CHART_WIDTH * per_day[day] / peak)):<{CHART_WIDTH}} {per_day[day]}"
             for day in days]
    lines += ["```", *(chart or ["no data"]), "```"]
    return "\n".join(lines)


def format_rank(rows: list[tuple[str, dict[str, Any]]], names: dict[str, str]) -> str:
    """``!rank``'s answer from ``find``'s ``(key, member)`` rows, best first."""
    if not rows:
        return "Nobody has written anything yet."
    out = ["**Most messages**"]
    for place, (key, member) in enumerate(rows, 1):
        user = key.rpartition("_")[2]
        out.append(f"{place}. {names.get(user, user)}: {member['statistics']['message_count']}")
    return "\n".join(out)


class DataCog(commands.Cog):
    """Stores members and messages, answers the data commands. ``bot.store`` is the open store."""

    def __init__(self, bot: Any, *, backup_hours: float = 24.0) -> None:
        self.bot = bot
        self.backups_made = 0
        self.backup.change_interval(hours=backup_hours)

    @property
    def store(self) -> storage.Store:
        return self.bot.store  # type: ignore[no-any-return]

    async def cog_load(self) -> None:
        self.backup.start()

    async def cog_unload(self) -> None:
        self.backup.cancel()

    # -- events ---------------------------------------------------------------------------------------------------
    @commands.Cog.listener()
    async def on_member_join(self, member: discord.Member) -> None:
        key = member_key(member.id, member.guild.id)
        new = fresh_member(member)
        # One atomic read-modify-write: a re-join keeps the statistics, and a counter increment made meanwhile by
        # on_activity (another task, maybe another shard) cannot be overwritten by a stale copy.
        await self.store.update(MEMBERS, key, lambda doc: {**new, **doc, "join_date": new["join_date"],
                                                           "roles": new["roles"]})

    @commands.Cog.listener()
    async def on_activity(self, message: discord.Message) -> None:
        """A guild message that is not a command (dispatched by the bot's ``on_message``)."""
        assert message.guild is not None
        when = iso_utc(message.created_at)
        await self.store.record_message({
            "message_id": message.id, "guild_id": message.guild.id, "channel_id": message.channel.id,
            "author_id": message.author.id, "timestamp": when, "content_length": len(message.content),
            "attachments": len(message.attachments), "reactions": 0,
        })
        await self.store.update(MEMBERS, member_key(message.author.id, message.guild.id),
                                count_message(message.author.id, message.guild.id, when))

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        removed = await self.store.forget_guild(guild.id)  # type: ignore[attr-defined]
        log.info("left guild %s: removed %s", guild.id, removed)

    # -- commands -------------------------------------------------------------------------------------------------
    def _names(self, guild: discord.Guild) -> dict[str, str]:
        return {str(m.id): m.display_name for m in guild.members}

    @commands.command()
    @commands.guild_only()
    async def stats(self, ctx: commands.Context[Any]) -> None:
        """Top authors and messages per day."""
        assert ctx.guild is not None
        since = datetime.now(timezone.utc) - timedelta(days=CHART_DAYS)
        top = await self.store.top_authors(ctx.guild.id, limit=5)
        per_day = await self.store.message_counts(ctx.guild.id, by="day", since=since)
        assert isinstance(per_day, dict)
        await ctx.send(format_stats(ctx.guild.name, top, per_day, self._names(ctx.guild)))

    @commands.command()
    @commands.guild_only()
    async def rank(self, ctx: commands.Context[Any]) -> None:
        """The ten members with the most messages."""
        assert ctx.guild is not None
        rows = await self.store.find(  # type: ignore[attr-defined]
            MEMBERS, {"statistics.message_count": {"$gt": 0}}, prefix=f"{ctx.guild.id}_",
            order_by="-statistics.message_count", limit=10)
        await ctx.send(format_rank(rows, self._names(ctx.guild)))

    @commands.command()
    @commands.guild_only()
    async def prefix(self, ctx: commands.Context[Any], new: str | None = None) -> None:
        """Show the command prefix, or set it (needs Manage Server)."""
        assert ctx.guild is not None
        if new is None:
            settings = await self.store.get(SETTINGS, ctx.guild.id, default={})
            await ctx.send(f"The prefix is `{settings.get('prefix', DEFAULT_PREFIX)}`")
            return
        if not ctx.author.guild_permissions.manage_guild:  # type: ignore[union-attr]
            await ctx.send("You need the Manage Server permission to change the prefix.")
            return
        if not 1 <= len(new) <= 5 or any(c.isspace() for c in new):
            await ctx.send("A prefix is 1 to 5 characters without spaces.")
            return
        await self.store.update(SETTINGS, ctx.guild.id, lambda doc: {**doc, "prefix": new})
        await ctx.send(f"The prefix is now `{new}`")

    @commands.command()
    async def mydata(self, ctx: commands.Context[Any]) -> None:
        """Everything stored about you, as a JSON file (a data request)."""
        data = await self.store.export_user(ctx.author.id)  # type: ignore[attr-defined]
        body = orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        await ctx.send("Here is everything stored about you.",
                       file=discord.File(io.BytesIO(body), filename=f"data_{ctx.author.id}.json"))

    @commands.command()
    @commands.guild_only()
    async def forgetme(self, ctx: commands.Context[Any]) -> None:
        """Delete what is stored about you in this server (your messages' records and your member record)."""
        assert ctx.guild is not None
        removed = await self.store.forget_user(ctx.author.id, guild_id=ctx.guild.id)  # type: ignore[attr-defined]
        total = sum(removed.values()) if isinstance(removed, dict) else removed
        await ctx.send(f"Done: {total} stored items about you were deleted from this server.")

    # -- the backup task ------------------------------------------------------------------------------------------
    @tasks.loop(hours=24)
    async def backup(self) -> None:
        """A verified backup (to ``STORAGE_BACKUP_DIR``: a mounted volume on Railway), keeping the last few."""
        try:
            info = await self.store.create_backup(keep=KEEP_BACKUPS)
        except storage.DatabaseError:
            log.exception("backup failed; the next one runs as scheduled")
            return
        self.backups_made += 1
        log.info("backup %s written", info.id)
