"""Sorting a large list in a worker thread without holding the GIL through one long C call (:func:`sorted_in_runs`).

``list.sort`` never lets go of the GIL: sorting a month of 83k scanned message lines by their order key held it,
and with it the event loop, 28 ms at 1M messages (benchmarks/README.md, Design measurements). Sorting runs of
SORT_RUN items and merging them in Python (``heapq.merge``, which gives the GIL back every switch interval) bounds
each C call to the sort of one run, for about a microsecond per item of merging.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["sorted_in_runs", "SORT_RUN"]

T = TypeVar("T")
#: Items per C-level sort: a few ms for runs of mostly ordered tuples on these hosts.
SORT_RUN = 16384


def sorted_in_runs(items: Sequence[T], key: Callable[[T], Any] | None = None, run: int = SORT_RUN) -> Iterator[T]:
    """``iter(sorted(items, key=key))``, stable as it is, with no single C call over more than ``run`` items (no
    ``key``: the items are compared themselves)."""
    order: Any = key  # sorted and heapq.merge take None as "no key"
    if len(items) <= run:
        return iter(sorted(items, key=order))
    return heapq.merge(*(sorted(items[i:i + run], key=order) for i in range(0, len(items), run)), key=order)
