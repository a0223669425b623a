"""What keeping a transaction's notifications distinct costs the client (postgres/notify.py, ``Distinct``).

Run it from the repository root (no server needed: it times the client-side work only)::

    .venv/bin/python benchmarks/bench_notify_distinct.py            # about 20 seconds
    .venv/bin/python benchmarks/bench_notify_distinct.py --quick

PostgreSQL delivers identical notifications of one transaction once, so every notification a transaction sends
must differ from the others. Three ways, each timed on top of building the payloads (``notify.payloads``, what
every write does anyway), in interleaved rounds, medians:

* **none**: the payloads as they are (the old code: wrong on repeats; the baseline);
* **hash set** (what the code does): a set of the payloads' ``hash()``, a payload stamped only when it repeats;
* **always**: every payload after the first of the transaction stamped with a serial (copies every payload);
* **digest set**: a set of blake2b digests (exact, but hashes every byte again).

Shapes: a transaction of 20 one-document puts (a member, ~300 bytes), the framed deletes of a 20k-member forget,
a ``put_many`` of 2,000 documents of ~1 KB, and one 100 KB document (its pieces).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable

import orjson

from storage.backends.postgres import notify

Notes = Callable[[], list[str]]


def _none(make: Notes) -> None:
    make()


def _hash_set(make: Notes) -> None:
    notify.Distinct().all(make())


def _always(make: Notes) -> None:
    notes = make()
    [note if i == 0 else note[:-1] + ',["n",' + str(i) + "]]" for i, note in enumerate(notes)]


def _digest_set(make: Notes) -> None:
    seen: set[bytes] = set()
    for note in make():
        digest = hashlib.blake2b(note.encode(), digest_size=16).digest()
        seen.add(digest)


def _shapes() -> dict[str, tuple[Notes, int]]:
    member = orjson.dumps({"statistics": {"message_count": 1234, "last_active": "2026-01-01T00:00:00+00:00"},
                           "join_date": "2025-01-01T00:00:00+00:00", "roles": list(range(10)), "pad": "x" * 150})
    kb = orjson.dumps({"pad": "y" * 1000})
    big = orjson.dumps({"pad": "z" * 100_000})
    keys = [f"1_{100000000000000000 + i}" for i in range(20_000)]
    return {
        # (a fresh list of fresh strings per call: str caches its hash, production payloads are new each time)
        "tx of 20 puts": (lambda: [notify.payloads("members", [(keys[i], member)])[0] for i in range(20)], 200),
        "forget of 20k": (lambda: notify.payloads("members", [(k, None) for k in keys], delete=True), 10),
        "put_many 2000 x 1 KB": (lambda: notify.payloads("docs", [(k, kb) for k in keys[:2000]]), 20),
        "one 100 KB doc": (lambda: notify.payloads("docs", [("k", big)]), 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    variants = {"none": _none, "hash set": _hash_set, "always": _always, "digest set": _digest_set}
    print(f"load average: {os.getloadavg()}")
    for shape, (make, loops) in _shapes().items():
        notes = make()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(loops):
                    fn(make)
                times[name].append((time.perf_counter() - start) / loops * 1e6)
        base = statistics.median(times["none"])
        line = ", ".join(f"{name} +{statistics.median(t) - base:.1f} us" for name, t in times.items() if name != "none")
        print(f"{shape} ({len(notes)} notifications, {sum(map(len, notes)) / 1e3:.0f} KB): "
              f"framing {base:.1f} us; {line}")


if __name__ == "__main__":
    main()
