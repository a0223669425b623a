"""The bot: where the store lives in a discord.py program.

``discord.py`` runs everything in one event loop, the one ``bot.run()`` (or ``async with bot: await
bot.start(token)``) creates. A store belongs to the loop that opened it, so it is opened in ``setup_hook`` (the
first coroutine discord.py runs in that loop, before any event) and closed in ``close()``. Opening it before
``bot.run()`` (``store = asyncio.run(storage.open_store())``) would tie it to a loop that has ended: every call
would then raise ``storage.EventLoopError``.

Startup order: open the store, apply pending migrations (two shards starting together never both apply one: the
migration lock), then load the cog, which starts the backup task. Shutdown: the cog is removed (the backup task
stops), discord's connection closes (no more events), then the store closes (its last writes flushed).
"""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord.ext import commands

import storage
from storage.migrations import Migrator

from .cog import DEFAULT_PREFIX, SETTINGS, DataCog
from .migrations import MIGRATIONS

log = logging.getLogger("examplebot")


async def guild_prefix(bot: StorageBot, message: discord.Message) -> list[str]:
    """The command prefix: the guild's ``settings`` document (read on every message, so a change made by another
    shard or process is seen at once), or ``!``; a mention of the bot always works."""
    prefix = DEFAULT_PREFIX
    if message.guild is not None and bot.store is not None:
        settings = await bot.store.get(SETTINGS, message.guild.id, default={})
        prefix = settings.get("prefix", DEFAULT_PREFIX)
    return commands.when_mentioned_or(prefix)(bot, message)


class StorageBot(commands.Bot):
    """A ``commands.Bot`` that owns a store. ``config`` picks it (None: from the environment, as
    ``storage.open_store()`` does: ``DATABASE_URL``/``PG*`` on Railway, else JSON files in ``./config``)."""

    def __init__(self, config: storage.StoreConfig | None = None, *, backup_hours: float = 24.0,
                 **options: Any) -> None:
        intents = discord.Intents.default()
        intents.members = True  # on_member_join, guild.members (enable "Server Members Intent" in the portal)
        intents.message_content = True  # commands and content_length
        super().__init__(command_prefix=guild_prefix, intents=intents, **options)
        self.store_config = config
        self.backup_hours = backup_hours
        self.store: storage.Store | None = None
        self.migrated: list[str] = []

    async def setup_hook(self) -> None:
        self.store = await storage.open_store(config=self.store_config)
        run = await Migrator(self.store, MIGRATIONS).upgrade()
        self.migrated = run.versions
        log.info("store %s ready (migrations applied: %s)", self.store.location(), self.migrated or "none")
        await self.add_cog(DataCog(self, backup_hours=self.backup_hours))

    async def on_message(self, message: discord.Message) -> None:
        """A command is run; any other guild message is activity (the cog records and counts it). Deciding here,
        with one read of the guild's prefix per message, keeps commands out of the counts, so ``!forgetme`` cannot
        race with the recording of its own message."""
        if message.author.bot:
            return
        ctx = await self.get_context(message)
        if ctx.command is not None:
            await self.invoke(ctx)
        elif message.guild is not None:
            self.dispatch("activity", message)  # DataCog.on_activity

    async def close(self) -> None:
        await self.remove_cog(DataCog.__cog_name__)  # stops the backup task before the store goes
        await super().close()
        if self.store is not None:
            await self.store.close()
            self.store = None
