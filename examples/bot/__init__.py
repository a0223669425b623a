"""A small but complete discord.py bot on ``storage`` (issue 17): see ``bot.py`` (where the store lives) and
``cog.py`` (what it stores, the commands). Run it with a token::

    DISCORD_TOKEN=... python -m examples.bot          # JSON in ./config, or PostgreSQL from DATABASE_URL / PG*

Its offline tests (dpytest, both backends) are ``tests/test_example_bot.py``.
"""

from .bot import StorageBot, guild_prefix
from .cog import DataCog, format_rank, format_stats

__all__ = ["StorageBot", "DataCog", "guild_prefix", "format_rank", "format_stats"]
