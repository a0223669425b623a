"""1.2.0, a data reshaping: ``statistics.message_count`` moves to a new field ``activity.messages``.

A typical change when a bot starts tracking more kinds of activity. It shows the parts a real migration needs:

* a refusal instead of an overwrite: a member that already has ``activity.messages`` stops the migration, and since
  a migration is all-or-nothing, no member is changed (fix the data, run again);
* exact reversal: ``down`` moves the counts back and removes ``activity`` only where ``up`` created it;
* the same code on JSON and PostgreSQL, through the store's ``items``/``get_many``/``put_many``.

The bot's code that reads ``statistics.message_count`` has to change in the same release.
"""

from __future__ import annotations

from storage.migrations import Migration, MigrationContext


class MoveMessageCount(Migration):
    version = "1.2.0"
    description = "Move statistics.message_count to activity.messages"

    async def up(self, store: MigrationContext) -> None:
        moved: list[tuple[str, dict]] = []
        created: list[str] = []
        async for key, member in store.items("members"):
            stats = member.get("statistics")
            if not isinstance(stats, dict) or "message_count" not in stats:
                continue
            activity = member.get("activity")
            if activity is None:
                activity = member["activity"] = {}
                created.append(key)
            elif not isinstance(activity, dict) or "messages" in activity:
                raise ValueError(f"members/{key} already has activity.messages ({activity!r}): refusing to "
                                 "overwrite it; nothing was changed")
            activity["messages"] = stats.pop("message_count")
            moved.append((key, member))
        await store.put_many("members", moved)
        store.notes.update(moved=[key for key, _ in moved], created_activity=created)

    async def down(self, store: MigrationContext) -> None:
        created = set(store.notes.get("created_activity", []))
        members = await store.get_many("members", store.notes.get("moved", []))
        for key, member in members.items():
            activity = member.get("activity")
            if not isinstance(activity, dict) or "messages" not in activity:
                continue
            member.setdefault("statistics", {})["message_count"] = activity.pop("messages")
            if key in created and not activity:
                del member["activity"]
        await store.put_many("members", members)
