"""The GIL-bounded containers and sort (storage/shards.py, storage/sorting.py) against plain-Python references:
random operation sequences on a ShardedDict / ShardedKeys and a dict / set side by side, and sorted_in_runs
against sorted() (stability included) over random sizes and run lengths."""

from __future__ import annotations

import random
from operator import itemgetter

import pytest

from storage.shards import ShardedDict, ShardedKeys
from storage.sorting import sorted_in_runs


def _snowflake(rng: random.Random) -> int:
    """A Discord-like id: its low 12 bits (the counter) are often 0, which the shards must not all share."""
    return (rng.randrange(1 << 40) << 22) | (rng.choice([0, 0, 0, rng.randrange(4096)]))


@pytest.mark.parametrize("seed", range(20))
def test_sharded_dict_behaves_like_a_dict(seed: int) -> None:
    rng = random.Random(seed)
    shards = rng.choice([1, 2, 8, 64])
    ours: ShardedDict[int, int] = ShardedDict(shards)
    ref: dict[int, int] = {}
    pool = [_snowflake(rng) for _ in range(300)] + list(range(50))
    for _ in range(3000):
        key, value = rng.choice(pool), rng.randrange(10)
        op = rng.randrange(8)
        if op == 0:
            ours[key] = value
            ref[key] = value
        elif op == 1:
            assert (key in ours) == (key in ref)
            assert ours.get(key) == ref.get(key) and ours.get(key, -1) == ref.get(key, -1)
        elif op == 2:
            assert ours.pop(key, None) == ref.pop(key, None)
        elif op == 3 and key in ref:
            del ours[key]
            del ref[key]
            assert key not in ours
        elif op == 4:
            batch = dict.fromkeys(rng.sample(pool, 20), value)
            ours.update(batch)
            ref.update(batch)
        elif op == 5 and ref:
            k, v = ours.popitem()
            assert ref.pop(k) == v
        elif op == 6 and rng.random() < 0.05:
            ours.clear()
            ref.clear()
        assert len(ours) == len(ref) and bool(ours) == bool(ref)
    assert dict(ours.items()) == ref and sorted(ours) == sorted(ref)
    assert all(ours[k] == v for k, v in ref.items())
    with pytest.raises(KeyError):
        ours[-1]  # never inserted
    assert [] not in ours  # unhashable: not there, no TypeError


def test_sharded_dict_spreads_snowflakes_with_a_constant_counter() -> None:
    rng = random.Random(7)
    ours: ShardedDict[int, int] = ShardedDict()
    for _ in range(20_000):
        ours[(rng.randrange(1 << 40) << 22)] = 1  # counter bits all zero
    sizes = [len(shard) for shard in ours._shards]
    assert max(sizes) < 3 * len(ours) / len(sizes)  # no shard holds much more than its share


@pytest.mark.parametrize("seed", range(10))
def test_sharded_keys_behaves_like_a_set(seed: int) -> None:
    rng = random.Random(seed)
    ours = ShardedKeys(shards=rng.choice([1, 4, 64]))
    ref: set[str] = set()
    for _ in range(2000):
        key = str(rng.randrange(500))
        assert ours.add_new(key) == (key not in ref)
        ref.add(key)
        probe = str(rng.randrange(600))
        assert (probe in ours) == (probe in ref)
        assert len(ours) == len(ref)
    more = [str(rng.randrange(1000)) for _ in range(100)]
    ours.update(more)
    ref.update(more)
    assert len(ours) == len(ref) and all(k in ours for k in ref)
    ours.clear()
    assert len(ours) == 0 and not any(k in ours for k in ref) and ours.add_new(more[0])
    with pytest.raises(ValueError):
        ShardedKeys(shards=3)


@pytest.mark.parametrize("seed", range(30))
def test_sorted_in_runs_is_a_stable_sort(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([0, 1, 5, 100, 1000, 5000])
    run = rng.choice([1, 2, 7, 64, 10_000])
    # few distinct keys: many ties, which must keep their input order (the index in the pair tells)
    items = [((rng.choice("abc"), rng.randrange(5)), i) for i in range(n)]
    assert list(sorted_in_runs(items, itemgetter(0), run)) == sorted(items, key=itemgetter(0))



@pytest.mark.parametrize("seed", range(20))
def test_a_record_encoded_in_slices_is_the_record_encoded_whole(seed: int) -> None:
    """A large transaction's journal record encoded a slice at a time (json/journal.encode_in_slices) is
    byte for byte ``encode_record`` of all its operations: puts, puts that expire, deletes, odd keys."""
    from storage.backends.json.journal import encode_in_slices, encode_record

    rng = random.Random(seed)
    ops: list = []
    for i in range(rng.choice([0, 1, 5, 50, 300])):
        key = rng.choice([f"k{i}", f'q"{i}\\', f"é{i}\u2028"])
        kind = rng.randrange(3)
        if kind == 0:
            ops.append(("p", "members", key, b'{"n":%d,"s":"x"}' % i))
        elif kind == 1:
            ops.append(("p", "bulk", key, b"[%d]" % i, 1_700_000_000_000_000 + i))
        else:
            ops.append(("d", "members", key))
    size = rng.choice([1, 2, 7, 64, 1000])
    assert encode_in_slices(ops, size) == encode_record(ops)
