"""``refresh_member_statistics`` on PostgreSQL: one statement that counts in the messages' covering index and
upserts the member documents it changes.

The Python version (:func:`storage.backends.json.message_queries.refresh_statistics`, the JSON backend's) streams
every message of the guild into Python, reads every member document, and writes the changed ones back with
``put_many``: three trips of data across the connection, and most of the time in Python. Here the server does all
of it:

* ``count(*)`` and ``max(created_at)`` per author, from an index-only scan of the guild's range of the covering
  index ``(guild_id, created_at) INCLUDE (..., author_id, ...)``;
* the guild's member documents (keys ``<guild>_<user>`` whose ``<user>`` is a valid snowflake, as the Python
  version checks), a range of the documents' primary key, full-joined to the counts by key;
* an ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` of the members whose statistics differ (in key order, the
  order ``put_many`` locks rows in), returning the keys written, which the store then drops from its cache.

The answer is the Python version's in every respect the tests pin down, so the SQL spells out its Python:

* **Unchanged** is Python's ``==`` on the decoded values: ``message_count`` equal as a number (an int ``5``, a
  float ``5.0``, and ``true`` for ``1``, all count as equal), ``last_active`` the very same text, or null/absent
  when there are no messages. A document without ``statistics`` is always written.
* **Written** is ``{**doc, "statistics": {**old, **new}}``: jsonb ``||`` on both levels, a ``null`` statistics
  counted as ``{}``; a member with no messages in the range gets ``0`` and ``null``; an author without a member
  document gets ``{"user_id", "guild_id", "statistics"}``.
* **Timestamps** are the canonical text of :func:`storage.models.iso_utc` (fraction only when non-zero), made from
  the UTC wall time, so the session's time zone does not matter.
* **A malformed member** (``statistics`` neither an object nor null) stops everything: the statement writes
  nothing when the ``bad`` CTE finds one, and returns the first such key (in key order, the order the Python
  version meets them in) with its statistics, for the same error.

The update uses the row as it is when the upsert reaches it (``d.doc``), not the statement's snapshot: a member
document changed by another process in between keeps that change, where ``put_many`` of the snapshot's version
would undo it. Without concurrent writers both are the same document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ...errors import ValidationError
from .documents import live, prefix_upper_bound

__all__ = ["REFRESH", "member_parameters", "refresh"]


def _merged(doc: str, n: str, last: str) -> str:
    """SQL for ``{**doc, "statistics": {**old, "message_count": n, "last_active": last}}``."""
    old = f"{doc} -> 'statistics'"
    return (f"{doc} || jsonb_build_object('statistics', CASE WHEN jsonb_typeof({old}) = 'object' THEN {old} "
            f"ELSE jsonb_build_object() END || jsonb_build_object('message_count', {n}, 'last_active', {last}))")


# old.get("message_count") == n in Python: True == 1 and False == 0; a number compares by value (exactly: every
# number the store writes is a 64-bit int or a double, and a double equals an int only when its value is the int's).
_SAME_COUNT = """CASE jsonb_typeof(old -> 'message_count')
        WHEN 'number' THEN (old -> 'message_count')::numeric = n
        WHEN 'boolean' THEN (old -> 'message_count')::boolean::int = n
        ELSE false END"""
# old.get("last_active") == last: ->> is NULL for an absent field and for JSON null (Python's None), and the text of
# anything else, which can equal a timestamp's text only when it is that string.
_SAME_LAST = "(old ->> 'last_active') IS NOT DISTINCT FROM last"

_MERGE_NEW = _merged("doc", "n", "last")
_MERGE_CURRENT = _merged("d.doc", "EXCLUDED.doc -> 'statistics' -> 'message_count'",
                         "EXCLUDED.doc -> 'statistics' -> 'last_active'")

# $1 the collection, $2 the key prefix "<guild>_", $3 the first key after the prefix's range, $4 where the user
# id starts in a key (1-based), $5 the guild id; ``{where}`` (see pg_messages._where) numbers its own from $6.
REFRESH = f"""
WITH agg AS (
    SELECT author_id, count(*) AS n, max(created_at) AT TIME ZONE 'UTC' AS last
    FROM storage_messages{{where}} GROUP BY author_id
), stats AS (
    SELECT ($2::text || (author_id::numeric + 9223372036854775808)::text) COLLATE "C" AS key, n,
        to_char(last, 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN date_trunc('second', last) = last THEN '' ELSE to_char(last, '.US') END || 'Z' AS last
    FROM agg
), members AS (
    SELECT key, doc, doc -> 'statistics' AS old FROM storage_documents
    WHERE collection = $1 AND key >= $2 AND key < $3 AND {{live}}
        AND substr(key, $4) ~ '^(0|[1-9][0-9]*)$' AND length(substr(key, $4)) <= 20
        AND (length(substr(key, $4)) < 20 OR substr(key, $4) <= '18446744073709551615')
), bad AS (
    SELECT key, old FROM members WHERE jsonb_typeof(old) NOT IN ('object', 'null') ORDER BY key LIMIT 1
), target AS (
    SELECT key, m.doc, m.old, coalesce(s.n, 0) AS n, s.last
    FROM members AS m FULL JOIN stats AS s USING (key)
), written AS (
    INSERT INTO storage_documents AS d (collection, key, doc)
    SELECT $1, key, CASE WHEN doc IS NULL
        THEN jsonb_build_object('user_id', substr(key, $4), 'guild_id', $5::text,
                                'statistics', jsonb_build_object('message_count', n, 'last_active', last))
        ELSE {_MERGE_NEW} END
    FROM target
    WHERE NOT EXISTS (SELECT FROM bad) AND (doc IS NULL OR NOT coalesce({_SAME_COUNT}
        AND {_SAME_LAST}, false))
    ORDER BY key
    ON CONFLICT (collection, key) DO UPDATE SET doc = CASE WHEN {{live_d}} THEN {_MERGE_CURRENT} ELSE EXCLUDED.doc END,
        expires_at = CASE WHEN {{live_d}} THEN d.expires_at END
    RETURNING d.key
)
SELECT (SELECT key FROM bad), (SELECT old FROM bad), ARRAY(SELECT key FROM written)
"""


def member_parameters(collection: str, guild: str) -> list[Any]:
    """The first five parameters of :data:`REFRESH`: the members' collection, a canonical guild id."""
    prefix = f"{guild}_"
    return [collection, prefix, prefix_upper_bound(prefix), len(prefix) + 1, guild]


def refresh_statement(where: str, args: list[Any]) -> str:
    """:data:`REFRESH` with its filter; its parameters are ``args`` and then the store's now (expiry)."""
    now_param = f"${len(args) + 1}"
    return REFRESH.format(where=where, live=live(now_param), live_d=live(now_param, "d."))


async def refresh(conn: Any, collection: str, where: str, args: list[Any], now: datetime) -> list[str]:
    """Run :data:`REFRESH` (``args``: :func:`member_parameters`, then the filter's); returns the keys written.

    A malformed member raises :class:`ValidationError` with the Python version's message; nothing is written then.
    Members that are no longer visible at ``now`` (storage/expiry.py) are absent: one with messages is written anew
    (permanent) over the expired row; a visible member keeps its expiry.
    """
    bad_key, bad_stats, written = await conn.fetchrow(refresh_statement(where, args), *args, now)
    if bad_key is not None:
        raise ValidationError(f"{collection}/{bad_key}: statistics is a {type(bad_stats).__name__}, not an object; "
                              "nothing was written", field="statistics")
    keys: list[str] = written
    return keys
