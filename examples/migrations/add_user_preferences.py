"""1.1.0, the seed's example, written against the Store API instead of ``open('config/members.json')``.

The seed's ``down()`` deleted every member's preferences, including those members had before the migration ran.
This one remembers whom it gave defaults to (``store.notes``, kept in the ledger) and reverts exactly those, so
``up`` then ``down`` leaves the data as it was.
"""

from __future__ import annotations

from storage.migrations import Migration, MigrationContext

DEFAULT_PREFERENCES = {"notifications": True, "language": "ja"}


class AddUserPreferences(Migration):
    def __init__(self) -> None:
        super().__init__("1.1.0", "Add user preferences to member data")

    async def up(self, store: MigrationContext) -> None:
        def add_defaults(member: dict) -> None:
            if "preferences" not in member:
                member["preferences"] = dict(DEFAULT_PREFERENCES)

        added = await store.transform("members", add_defaults)
        store.notes["added"] = added
        store.log.info("gave default preferences to %d members", len(added))

    async def down(self, store: MigrationContext) -> None:
        members = await store.get_many("members", store.notes.get("added", []))
        for member in members.values():
            member.pop("preferences", None)
        await store.put_many("members", members)
