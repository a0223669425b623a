"""Column blocks: message records reduced to what the aggregate queries read, one sequence per field.

A backend without a query engine (the JSON message log) answers the analytics queries by counting these blocks
with :class:`collections.Counter`, which runs in C, instead of walking record dicts one by one. Backend layer: used
by storage/backends/json/ (its per-file cache and its query primitives) and by the tests that compare a backend's
answers with the Python ones; the feature layer never reads blocks. Also the exact time arithmetic they need
(microseconds since 1970 as ints, never floats).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..models import iso_utc
from .records import MessageRecord

__all__ = [
    "EPOCH",
    "DAY_MICROS",
    "COLUMN_BLOCK",
    "NEVER",
    "MessageColumns",
    "ColumnsBuilder",
    "columns_of",
    "micros",
    "text_micros",
    "micros_text",
    "day_text",
]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_MICRO = timedelta(microseconds=1)
DAY_MICROS = 86_400_000_000
COLUMN_BLOCK = 10_000
NEVER = -(2**63)


def micros(dt: datetime) -> int:
    """An aware datetime as microseconds since 1970-01-01 UTC (exact, unlike a float timestamp)."""
    return (dt - EPOCH) // _MICRO


def text_micros(ts: str) -> int:
    """A stored (canonical, UTC) timestamp as microseconds since 1970-01-01."""
    return (datetime.fromisoformat(ts[:-1]) - _EPOCH_NAIVE) // _MICRO


def micros_text(value: int) -> str:
    """Back to the canonical text of a stored timestamp."""
    return iso_utc(EPOCH + timedelta(microseconds=value))


def day_text(day: int) -> str:
    """Days since 1970-01-01 as ``YYYY-MM-DD``."""
    return (EPOCH + timedelta(days=day)).date().isoformat()


@dataclass(frozen=True)
class MessageColumns:
    """A block of message records reduced to what the aggregate queries read, one sequence per field.

    Counting a column with :class:`collections.Counter` runs in C; counting dicts one by one does not. Topics are
    the distinct topics of each message, as a tuple (so that equal combinations can be counted together).
    """

    micros: Sequence[int]
    authors: Sequence[str]
    channels: Sequence[str]
    sentiments: Sequence[str | None]
    topics: Sequence[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.authors)

    def parts(self, size: int = COLUMN_BLOCK) -> list[MessageColumns]:
        """This block cut into blocks of at most ``size`` rows (itself when it is not larger): a consumer that
        counts one block per event-loop step then holds the loop for a bounded time, however large a file is."""
        if len(self) <= size:
            return [self]
        return [MessageColumns(self.micros[i:i + size], self.authors[i:i + size], self.channels[i:i + size],
                               self.sentiments[i:i + size], self.topics[i:i + size])
                for i in range(0, len(self), size)]


class ColumnsBuilder:
    """Grows column blocks record by record; also the JSON backend's per-file cache.

    A cache kept for the process's life is :meth:`freeze`-d between updates: its columns become tuples of
    strings (atoms), which the garbage collector stops tracking after one pass, where lists stay tracked and every
    full collection visits each item: at 1M cached messages that was 4M visits, a full collection of 0.2-0.3 s
    holding the event loop whichever thread triggered it (issue 15). ``micros`` is an array, never visited.
    """

    __slots__ = ("_combos", "_frozen", "authors", "channels", "micros", "sentiments", "topics")

    def __init__(self) -> None:
        self.micros: array[int] = array("q")  # 8 bytes a message
        self.authors: list[str] = []
        self.channels: list[str] = []
        self.sentiments: list[str | None] = []
        self.topics: list[tuple[str, ...]] = []
        self._combos: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per distinct combination
        #: the columns as tuples while frozen (the lists are then empty), see freeze
        self._frozen: MessageColumns | None = None

    def __len__(self) -> int:
        return len(self.micros)

    def freeze(self) -> None:
        """Keep the columns as tuples (not tracked by the garbage collector) until the next add or replace."""
        if self._frozen is None:
            self._frozen = MessageColumns(self.micros, tuple(self.authors), tuple(self.channels),
                                          tuple(self.sentiments), tuple(self.topics))
            self.authors, self.channels, self.sentiments, self.topics = [], [], [], []

    def _thaw(self) -> None:
        frozen = self._frozen
        if frozen is not None:
            self.authors, self.channels = list(frozen.authors), list(frozen.channels)
            self.sentiments, self.topics = list(frozen.sentiments), list(frozen.topics)
            self._frozen = None

    def _row(self, rec: MessageRecord) -> tuple[int, str, str, str | None, tuple[str, ...]]:
        analysis = rec["analysis"]
        topics = analysis.get("topics")
        combo = tuple(dict.fromkeys(topics)) if topics else ()
        combo = self._combos.setdefault(combo, combo)
        sentiment = analysis.get("sentiment")
        return (text_micros(rec["timestamp"]), sys.intern(rec["author_id"]), sys.intern(rec["channel_id"]),
                sentiment if sentiment is None else sys.intern(sentiment), combo)

    def add(self, rec: MessageRecord) -> None:
        m, author, channel, sentiment, combo = self._row(rec)
        if self._frozen is not None:
            self._thaw()
        self.micros.append(m)
        self.authors.append(author)
        self.channels.append(channel)
        self.sentiments.append(sentiment)
        self.topics.append(combo)

    def replace(self, row: int, rec: MessageRecord) -> None:
        """A newer version of the record in ``row`` (an update)."""
        m, author, channel, sentiment, combo = self._row(rec)
        if self._frozen is not None:
            self._thaw()
        self.micros[row] = m
        self.authors[row] = author
        self.channels[row] = channel
        self.sentiments[row] = sentiment
        self.topics[row] = combo

    def snapshot(self, lo: int | None = None, hi: int | None = None) -> MessageColumns:
        """A copy (later appends and updates do not show in it), of the rows with time in ``[lo, hi)`` if given."""
        frozen = self._frozen
        if frozen is not None and lo is None and hi is None:
            return MessageColumns(self.micros[:], frozen.authors, frozen.channels, frozen.sentiments, frozen.topics)
        cols = frozen if frozen is not None else self
        authors, channels, sentiments, topics = cols.authors, cols.channels, cols.sentiments, cols.topics
        if lo is None and hi is None:
            return MessageColumns(self.micros[:], authors[:], channels[:], sentiments[:], topics[:])
        low = NEVER if lo is None else lo
        high = -NEVER if hi is None else hi
        keep = [i for i, m in enumerate(self.micros) if low <= m < high]
        return MessageColumns(array("q", [self.micros[i] for i in keep]), [authors[i] for i in keep],
                              [channels[i] for i in keep], [sentiments[i] for i in keep],
                              [topics[i] for i in keep])


async def columns_of(records: AsyncIterator[MessageRecord], size: int = COLUMN_BLOCK) -> AsyncIterator[MessageColumns]:
    """Records (as a scan gives them) as column blocks of up to ``size`` rows: for a store that keeps no blocks."""
    block = ColumnsBuilder()
    async for rec in records:
        block.add(rec)
        if len(block) >= size:
            yield block.snapshot()
            block = ColumnsBuilder()
    if len(block):
        yield block.snapshot()
