"""The data lifecycle, written once for stores and transactions: forget a guild, forget or export a user (and, on a
transaction, prune messages).

Why it exists: a bot must remove a guild's data when it leaves the guild, and a user's data when the user asks
(Discord's developer policy), and must be able to show a user everything it stores about them (a data-access
request). Whose data is what is decided by one rule, :mod:`storage.ownership` (keys equal to the id, ``"{guild}_"``
prefixes, ``"_{user}"`` suffixes, the records' ``guild_id`` / ``author_id``); this module checks the arguments,
builds the :class:`Owner` and calls the lifecycle primitives (:class:`LifecyclePrimitives`: ``_forget``,
``_owned_documents``, ``_owned_messages``, ``_count_owned_messages``), which do the work atomically and off the
event loop.

A core module (like :mod:`storage.member_calls`), not a feature: transactions carry these calls too
(``tx.forget_guild``...), and transactions are built by the backends, which never import a feature. On a
transaction the primitives work inside it: a forget is part of the transaction's commit (nothing is forgotten if
the block raises or is cancelled; documents and message records alike when it commits), and the transaction's
later reads, exports and dry runs see the forgotten data as absent. How each backend makes the message records
follow the transaction: PostgreSQL deletes them on the transaction's connection; the JSON backend stages the
message files and lets the transaction's journal commit decide (:mod:`storage.backends.json.tx_messages`).

Counts. ``forget_*`` return ``{name: removed}``: one entry per collection that lost documents (a collection that
lost nothing is not listed), and ``"messages"`` for the message records when any were removed. A document
collection that is itself named ``messages`` is listed as ``"messages (collection)"`` so the two never add up.
Nothing found is ``{}``. ``dry_run=True`` returns the same dict computed without removing anything.

``export_user`` shows exactly what ``forget_user`` (with the same arguments) would remove; the tests hold the two
to that.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from .errors import ValidationError
from .models import MEMBERS, prune_bound, snowflake
from .ownership import MESSAGES_KEY, Owner
from .protocol import Document

__all__ = ["LifecyclePrimitives", "LifecycleCalls", "TransactionLifecycle", "counts_of", "EXPORT_FORMAT"]

#: A message record as the written-once layer normalized it.
Record = dict[str, Any]

#: ``export_user(...)["format"]``: bumped if the shape of the export ever changes.
EXPORT_FORMAT = "storage.export_user/1"
_SHADOWED = f"{MESSAGES_KEY} (collection)"
#: Records handled on the event loop between two turns given back to it (export_user).
LOOP_TURN = 100


def counts_of(documents: dict[str, int], messages: int) -> dict[str, int]:
    """The public counts (see the module doc) from the documents removed per collection and the records removed."""
    out = {(_SHADOWED if name == MESSAGES_KEY else name): n for name, n in sorted(documents.items()) if n}
    if messages:
        out[MESSAGES_KEY] = messages
    return out


def _check_dry_run(dry_run: Any) -> bool:
    if not isinstance(dry_run, bool):
        raise ValidationError(f"dry_run must be a bool, got {dry_run!r}", field="dry_run")
    return dry_run


class LifecyclePrimitives(abc.ABC):
    """What the lifecycle calls need of a store or a transaction (each backend implements them for both)."""

    @abc.abstractmethod
    def _guard_read(self) -> None: ...

    @abc.abstractmethod
    def _guard_write(self) -> None: ...

    @abc.abstractmethod
    async def _owned_documents(self, owner: Owner) -> dict[str, dict[str, Document]]:
        """Every document ``owner`` owns, per collection: collections sorted, keys sorted, empty ones left out."""

    @abc.abstractmethod
    def _owned_messages(self, owner: Owner) -> AsyncIterator[Record]:
        """Every record ``owner`` owns (current versions), by (timestamp, message_id)."""

    @abc.abstractmethod
    async def _count_owned_messages(self, owner: Owner) -> int:
        """How many records ``owner`` owns."""

    @abc.abstractmethod
    async def _forget(self, owner: Owner) -> tuple[dict[str, int], int]:
        """Delete every document and record ``owner`` owns, all or nothing (a store's: also across a crash, what a
        crash interrupts is finished or undone by the next open or write; a transaction's: with its commit).
        Returns the documents removed per collection (only collections that lost some) and the records removed."""


class LifecycleCalls(LifecyclePrimitives):
    """``forget_guild``, ``forget_user``, ``export_user`` over the lifecycle primitives (see the module doc)."""

    async def forget_guild(self, guild_id: int | str, *, dry_run: bool = False) -> dict[str, int]:
        """Delete everything stored about a guild: its members, its message records and every document keyed by it
        in any collection (key equal to the id or starting with ``"{guild_id}_"``), all or nothing.

        Returns the removed counts (module doc); ``dry_run=True`` only counts.
        """
        owner = Owner(guild=snowflake(guild_id, "guild_id"))
        return await self._forget_or_count(owner, _check_dry_run(dry_run))

    async def forget_user(self, user_id: int | str, *, guild_id: int | str | None = None,
                          dry_run: bool = False) -> dict[str, int]:
        """Delete everything stored about a user: their member documents in every guild, their message records
        and every document keyed by them (key equal to the id or ending with ``"_{user_id}"``), all or nothing.

        With ``guild_id``: only what is both the user's and that guild's (keys starting with ``"{guild_id}_"`` and
        ending with ``"_{user_id}"``, the user's messages in that guild; see :mod:`storage.ownership`).
        """
        owner = Owner(guild=None if guild_id is None else snowflake(guild_id, "guild_id"),
                      user=snowflake(user_id, "user_id"))
        return await self._forget_or_count(owner, _check_dry_run(dry_run))

    async def _forget_or_count(self, owner: Owner, dry_run: bool) -> dict[str, int]:
        if dry_run:
            self._guard_read()
            documents = await self._owned_documents(owner)
            messages = await self._count_owned_messages(owner)
            return counts_of({name: len(docs) for name, docs in documents.items()}, messages)
        self._guard_write()
        removed, messages = await self._forget(owner)
        return counts_of(removed, messages)

    async def export_user(self, user_id: int | str, *, guild_id: int | str | None = None) -> dict[str, Any]:
        """Everything stored about a user (in one guild, with ``guild_id``), as a JSON-ready dict in a
        deterministic order: exactly what :meth:`forget_user` with the same arguments would remove.

        ``{"format", "user_id", "guild_id", "members": {guild: member document}, "documents": {collection: {key:
        document}}, "messages": [record, ...]}``: ``members`` holds the ``members`` documents keyed
        ``"{guild}_{user}"``, ``documents`` every other document the user owns (also odd keys of ``members``),
        collections and keys sorted; ``messages`` the records by (timestamp, message_id).
        """
        guild = None if guild_id is None else snowflake(guild_id, "guild_id")
        owner = Owner(guild=guild, user=snowflake(user_id, "user_id"))
        self._guard_read()
        documents = await self._owned_documents(owner)
        members: dict[str, Document] = {}
        others: dict[str, dict[str, Document]] = {}
        suffix = "_" + owner.user  # type: ignore[operator]
        for name, docs in documents.items():
            for key, doc in docs.items():
                member_of = _member_guild(key, suffix) if name == MEMBERS else None
                if member_of is not None:
                    members[member_of] = doc
                else:
                    others.setdefault(name, {})[key] = doc
        messages = []
        async for record in self._owned_messages(owner):
            messages.append(_sorted_keys(record))
            if not len(messages) % LOOP_TURN:
                await asyncio.sleep(0)  # a very active user has many records: the bot's heartbeat gets turns
        return {
            "format": EXPORT_FORMAT,
            "user_id": owner.user,
            "guild_id": guild,
            "members": {g: _sorted_keys(members[g]) for g in sorted(members, key=lambda g: (len(g), g))},
            "documents": {name: {key: _sorted_keys(doc) for key, doc in docs.items()} for name, docs in others.items()},
            "messages": messages,
        }


class TransactionLifecycle(LifecycleCalls):
    """A transaction's lifecycle calls: the store's (:class:`LifecycleCalls`) and ``prune_messages``, which a store
    has among its message calls (:mod:`storage.messages.queries`)."""

    @abc.abstractmethod
    async def _delete_messages_before(self, before: datetime, guild: str | None = None) -> int:
        """Delete every record (of ``guild`` only, when given) with a timestamp strictly before ``before``, as part
        of this transaction; returns how many."""

    async def prune_messages(self, before: str | datetime, *, guild_id: int | str | None = None) -> int:
        """Delete messages older than ``before`` (timestamp < before), of one guild when ``guild_id`` is given, when
        the transaction commits; returns how many (its later reads no longer see them)."""
        self._guard_write()
        return await self._delete_messages_before(*prune_bound(before, guild_id))


def _sorted_keys(value: Any) -> Any:
    """``value`` with every object's keys sorted: the export serializes to the same bytes on every backend (jsonb
    gives keys back in its own order)."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _member_guild(key: str, suffix: str) -> str | None:
    """The guild of a member key ``"{guild}_{user}"`` (None when the part before the suffix is not a snowflake)."""
    if not key.endswith(suffix):
        return None
    guild = key[:-len(suffix)]
    try:
        return guild if snowflake(guild, "guild_id") == guild else None  # canonical: "012" is not a guild's key
    except ValidationError:
        return None
