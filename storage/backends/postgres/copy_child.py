"""A PostgreSQL restore's ``COPY`` rows, read and encoded in a child process (storage/child.py).

The restore's worker thread decoded every backed-up record and encoded its row (``_next_copy_data``, Python, a few
us a record): at 1M messages, seconds of a thread holding the GIL the event loop needs. Here a child process does
exactly that, with the same functions, and hands over each ``COPY``'s rows as one bytes object; the restore's thread
only passes them on (postgres/store.py, ``PgTransaction._replace_messages``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from .ingest import RowEncoder
from .store import _next_copy_data

__all__ = ["copy_chunks"]


def copy_chunks(target: str, args: list[Any]) -> Iterator[tuple[int, bytes]]:
    """``(records, COPY rows)`` of the batches the generator ``target`` (this package's, see
    ``storage.child.Recipe``) yields for ``args``: each as ``_next_copy_data`` makes it, in the same order."""
    module, name = target.split(":")
    if not module.startswith("storage."):
        raise ValueError(f"not a generator of this package: {target}")
    counted = 0

    def counting() -> Iterator[list[dict[str, Any]]]:
        nonlocal counted
        for batch in getattr(importlib.import_module(module), name)(*args):
            counted += len(batch)
            yield batch

    batches, encoder, done = counting(), RowEncoder(), 0
    while (data := _next_copy_data(batches, encoder)) is not None:
        yield counted - done, data
        done = counted
