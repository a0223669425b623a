"""Planner statistics after bulk loads: ``ANALYZE`` what was loaded, once it is committed.

Why: autovacuum analyzes a table only after 10% of it changed *and* its naptime passed, so right after a bulk load
(``copy`` into PostgreSQL, a restore, a ``put_many`` of 100k documents, ``record_messages`` of thousands) the
planner still believes the table is empty or small. Measured in issue 14: a prefix scan took 3.06 s after a 100k
``put_many`` and 0.41 s after ``ANALYZE``.

When: only bulk writes count (a call that wrote at least :data:`BULK_ROWS` rows), so a bot's small writes never pay
for an ``ANALYZE``; once the rows bulk-loaded into a table since its last ``ANALYZE`` by this store reach
:data:`ANALYZE_AFTER_ROWS` and a tenth of what the table held then (the same proportion autovacuum uses), the
table is analyzed right after the write's commit, on the same connection, never inside a transaction (a user's
transaction reports its bulk rows when it commits). ``ANALYZE`` samples at most 30,000 rows (with the default
statistics target), so it costs tens of milliseconds whatever the table's size. A failing ``ANALYZE`` is logged and
never fails the write it follows: that write is committed already.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import DRIVER_ERRORS

__all__ = ["LoadStatistics", "ANALYZE_AFTER_ROWS", "BULK_ROWS", "TABLES"]

log = logging.getLogger("storage.postgres")

#: Rows bulk-loaded into a table after which it is analyzed (and at least a tenth of its size at the last one).
ANALYZE_AFTER_ROWS = 1000
#: A write of at least this many rows is a bulk load (smaller ones are never counted).
BULK_ROWS = 100
#: The tables this module analyzes (names are never taken from input).
TABLES = ("storage_documents", "storage_messages")


class LoadStatistics:
    """One store's count of rows bulk-loaded per table since its last ``ANALYZE`` of it (see the module doc)."""

    def __init__(self) -> None:
        self._loaded: dict[str, int] = {}
        self._size: dict[str, float] = {}  # pg_class.reltuples right after our last ANALYZE

    def note(self, table: str, rows: int) -> bool:
        """Count a committed write of ``rows`` rows; True when the table is due for an ``ANALYZE``."""
        assert table in TABLES
        if rows < BULK_ROWS:
            return False
        loaded = self._loaded[table] = self._loaded.get(table, 0) + rows
        return loaded >= max(ANALYZE_AFTER_ROWS, 0.1 * self._size.get(table, 0.0))

    async def after_load(self, conn: Any, table: str, rows: int) -> None:
        """:meth:`note`, then ``ANALYZE table`` on ``conn`` (outside any transaction) when due."""
        if not self.note(table, rows):
            return
        self._loaded[table] = 0
        try:
            await conn.execute(f"ANALYZE {table}")
            size = await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = $1::regclass", table)
            self._size[table] = float(size or 0.0)
        except DRIVER_ERRORS as exc:
            log.warning("ANALYZE %s after a bulk load failed (queries may plan badly until autovacuum analyzes it): "
                        "%s: %s", table, type(exc).__name__, exc)
