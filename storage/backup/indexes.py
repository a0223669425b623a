"""The declared indexes (``ensure_index``) that ``copy``, backups and restores carry from one store to another.

An index changes no answer, only how fast one comes: at 100k members an indexed equality ``find`` took 0.16-0.19 ms
on JSON and 1.2 ms on PostgreSQL, the same query without the index 94-141 ms and 272 ms (``bench_queries.py``, the
issue 14 note). A bot that moved its data with ``copy``, or restored a backup into a new store, would otherwise find
every such query a scan of the whole collection until it declared its indexes again. So:

* ``copy`` declares the source's indexes on the target once the documents are in (one build over the final data),
  drops the target's others with ``overwrite`` (the target ends as a replica), and verifies them with the content;
* a backup's manifest records them (``"indexes": {collection: [path, ...]}``, the collections sorted; absent in
  backups written before this, which then carry none);
* a restore declares the backup's indexes the store lacks and drops none: the bot that runs on the store declares
  its own at start and its queries rely on them, and an extra index costs writes a little, never an answer.

Declarations are the store's, not a transaction's: they are read before a backup's or a copy's transaction begins
(on PostgreSQL a call inside it would wait for a second pool connection) and declared after it ended (PostgreSQL's
``CREATE INDEX CONCURRENTLY`` waits for every older transaction of the database, the source's included).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..codec import check_collection
from ..errors import BackupError, ValidationError
from ..interfaces import Backend
from ..progress import NullProgress, Progress
from ..query.plan import check_path

__all__ = ["IndexMap", "index_difference", "carry_indexes", "manifest_indexes"]

#: ``{collection: [path, ...]}``: what ``Backend._all_indexes`` returns.
IndexMap = dict[str, list[str]]


def index_difference(wanted: Mapping[str, list[str]], have: Mapping[str, list[str]]) -> tuple[IndexMap, IndexMap]:
    """``(in wanted but not in have, in have but not in wanted)``, each ``{collection: [path, ...]}``, sorted."""

    def minus(a: Mapping[str, list[str]], b: Mapping[str, list[str]]) -> IndexMap:
        out = {name: sorted(set(paths) - set(b.get(name, ()))) for name, paths in a.items()}
        return {name: paths for name, paths in sorted(out.items()) if paths}

    return minus(wanted, have), minus(have, wanted)


async def carry_indexes(target: Backend, indexes: Mapping[str, list[str]], *, exact: bool,
                        progress: Progress | None = None) -> IndexMap:
    """Declare each of ``indexes`` that ``target`` lacks; with ``exact``, first drop those of ``target`` that are not
    in ``indexes``. Returns what was dropped."""
    progress = progress or NullProgress()
    missing, extra = index_difference(indexes, await target._all_indexes())
    if not exact:
        extra = {}
    progress.phase("indexes", sum(map(len, missing.values())) + sum(map(len, extra.values())))
    for name, paths in extra.items():
        for path in paths:
            await target.drop_index(name, path)
            progress.advance()
    for name, paths in missing.items():
        for path in paths:
            await target.ensure_index(name, path)
            progress.advance()
    return extra


def manifest_indexes(manifest: Mapping[str, Any]) -> IndexMap:
    """A manifest's ``indexes`` (``{}`` when absent: a backup from before they were recorded), every collection
    name and path checked; :class:`BackupError` if malformed."""
    raw = manifest.get("indexes")
    if raw is None:
        return {}
    if type(raw) is not dict:
        raise BackupError("manifest.json: 'indexes' is malformed")
    out: IndexMap = {}
    for name, paths in raw.items():
        try:
            check_collection(name)
            if type(paths) is not list:
                raise ValidationError(f"not a list of paths: {paths!r}")
            out[name] = sorted({".".join(check_path(path)) for path in paths})
        except ValidationError as exc:
            raise BackupError(f"manifest.json: 'indexes' of {name!r} is malformed: {exc}") from exc
    return out
