"""The seed's member calls, written once on top of the document operations (stores, transactions and a
migration's context all have them).

Members live in collection ``members`` under key ``f"{guild_id}_{user_id}"``, exactly where the seed's code put
them, so a ``config/members.json`` written by the seed opens unchanged. Unlike the seed, bad input raises
:class:`storage.ValidationError` instead of being logged and turned into ``False``, and a batch is written all at
once (one durable commit) instead of one whole-file rewrite.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, cast

from .errors import ValidationError
from .member_fast import encode_members_ids
from .models import MEMBERS, member_key, snowflake
from .protocol import Document, DocumentOps
from .rules import encode_for
from .types import Member

__all__ = ["MEMBERS", "MembersMixin", "deep_merge"]

log = logging.getLogger("storage.members")


class MemberWriter(DocumentOps, Protocol):
    """What the member calls need: the document operations, plus the write guard and the encoded put that
    ``batch_update_members`` uses to write every row in one commit (a store, or a migration's context)."""

    def _guard_write(self) -> None: ...

    async def _put_encoded(self, collection: str, items: list[tuple[str, bytes]]) -> None: ...


class MembersMixin:
    """``get_member_data`` / ``save_member_data`` / ``batch_update_members`` for any :class:`DocumentOps`."""

    async def get_member_data(self: DocumentOps, user_id: int | str, guild_id: int | str,
                              default: Mapping[str, Any] | None = None) -> Member:
        """The member's record, or ``{}`` when there is none (as the seed returned); typed as a
        :class:`storage.Member` (a plain dict at run time).

        With ``default`` (Red's ``register_member``): the stored record deep-merged over a copy of ``default``
        (see :func:`deep_merge`), so a member saved before a new setting existed reads with that setting's default.
        Nothing is written: the merged result is stored only when the caller saves it. ``default`` is never
        changed.
        """
        if default is not None and not isinstance(default, Mapping):
            raise ValidationError(f"default must be a dict, got {type(default).__name__}", field="default")
        doc: Any = await self.get(MEMBERS, member_key(user_id, guild_id))  # Any: no cast() call on every get
        if default is None:
            return doc if doc is not None else {}  # type: ignore[no-any-return]
        return cast(Member, deep_merge(default, doc or {}))

    async def save_member_data(self: DocumentOps, user_id: int | str, guild_id: int | str,
                               data: Member | Document) -> bool:
        """Replace the member's record; True once it is durable. Invalid data raises and writes nothing (the
        member rule of :mod:`storage.rules`, applied by ``put`` as on every write to ``members``).
        ``join_date`` and ``statistics.last_active`` are stored in the canonical form of
        :func:`storage.models.iso_utc` (a datetime such as ``member.joined_at`` is accepted)."""
        await self.put(MEMBERS, member_key(user_id, guild_id), cast(Document, data))
        return True

    async def batch_update_members(self: MemberWriter, updates: Iterable[Mapping[str, Any]]) -> int:
        """Write every well-formed update in one all-or-nothing commit; returns how many were written.

        Each update is ``{"user_id", "guild_id", "data"}``. Malformed ones are skipped and logged (the seed's
        documented behaviour), so one bad row from a bulk import does not block the rest.
        """
        self._guard_write()  # closed, read-only, or a transaction open in this task (which would deadlock)
        # First every update's shape and ids, then the member rule: its fast path over all the rows at once
        # (storage.member_fast), the rows it declines in full, in order (so errors are logged in order).
        rows: list[tuple[str, str, Any] | ValidationError] = []
        for update in updates:
            try:
                if type(update) is not dict and not isinstance(update, Mapping):
                    raise ValidationError(f"update must be a mapping, got {type(update).__name__}", field="update")
                try:
                    user_id, guild_id, data = update["user_id"], update["guild_id"], update["data"]
                except KeyError:
                    missing = [f for f in ("user_id", "guild_id", "data") if f not in update]
                    raise ValidationError(f"update is missing {', '.join(missing)}", field=missing[0]) from None
                if type(user_id) is int and type(guild_id) is int and not (user_id | guild_id) >> 64:
                    rows.append((str(guild_id), str(user_id), data))  # two ints in 0..2**64-1 (models.member_key)
                    continue
                user = snowflake(user_id, "user_id")
                rows.append((snowflake(guild_id, "guild_id"), user, data))
            except ValidationError as exc:
                rows.append(exc)
        good = [row for row in rows if not isinstance(row, ValidationError)]
        fast = encode_members_ids(good)
        items: list[tuple[str, bytes]]
        if len(good) == len(rows) and None not in fast:  # the usual batch: every update well-formed and usual
            done = cast(list[bytes], fast)
            items = [(f"{guild}_{user}", encoded) for (guild, user, _data), encoded in zip(good, done)]
        else:
            items = _items_the_long_way(rows, fast)
        if not items:
            return 0
        await self._put_encoded(MEMBERS, items)
        return len(items)


def deep_merge(default: Mapping[str, Any], stored: Mapping[str, Any]) -> Document:
    """``stored`` over a deep copy of ``default``: nested dicts are merged key by key, at any depth; anything else
    (a list, a number, a dict over a non-dict) is replaced by the stored value. Neither argument is changed."""
    out: Document = copy.deepcopy(dict(default))
    _merge_into(out, stored)
    return out


def _merge_into(out: dict[str, Any], over: Mapping[str, Any]) -> None:
    for key, value in over.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            _merge_into(current, value)
        else:
            out[key] = copy.deepcopy(value)


def _items_the_long_way(rows: list[tuple[str, str, Any] | ValidationError],
                        fast: list[bytes | None]) -> list[tuple[str, bytes]]:
    """:meth:`batch_update_members`' items when some update is malformed or not of the usual shape: each row in
    order, its error logged, the rows the fast path declined through the full rule."""
    items: list[tuple[str, bytes]] = []
    taken = 0
    for index, row in enumerate(rows):
        if isinstance(row, ValidationError):
            log.error("batch_update_members: skipping update #%d: %s", index, row)
            continue
        guild, user, data = row
        key = f"{guild}_{user}"  # member_key, from the ids already made canonical
        encoded = fast[taken]
        taken += 1
        if encoded is None:
            try:
                encoded = encode_for(MEMBERS, key, data, "data")  # the members rule, as every write applies it
            except ValidationError as exc:
                log.error("batch_update_members: skipping update #%d: %s", index, exc)
                continue
        items.append((key, encoded))
    return items
