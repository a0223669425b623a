"""Expiring documents in backups, restores and copies (see storage/expiry.py for what expiry means).

* A backup holds the documents visible when it was taken, never an expired one (they are filtered by the reads it
  makes), and the collection's manifest entry carries ``"expires": {key: "2026-...Z"}`` for the documents that
  were still going to expire: a restored cooldown ends when it would have, instead of becoming permanent.
* A restore drops the documents whose instant has passed by the time it runs (they would read as absent anyway),
  and writes each other one with its expiry (or permanent), also when only its expiry differs from the store's.
* A copy carries each document's expiry to the target.

Restores and copies write through :meth:`storage.documents.OpsBase._put_stored`: what was stored is written back
as it was, without the collection's rule (see storage/rules.py for why).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..documents import OpsBase
from ..errors import BackupError, ValidationError
from ..models import iso_utc, parse_timestamp
from ..protocol import Document

__all__ = ["manifest_expiries", "backup_expiries", "put_with_expiries"]


async def manifest_expiries(tx: OpsBase, name: str) -> dict[str, str]:
    """The ``expires`` of a collection's manifest entry: the visible expiring documents, as canonical text."""
    return {key: iso_utc(when) for key, when in sorted((await tx._expiries(name, None)).items())}


def backup_expiries(entry: Mapping[str, Any] | None, name: str) -> dict[str, datetime]:
    """A manifest entry's ``expires`` as datetimes ({} when there is none); a malformed one is damage."""
    raw = (entry or {}).get("expires") or {}
    if not isinstance(raw, dict):
        raise BackupError(f"the manifest's expiries of {name!r} are not an object")
    try:
        return {str(key): parse_timestamp(when, "expires") for key, when in raw.items() if isinstance(when, str)}
    except ValidationError as exc:
        raise BackupError(f"the manifest's expiries of {name!r} are malformed: {exc}") from None


async def put_with_expiries(ops: OpsBase, name: str, docs: list[tuple[str, Document]],
                            expiries: Mapping[str, datetime]) -> None:
    """Write already-stored documents as they are, each expiring as ``expiries`` says (absent: permanent): one
    write per distinct instant (the primitive takes one expiry per call)."""
    groups: dict[datetime | None, list[tuple[str, Document]]] = {}
    for key, doc in docs:
        groups.setdefault(expiries.get(key), []).append((key, doc))
    for when, group in groups.items():
        await ops._put_stored(name, group, when)


async def put_encoded_with_expiries(ops: OpsBase, name: str, pairs: list[tuple[str, bytes]],
                                    expiries: Mapping[str, datetime]) -> None:
    """:func:`put_with_expiries` of documents already encoded as ``_put_stored`` encodes them."""
    if not expiries:  # the usual case: one write, without a pass over the keys on the loop
        await ops._put_stored_encoded(name, pairs)
        return
    groups: dict[datetime | None, list[tuple[str, bytes]]] = {}
    for key, raw in pairs:
        groups.setdefault(expiries.get(key), []).append((key, raw))
    for when, group in groups.items():
        await ops._put_stored_encoded(name, group, when)
