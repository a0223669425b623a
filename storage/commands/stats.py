"""``storage stats GUILD_ID``: a guild's message analytics in the terminal.

Totals, top authors, channels and topics, the sentiment breakdown and a bar chart of activity per day (per week
or month when the period is long), drawn with Unicode blocks. Without ``--channel`` it uses the store's analytics
queries, so it is as fast as the backend makes them (SQL on PostgreSQL); with ``--channel`` it reads the guild's
messages once and computes the same numbers for that channel.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Any

from .. import open_store
from ..cli import add_store_options, existing_store_config
from ..messages.queries import UNKNOWN_SENTIMENT
from ..models import parse_timestamp, snowflake

__all__ = ["register", "Summary", "bar", "render"]

_EIGHTHS = " ▏▎▍▌▋▊▉"
_FULL = "█"
MAX_ROWS = 62  # more days than this are grouped by week, more weeks by month


def register(sub: Any) -> None:
    stats = sub.add_parser("stats", help="message analytics of a guild: totals, top lists, activity per day",
                           description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_store_options(stats)
    stats.add_argument("guild_id", help="the guild (server) id")
    stats.add_argument("--since", help="from this time (ISO 8601, UTC unless an offset is given; included)")
    stats.add_argument("--until", help="up to this time (excluded)")
    stats.add_argument("--channel", help="only this channel's messages")
    stats.add_argument("--top", type=int, default=5, help="rows in each top list (default %(default)s)")
    stats.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    stats.set_defaults(func=run_stats)


@dataclass
class Summary:
    """Everything the command shows, computed by either path."""

    guild_id: str
    channel_id: str | None
    since: str | None
    until: str | None
    messages: int = 0
    authors: int = 0
    channels: int = 0
    top_authors: list[tuple[str, int]] = field(default_factory=list)
    top_channels: list[tuple[str, int]] = field(default_factory=list)
    top_topics: list[tuple[str, int]] = field(default_factory=list)
    sentiment: dict[str, int] = field(default_factory=dict)
    per_day: dict[str, int] = field(default_factory=dict)


async def _from_queries(store: Any, summary: Summary, top: int) -> None:
    window = {"since": summary.since, "until": summary.until}
    guild = summary.guild_id
    summary.per_day = await store.message_counts(guild, by="day", **window)
    summary.messages = sum(summary.per_day.values())
    summary.authors = len(await store.message_counts(guild, by="author", **window))
    summary.channels = len(await store.message_counts(guild, by="channel", **window))
    summary.top_authors = await store.top_authors(guild, top, **window)
    summary.top_channels = await store.top_channels(guild, top, **window)
    summary.top_topics = await store.top_topics(guild, top, **window)
    summary.sentiment = await store.sentiment_breakdown(guild, **window)


async def _from_scan(store: Any, summary: Summary, top: int) -> None:
    """One pass over the guild's messages, keeping those of ``summary.channel_id``."""
    authors: Counter[str] = Counter()
    topics: Counter[str] = Counter()
    sentiment: Counter[str] = Counter()
    days: Counter[str] = Counter()
    async for rec in store.scan_messages(summary.guild_id, summary.since or None, summary.until or None):
        if rec["channel_id"] != summary.channel_id:
            continue
        authors[rec["author_id"]] += 1
        days[rec["timestamp"][:10]] += 1
        analysis = rec["analysis"]
        topics.update(set(analysis.get("topics") or ()))
        mood = analysis.get("sentiment")
        sentiment[UNKNOWN_SENTIMENT if mood is None else mood] += 1
    summary.messages = sum(days.values())
    summary.authors = len(authors)
    summary.channels = 1 if summary.messages else 0
    summary.per_day = dict(sorted(days.items()))
    summary.top_authors = sorted(authors.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    channel = summary.channel_id or ""
    summary.top_channels = [(channel, summary.messages)] if summary.messages and top else []
    summary.top_topics = sorted(topics.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    summary.sentiment = dict(sorted(sentiment.items()))


async def run_stats(args: argparse.Namespace) -> int:
    guild = snowflake(args.guild_id, "guild_id")
    channel = snowflake(args.channel, "channel") if args.channel else None
    for name in ("since", "until"):
        value = getattr(args, name)
        if value:
            parse_timestamp(value, name)  # a bad date fails before the store is opened
    if args.top < 0:
        print("error: --top must be >= 0")
        return 2
    summary = Summary(guild, channel, args.since, args.until)
    async with open_store(config=existing_store_config(args)) as store:
        if channel is None:
            await _from_queries(store, summary, args.top)
        else:
            await _from_scan(store, summary, args.top)
    if args.json:
        print(json.dumps(asdict(summary), indent=2))
    else:
        print(render(summary, shutil.get_terminal_size((100, 24)).columns))
    return 0


# -------------------------------------------------------------------------------------------------------------------
# drawing
def bar(value: float, maximum: float, width: int) -> str:
    """A horizontal bar of ``width`` cells at most, in eighths of a cell."""
    if maximum <= 0 or value <= 0 or width <= 0:
        return ""
    eighths = max(1, round(value / maximum * width * 8))
    return _FULL * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _buckets(per_day: dict[str, int]) -> tuple[str, list[tuple[str, int]]]:
    """Days with no messages included (a gap is information); grouped by week or month when there are many."""
    if not per_day:
        return "day", []
    first, last = date.fromisoformat(min(per_day)), date.fromisoformat(max(per_day))
    days = [(first + timedelta(d)).isoformat() for d in range((last - first).days + 1)]
    if len(days) <= MAX_ROWS:
        return "day", [(d, per_day.get(d, 0)) for d in days]
    weeks: Counter[str] = Counter()
    for d in days:
        day = date.fromisoformat(d)
        weeks[(day - timedelta(day.weekday())).isoformat()] += per_day.get(d, 0)
    if len(weeks) <= MAX_ROWS:
        return "week of", sorted(weeks.items())
    months: Counter[str] = Counter()
    for d in days:
        months[d[:7]] += per_day.get(d, 0)
    return "month", sorted(months.items())


def _table(title: str, rows: list[tuple[str, int]], total: int) -> list[str]:
    lines = [title]
    if not rows:
        return [*lines, "  (none)"]
    width = max(len(key) for key, _n in rows)
    for rank, (key, n) in enumerate(rows, 1):
        share = f"{100 * n / total:5.1f}%" if total else ""
        lines.append(f"  {rank:>2}. {key:<{width}}  {n:>9,}  {share}")
    return lines


def render(summary: Summary, columns: int = 100) -> str:
    """The human-readable report."""
    scope = f"guild {summary.guild_id}" + (f", channel {summary.channel_id}" if summary.channel_id else "")
    period = f"{summary.since or 'the beginning'} to {summary.until or 'now'} (UTC, until excluded)"
    out = [f"Message analytics for {scope}", f"Period: {period}", ""]
    total = summary.messages
    days = f"{min(summary.per_day)} to {max(summary.per_day)}" if summary.per_day else "-"
    out.append(f"Messages: {total:,}   Authors: {summary.authors:,}   Channels: {summary.channels:,}   "
               f"Active days: {days}")
    if not total:
        out.append("")
        out.append("No messages in this period.")
        return "\n".join(out)
    out.append("")
    out += _table("Top authors", summary.top_authors, total)
    out += _table("Top channels", summary.top_channels, total)
    out += _table("Top topics (messages mentioning it)", summary.top_topics, total)
    out.append("")
    out.append("Sentiment")
    biggest = max(summary.sentiment.values(), default=0)
    width = max((len(k) for k in summary.sentiment), default=0)
    bar_width = max(10, min(40, columns - width - 30))
    for mood, n in sorted(summary.sentiment.items(), key=lambda kv: (-kv[1], kv[0])):
        out.append(f"  {mood:<{width}}  {n:>9,}  {100 * n / total:5.1f}%  {bar(n, biggest, bar_width)}")
    unit, buckets = _buckets(summary.per_day)
    out.append("")
    out.append(f"Activity per {unit.split()[0]}")
    label = max(len(key) for key, _n in buckets)
    biggest = max(n for _k, n in buckets)
    bar_width = max(10, columns - label - 16)
    for key, n in buckets:
        out.append(f"  {key:<{label}} {n:>9,} {bar(n, biggest, bar_width)}")
    return "\n".join(out)
