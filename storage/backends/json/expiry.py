"""Expiring documents in the JSON backend: the one visibility predicate, and the ``storage.expires.json`` sidecar.

The snapshot files keep the seed's plain shape (``<collection>.json`` = ``{key: doc}``, nothing injected into a
document), so when a document expires is kept beside them:

* in memory: :attr:`Tables.expires` ``{collection: {key: expires}}``, only for expiring documents, instants as
  integer microseconds since the epoch (:func:`storage.expiry.to_micros`);
* in the journal: an expiring put carries the instant as a fifth element (journal.py);
* on disk after a compaction: ``storage.expires.json`` = ``{collection: {key: "2026-...Z"}}``, written after the
  snapshots and before the next journal generation (so a crash in between replays the old journal onto files that
  agree: see Tables.compact). It is the store's own file (``owns_entry``: every ``storage.*`` entry), never taken
  for a collection (the name ``storage.expires`` is reserved, codec.py), and not in backups as a file: a backup
  carries each document's expiry in its manifest instead. An entry for a key that is not in its collection is
  ignored (a snapshot edited by hand while the store was closed).

**Visibility** is decided by :func:`visible` and nothing else: a document is visible while ``now < expires``.
Every read of the backend (store and transaction: get, get_many, items, count, collections, update, delete, the
documents a backup or a query reads) filters through it, with ``now`` from :meth:`JsonBackend._now_micros`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from datetime import datetime
from pathlib import Path

import orjson

from ...codec import check_collection, check_key
from ...errors import CorruptDataError, ValidationError
from ...expiry import from_micros
from .journal import expiry_text, parse_expiry

__all__ = ["EXPIRES_NAME", "Expiries", "visible", "dead_keys", "live_mapping", "live_expiries", "LiveView",
           "read_sidecar", "render_sidecar"]

EXPIRES_NAME = "storage.expires.json"
#: ``{collection: {key: expires_micros}}``
Expiries = dict[str, dict[str, int]]


def visible(expires: int | None, now: int) -> bool:
    """THE predicate: whether a document that expires at ``expires`` (None: never) is visible at ``now``."""
    return expires is None or expires > now


def dead_keys(expiring: Mapping[str, int] | None, now: int) -> set[str]:
    """The keys among ``expiring`` ({key: expires}) that are not :func:`visible` at ``now``."""
    if not expiring:
        return set()
    return {key for key, expires in expiring.items() if not visible(expires, now)}


class LiveView(Mapping[str, bytes]):
    """A collection's ``{key: encoded doc}`` without the ``dead`` keys, read through (no copy): what code that takes
    a collection mapping (a query plan, an index walk) is handed when some of its documents have expired."""

    __slots__ = ("_coll", "_dead")

    def __init__(self, coll: Mapping[str, bytes], dead: AbstractSet[str]) -> None:
        self._coll, self._dead = coll, dead

    def __getitem__(self, key: str) -> bytes:
        if key in self._dead:
            raise KeyError(key)
        return self._coll[key]

    def get(self, key: str, default: object = None) -> bytes | None:  # type: ignore[override]
        if key in self._dead:
            return default  # type: ignore[return-value]
        raw = self._coll.get(key)
        return raw if raw is not None else default  # type: ignore[return-value]

    def __contains__(self, key: object) -> bool:
        return key in self._coll and key not in self._dead

    def __iter__(self) -> Iterator[str]:
        dead = self._dead
        return (key for key in self._coll if key not in dead)

    def __len__(self) -> int:
        return len(self._coll) - sum(1 for key in self._dead if key in self._coll)


def live_mapping(coll: Mapping[str, bytes], dead: AbstractSet[str]) -> Mapping[str, bytes]:
    """``coll`` itself when nothing in it has expired (the usual case: no cost), else a :class:`LiveView`."""
    return LiveView(coll, dead) if dead else coll


def read_sidecar(path: Path) -> Expiries:
    """``storage.expires.json`` as :data:`Expiries` ({} when there is none); damage raises CorruptDataError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        obj = orjson.loads(raw)
        if type(obj) is not dict:
            raise ValueError("not an object")
        out: Expiries = {}
        for name, entries in obj.items():
            if type(entries) is not dict:
                raise ValueError(f"{name!r} is not an object")
            check_collection(name)
            out[name] = {check_key(key): parse_expiry(when) for key, when in entries.items()}
        return out
    except (ValueError, ValidationError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise CorruptDataError(f"{path} is not a valid expiry file ({exc}); the file was left as it is",
                               path=str(path)) from None


def render_sidecar(expires: Expiries) -> bytes:
    """The sidecar's bytes: one line per collection, keys sorted (readable and diffable)."""
    lines = []
    for name in sorted(expires):
        entries = expires[name]
        if entries:
            body = b",".join(orjson.dumps(key) + b":" + expiry_text(when) for key, when in sorted(entries.items()))
            lines.append(b"  " + orjson.dumps(name) + b": {" + body + b"}")
    if not lines:
        return b"{}\n"
    return b"{\n" + b",\n".join(lines) + b"\n}\n"


def live_expiries(expiring: Mapping[str, int], keys: list[str] | None, now: int) -> dict[str, datetime]:
    """A backend's or transaction's ``_expiries`` over ``expiring`` ({key: expires} of documents present): the
    visible ones among ``keys`` (all of them without ``keys``)."""
    if keys is None:
        return {k: from_micros(when) for k, when in expiring.items() if visible(when, now)}
    return {k: from_micros(expiring[k]) for k in keys if k in expiring and visible(expiring[k], now)}
