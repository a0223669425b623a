"""Whose data is what: the rule that decides which documents and message records belong to a guild or a user.

Written once here (core layer) so that the feature (:mod:`storage.lifecycle`), both backends and the tests apply
the same rule; a backend may answer it faster (an index range, a bytes search), never differently.

The rule, stated once (``G`` a guild id, ``U`` a user id, both canonical snowflake texts):

* **A guild's data** (``Owner(guild=G)``, what ``forget_guild`` removes): every document, in any collection, whose
  key equals ``G`` or starts with ``"G_"`` (the members ``G_U``, settings keyed ``G``, ``G_channel`` ...), and every
  message record with ``guild_id == G``.
* **A user's data** (``Owner(user=U)``, ``forget_user(U)`` / ``export_user(U)``): every document whose key equals
  ``U`` or ends with ``"_U"`` (the member documents ``G_U`` of every guild, ``economy`` keyed ``U``,
  ``G_channel_U``...), and every message record with ``author_id == U``.
* **A user's data in one guild** (``Owner(guild=G, user=U)``, ``forget_user(U, guild_id=G)``): what is both the
  user's and the guild's: documents whose key starts with ``"G_"`` and ends with ``"_U"`` (at least ``"G_U"``
  itself; a key equal to ``U`` alone is not guild-scoped and is kept), and the messages with ``guild_id == G`` and
  ``author_id == U``.

The separator is what keeps ids apart: user ``12`` owns ``3_12`` but not ``3_112``, guild ``1`` owns ``1_5`` but not
``10_5``. A key is matched as a whole string: no parsing of the parts between separators.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Owner", "MESSAGES_KEY"]

#: The key of the message records in the counts that ``forget_*`` return (never a collection name: collection
#: names may be ``messages`` too, see :func:`storage.codec.check_collection`, so the counts use this one key for the
#: records and the collection's own name for a collection of that name, which then adds up with the records).
MESSAGES_KEY = "messages"


@dataclass(frozen=True)
class Owner:
    """A guild, a user, or a user within one guild (see the module doc). Ids are canonical snowflake texts."""

    guild: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.guild is None and self.user is None:
            raise ValueError("an Owner needs a guild, a user or both")

    @property
    def guild_prefix(self) -> str | None:
        return None if self.guild is None else self.guild + "_"

    @property
    def user_suffix(self) -> str | None:
        return None if self.user is None else "_" + self.user

    def owns_key(self, key: str) -> bool:
        """Whether a document key belongs to this owner (whatever its collection)."""
        guild, user = self.guild, self.user
        if user is None:
            return key == guild or key.startswith(guild + "_")  # type: ignore[operator]
        if guild is None:
            return key == user or key.endswith("_" + user)
        return key.startswith(guild + "_") and key.endswith("_" + user) and len(key) >= len(guild) + len(user) + 1

    def owns_message(self, guild_id: str, author_id: str) -> bool:
        """Whether a message record (its canonical guild and author ids) belongs to this owner."""
        return (self.guild is None or guild_id == self.guild) and (self.user is None or author_id == self.user)

    def describe(self) -> str:
        """For messages and logs: ``guild 1``, ``user 2``, ``user 2 in guild 1``."""
        if self.user is None:
            return f"guild {self.guild}"
        return f"user {self.user}" if self.guild is None else f"user {self.user} in guild {self.guild}"
