"""A batch ``put_many``'s operations held as its two lists, each operation tuple made only when it is read.

Why (issue 15): a put operation is a tuple ``("p", collection, key, bytes)``, a container the garbage collector
tracks; a commit of 25k of them kept 25k alive from the call's start to the apply, which made ~35 young
collections and so 3-4 of the middle generation (each counts toward the next full collection of the caller's
whole heap: 20-40 ms with a bot's heap, landing inside the call). :class:`PutRun` keeps the keys and the encoded
documents (strings and bytes: untracked) and reads as the same operations, so the commit path that takes a list of
operations takes it too; what a commit needs in bulk it gets without any tuple: the journal record
(:meth:`PutRun.record`, operations made a slice at a time and freed before the next) and the apply's plan
(:meth:`PutRun.plan`, the puts as one dict of the two lists).

A run is only ever puts without expiry into one collection, which is what ``Tables.plan`` and
``Tables.apply_plan`` take as a batch: the same record bytes and the same plan as the list of its operations.

A batch (``put_many`` of a mapping of 256 items or more, ``batch_update_members``) commits as a run too: its plan
is one ``dict(zip(keys, encoded))``, not ``Tables.plan``'s three passes over the operations to learn that they are
puts into one collection plus a dict built from them (1,000 members: ~90 -> ~30-50 us of the plan, which the sync
thread runs during the fsync, json/sync_thread.py), and no ``(key, bytes)`` pair or operation tuple is kept from
the call to the apply (benchmarks/README.md, issue 15's batch row).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from .journal import Op, encode_in_slices, encode_puts

if TYPE_CHECKING:
    from .tables import Plan, Staged, Tables

__all__ = ["PutRun", "RECORD_SLICE"]

#: Operations made at a time to encode a run's record: a slice is freed before the next is made, and a slice
#: under the youngest generation's threshold (700 new tracked objects) leaves nothing for the collector to count.
RECORD_SLICE = 500


class PutRun(Sequence[Op]):
    """``[("p", collection, key, raw) for key, raw in zip(keys, encoded)]``, without the tuples (module doc)."""

    __slots__ = ("collection", "encoded", "keys")

    def __init__(self, collection: str, keys: list[str], encoded: list[bytes]) -> None:
        if len(keys) != len(encoded):
            raise ValueError(f"{len(keys)} keys for {len(encoded)} documents")
        self.collection = collection
        self.keys = keys
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Op: ...

    @overload
    def __getitem__(self, index: slice) -> list[Op]: ...

    def __getitem__(self, index: int | slice) -> Op | list[Op]:
        name = self.collection
        if isinstance(index, slice):
            return [("p", name, key, raw) for key, raw in zip(self.keys[index], self.encoded[index])]
        return ("p", name, self.keys[index], self.encoded[index])

    def __iter__(self) -> Iterator[Op]:
        name = self.collection
        for key, raw in zip(self.keys, self.encoded):
            yield ("p", name, key, raw)

    def __call__(self, staged: Staged) -> tuple[list[Op], Any]:
        """As a group commit's prepare (the run shares its round with other writers): its operations as a list."""
        return list(self), None

    def record(self) -> bytes:
        """``encode_record(list(self))``, byte for byte (``encode_in_slices`` over slices of RECORD_SLICE; a run of
        a batch's size, at most two slices, in one: a join of the slices' records copied the 250 KB of a
        1,000-member batch twice more)."""
        if len(self) <= 2 * RECORD_SLICE:
            return encode_puts(self[:])
        return encode_in_slices(self, RECORD_SLICE)

    def plan(self, tables: Tables) -> Plan | None:
        """``tables.plan(list(self))``: None when the collection holds expiring documents (the puts clear their
        expiries: ``Tables.apply`` does that), else the batch's plan from one dict of the two lists."""
        return tables.plan_batch(self.collection, dict(zip(self.keys, self.encoded)))
