"""The JSON message log read file by file for backups and digests, without holding a month of records as dicts.

``MessageLog.scan`` returns records in time order, one month of every guild at a time: right for queries, but a
backup of 1M messages then holds ~80k records (~250k objects the garbage collector tracks) at once, and each full
collection walked them while the event loop waited on the GIL (benchmarks/README.md, "Design measurements"). A backup
needs no order (its digest is order-independent), so here each file is read on its own, every line is parsed and
turned back into bytes at once (the dict dies with its line, in the youngest generation), and only bytes are kept:
the current version of each record (the last line of an id wins, as in ``_load``). Runs in a worker thread; the
caller holds the store lock, so no writer is in flight (a torn last line left by a crash is skipped, as readers do).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from ...offload import Pacer
from .message_files import list_files, parse_block

__all__ = ["export_records"]


def export_records(root: Path, emit: Callable[[str, bytes, bytes], None], tick: Callable[[int], None]) -> int:
    """Call ``emit(message_id, line, canonical)`` for every current record (``line``: its compact JSON, keys in
    stored order; ``canonical``: keys sorted); ``tick(n)`` after each file. Returns how many records there were."""
    dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS
    total = 0
    pacer = Pacer()  # the event loop's turns (a copy runs this beside the target's writing thread: see Pacer)
    tick_pacer = pacer.tick
    for _key, path, _st in list_files(root):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # pruned meanwhile
        lines: dict[str, bytes] = {}  # str -> bytes: a dict the garbage collector does not track
        canons: dict[str, bytes] = {}

        def sink(rec: dict[str, Any], _update: bool, lines: dict[str, bytes] = lines,
                 canons: dict[str, bytes] = canons) -> None:
            mid = rec["message_id"]
            lines[mid] = dumps(rec)
            canons[mid] = dumps(rec, option=sort)
            tick_pacer()

        parse_block(path, data, 0, sink)
        del data
        for mid, line in lines.items():
            emit(mid, line, canons[mid])
            tick_pacer()
        total += len(lines)
        tick(len(lines))
    return total
