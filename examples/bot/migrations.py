"""The bot's migrations, applied at startup by ``setup_hook`` (and by ``python -m storage migrate up
--migrations examples.bot.migrations`` from a shell). A release that changes the stored shape adds one here."""

from __future__ import annotations

from storage.migrations import Migration, MigrationContext

from ..migrations.add_user_preferences import AddUserPreferences


class DefaultPrefix(Migration):
    """1.1.1: every guild that has settings gets an explicit ``prefix`` (older releases only stored changes)."""

    version = "1.1.1"
    description = "Explicit command prefix in every guild's settings"

    async def up(self, store: MigrationContext) -> None:
        def add_prefix(settings: dict) -> None:
            settings.setdefault("prefix", "!")

        store.notes["added"] = await store.transform("settings", add_prefix)

    async def down(self, store: MigrationContext) -> None:
        settings = await store.get_many("settings", store.notes.get("added", []))
        for doc in settings.values():
            doc.pop("prefix", None)
        await store.put_many("settings", settings)


MIGRATIONS = [AddUserPreferences(), DefaultPrefix()]

__all__ = ["MIGRATIONS", "DefaultPrefix"]
