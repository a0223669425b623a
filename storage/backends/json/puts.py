"""Puts as journal operations: the tuples a commit of a few documents (or a transaction's staging) is made of.

A put is ``("p", collection, key, encoded)``, and an expiring one carries its instant as a fifth element
(microseconds, json/expiry.py). A large ``put_many`` outside a transaction never becomes tuples at all
(json/put_run.py): these are for everything else, from pairs or from put_many's two lists.
"""

from __future__ import annotations

from datetime import datetime

from ...expiry import to_micros
from .journal import Op

__all__ = ["put_ops", "column_ops"]


def put_ops(collection: str, items: list[tuple[str, bytes]], expires: datetime | None) -> list[Op]:
    """Put operations; with an expiry each carries it (as microseconds, json/expiry.py)."""
    if expires is None:
        return [("p", collection, key, raw) for key, raw in items]
    when = to_micros(expires)
    return [("p", collection, key, raw, when) for key, raw in items]


def column_ops(collection: str, keys: list[str], encoded: list[bytes], expires: datetime | None) -> list[Op]:
    """:func:`put_ops` of ``zip(keys, encoded)``."""
    if expires is None:
        return [("p", collection, key, raw) for key, raw in zip(keys, encoded)]
    when = to_micros(expires)
    return [("p", collection, key, raw, when) for key, raw in zip(keys, encoded)]
