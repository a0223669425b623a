"""How ``items()`` lists a collection without holding the bot's event loop: which keys, in what order, and when
the work leaves the loop.

A listing is a snapshot of the keys when it starts, sorted, then each document decoded as it is reached. Sorting
100k keys or filtering a 20k-member guild out of them is one long C call, so past :data:`ITEMS_INLINE` documents
it runs in a worker thread over a private copy; the decoding that follows gives the loop a turn every
:data:`ITEMS_TURN` documents. Both the store (json/store.py) and its transactions (json/transaction.py) list
this way.
"""

from __future__ import annotations

__all__ = ["ITEMS_INLINE", "ITEMS_TURN", "select_keys", "select_from", "select"]

#: ``items()``: collections larger than this are filtered and sorted in a worker thread, and the event loop gets a
#: turn every ITEMS_TURN documents decoded (what a bot's heartbeat needs; see benchmarks/README.md).
ITEMS_INLINE = 5000
ITEMS_TURN = 1000


def select_keys(keys: list[str], prefix: str | None) -> list[str]:
    """The keys that start with ``prefix`` (all without one), sorted."""
    if prefix is not None:
        keys = [key for key in keys if key.startswith(prefix)]
    keys.sort()
    return keys


def select_from(coll: dict[str, bytes], dead: set[str], prefix: str | None) -> list[tuple[str, bytes]]:
    """The pairs of ``coll`` (a private copy) whose key starts with ``prefix`` and is not ``dead``, sorted by key."""
    if prefix is not None:
        pairs = [pair for pair in coll.items() if pair[0].startswith(prefix)]
    else:
        pairs = list(coll.items())
    if dead:
        pairs = [pair for pair in pairs if pair[0] not in dead]
    pairs.sort()
    return pairs


def select(pairs: list[tuple[str, bytes]], prefix: str | None) -> list[tuple[str, bytes]]:
    """The pairs whose key starts with ``prefix`` (all without one), sorted by key."""
    if prefix is not None:
        pairs = [pair for pair in pairs if pair[0].startswith(prefix)]
    pairs.sort()  # keys are unique: tuples compare by key only
    return pairs
