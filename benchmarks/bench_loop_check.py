"""What the event-loop check costs a ``get`` (issue 17): every store call compares the running loop with the one
that opened the store, so a store opened in ``asyncio.run(...)`` and used under ``bot.run()`` raises
``storage.EventLoopError`` instead of asyncpg's bare RuntimeError.

Rounds of ``get_member_data`` on a JSON store (the cheapest call there is: a dict lookup and a decode, so the
check's share is the largest it can be), alternating between the store's guard and the same guard without the
loop comparison; medians of the rounds, and the ratio within this run.

    .venv/bin/python benchmarks/bench_loop_check.py [--rounds 15] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import storage
from benchmarks._common import atimed, machine_info, print_table, write_results
from storage.backends import base
from storage.errors import StoreClosedError


def _without_loop_check(self: base.BackendBase) -> None:
    """The guard as it was before the loop check (closed store only)."""
    if self._closed:
        raise StoreClosedError(f"the {self.backend_name} store is closed")


async def main(rounds: int, seconds: float) -> None:
    with_check = base.BackendBase._guard_open
    times: dict[str, list[float]] = {"with loop check": [], "without": []}
    with tempfile.TemporaryDirectory() as folder:
        async with storage.open_store(backend="json", path=folder) as store:
            for user in range(1000):
                await store.save_member_data(user + 1, 7, {"roles": ["member"], "statistics": {"message_count": 1}})
            try:
                for _ in range(rounds):
                    for name, guard in (("with loop check", with_check), ("without", _without_loop_check)):
                        base.BackendBase._guard_open = guard  # type: ignore[method-assign]
                        rate = await atimed(lambda i: store.get_member_data(i % 1000 + 1, 7), seconds=seconds)
                        times[name].append(1e6 * rate.seconds / rate.ops)
            finally:
                base.BackendBase._guard_open = with_check  # type: ignore[method-assign]
    med = {name: statistics.median(v) for name, v in times.items()}
    rows = [[name, f"{med[name]:.2f}", f"{min(v):.2f}"] for name, v in times.items()]
    rows.append(["difference", f"{med['with loop check'] - med['without']:+.2f}",
                 f"{min(times['with loop check']) - min(times['without']):+.2f}"])
    print_table(["get_member_data (JSON)", "median us/call", "best us/call"], rows,
                title=f"event-loop check: {rounds} alternating rounds of {seconds}s")
    print(f"ratio with/without (medians): {med['with loop check'] / med['without']:.3f}")
    write_results("loop_check", {"machine": machine_info(), "us_per_call": times, "median_us": med})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.3)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.seconds))
