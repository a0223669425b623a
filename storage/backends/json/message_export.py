"""The JSON message log read file by file for backups and digests, without holding a month of records as dicts.

``MessageLog.scan`` returns records in time order, one month of every guild at a time: right for queries, but a
backup of 1M messages then holds ~80k records (~250k objects the garbage collector tracks) at once, and each full
collection walked them while the event loop waited on the GIL (benchmarks/README.md, "Design measurements"). A backup
needs no order (its digest is order-independent), so here each file is read on its own, every line is parsed and
turned back into bytes at once (the dict dies with its line, in the youngest generation), and only bytes are kept:
the current version of each record (the last line of an id wins, as in ``_load``). Runs in a worker thread; the
caller holds the store lock, so no writer is in flight (a torn last line left by a crash is skipped, as readers do).

Every step between two of the pacer's ticks is small (issue 15: the loop waits for whatever a worker does while it
holds the GIL). At a file's boundary there was none for 12-14 ms of the thread's CPU on 50k-record files (14 MB;
benchmarks/README.md, "Design measurements", helper export9):

- the previous file's two dicts freed at once: 4.5-5 ms holding the GIL. Most of it was orjson's: ``dumps``
  returns a ``bytes`` whose buffer is 4 KB whatever the length (orjson 3.13 here does not shrink it; ``sys.getsizeof``
  shows the length, ``tracemalloc`` the 4 KB), so a file's 100k encodings were 400 MB of ``malloc`` chunks,
  each touched page a fault when made and each chunk a ``free`` when dropped. Each encoding is now kept as a copy
  of its own size (``b"".join((encoded, b""))``: a join of one item would return the item itself), which also
  makes the export ~20% cheaper in CPU, and the dicts are emptied :data:`FREE_SLICE` entries at a time with a
  tick between two slices (:func:`_free`);
- the whole file read as one ``bytes`` (7.6 ms of the thread's CPU, most of it the kernel's copy with the GIL
  released, but dropping the 14 MB buffer held it 1 ms). It is now read :data:`READ_BLOCK` bytes at a time
  (:func:`_parse_file`), a tick before each block.

The records and their order are unchanged: each file's dicts are filled, then emitted in the order of their first
lines, then freed. Not freed while emitted, one ``pop`` of the first entry at a time: a dict's iterator starts at
its first slot and steps over every deleted one, so taking the first of what is left is quadratic in a file's
records (+3 s of CPU per 1M records, measured; the likely cost of an earlier bounded version of this module).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from ...offload import Pacer
from .message_files import corrupt, iter_blocks, list_files, parse_block, parse_line

__all__ = ["export_records", "READ_BLOCK", "FREE_SLICE"]

#: Bytes of a message file read at a time: a 1 MB read and its parse are far from a tick's worth of GIL.
READ_BLOCK = 1 << 20
#: Dict entries freed between two ticks (a ``str`` and a ``bytes``, or a ``bytes``: ~0.2 ms a slice).
FREE_SLICE = 2048


def export_records(root: Path, emit: Callable[[str, bytes, bytes], None], tick: Callable[[int], None]) -> int:
    """Call ``emit(message_id, line, canonical)`` for every current record (``line``: its compact JSON, keys in
    stored order; ``canonical``: keys sorted); ``tick(n)`` after each file. Returns how many records there were."""
    dumps, sort, join = orjson.dumps, orjson.OPT_SORT_KEYS, b"".join
    total = 0
    pacer = Pacer()  # the event loop's turns (a copy runs this beside the target's writing thread: see Pacer)
    tick_pacer = pacer.tick
    for _key, path, _st in list_files(root):
        lines: dict[str, bytes] = {}  # str -> bytes: a dict the garbage collector does not track
        canons: dict[str, bytes] = {}

        def sink(rec: dict[str, Any], _update: bool, lines: dict[str, bytes] = lines,
                 canons: dict[str, bytes] = canons) -> None:
            mid = rec["message_id"]
            lines[mid] = join((dumps(rec), b""))  # a copy of its own size: see the module's docstring
            canons[mid] = join((dumps(rec, option=sort), b""))
            tick_pacer()

        if not _parse_file(path, sink, tick_pacer):
            continue  # pruned meanwhile
        for mid, line in lines.items():
            emit(mid, line, canons[mid])
            tick_pacer()
        count = len(lines)
        _free(lines, tick_pacer)
        _free(canons, tick_pacer)
        total += count
        tick(count)
    return total


def _parse_file(path: Path, sink: Callable[[dict[str, Any], bool], None], tick: Callable[[], None]) -> bool:
    """Hand ``sink`` the record of each complete line of ``path``, read :data:`READ_BLOCK` bytes at a time;
    False when the file is gone. A last line that does not parse is skipped (torn by a crash, as
    :func:`~.message_files.parse_block` decides for a whole file); any other bad line raises
    :class:`~storage.errors.CorruptDataError` with its position."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        blocks = iter_blocks(fd, 0, os.fstat(fd).st_size, READ_BLOCK)
        for offset, block in blocks:
            tick()
            used = parse_block(path, block, offset, sink)
            if used < len(block):  # the block's last line does not parse: torn if it is the file's last
                if next(blocks, None) is not None:
                    try:
                        parse_line(block[used:-1])
                    except ValueError as exc:
                        raise corrupt(path, offset + used, exc) from None
                return True
    finally:
        os.close(fd)
    return True


def _free(entries: dict[str, bytes], tick: Callable[[], None]) -> None:
    """Empty ``entries`` :data:`FREE_SLICE` at a time, a tick between two slices: dropped whole, a 50k-record
    file's two dicts held the GIL 4.5-5 ms."""
    popitem = entries.popitem
    while entries:
        for _ in itertools.repeat(None, min(FREE_SLICE, len(entries))):
            popitem()
        tick()
