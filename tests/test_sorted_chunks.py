"""SortedChunks (the JSON indexes' sorted sequences) against a plain sorted list, over random operations."""

from __future__ import annotations

import bisect
import gc
import random

import pytest

from storage.backends.json import sorted_chunks
from storage.backends.json.sorted_chunks import SortedChunks


def _first(pair: tuple[int, str]) -> int:
    return pair[0]


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_sorted_chunks_behave_as_a_sorted_list(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(sorted_chunks, "CHUNK", chunk)
    rng = random.Random(chunk)
    ref: list[tuple[int, str]] = []
    seq = SortedChunks()
    for step in range(3000):
        item = (rng.randrange(60), f"k{rng.randrange(40)}")
        op = rng.random()
        if op < 0.55:
            seq.add(item)
            bisect.insort(ref, item)
        elif op < 0.9:
            present = item in ref
            assert (item in seq) == present
            assert seq.discard(item) == present
            if present:
                ref.remove(item)
        elif op < 0.93:
            ref = sorted(rng.sample(ref, len(ref) // 2))
            seq.rebuild(ref)
        else:
            value = rng.randrange(-1, 62)
            for right in (False, True):
                find = bisect.bisect_right if right else bisect.bisect_left
                assert seq.position(value, right=right, key=_first) == find(ref, value, key=_first)
            start = rng.randrange(len(ref) + 2)
            end = rng.randrange(len(ref) + 2)
            assert seq.slice(start, end) == ref[start:end]
            assert list(seq.iter_from(start)) == ref[start:]
        assert len(seq) == len(ref), step
    assert list(seq) == ref and list(reversed(seq)) == ref[::-1] and seq == ref and seq == SortedChunks(ref)


def test_the_collector_stops_visiting_the_items() -> None:
    seq = SortedChunks([(i, f"key{i}") for i in range(10_000)])
    seq.add((5, "x"))
    gc.collect()
    gc.collect()  # a tuple is untracked once its items are: a chunk, the pass after its new item tuples
    ours = {id(seq._chunks), id(seq._maxes)} | {id(chunk) for chunk in seq._chunks}
    visited = sum(len(gc.get_referents(o)) for o in gc.get_objects() if id(o) in ours)
    assert visited < 100  # two short lists (chunks, maxima); the chunks themselves are untracked tuples
