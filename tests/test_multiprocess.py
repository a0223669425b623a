"""Several real processes on the same data: no lost updates, on every backend."""

from __future__ import annotations

from tests._proc import spawn


async def test_four_processes_increment_exactly(store, store_config):
    per_process, keys, processes = 150, 3, 4
    procs = [spawn("incrementer", store_config, per_process, keys) for _ in range(processes)]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.strip() == "DONE"
    counts = {k: d["n"] async for k, d in store.items("counters")}
    assert counts == {f"c{i}": per_process * processes // keys for i in range(keys)}
