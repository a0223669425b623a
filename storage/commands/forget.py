"""``storage forget guild ID``, ``storage forget user ID [--guild ID]``, ``storage export user ID``: the data
lifecycle (:mod:`storage.lifecycle`) from the command line.

``forget`` removes, all or nothing, everything the store holds about a guild (when the bot left it) or a user (a
deletion request) and prints what it removed, per collection (``messages`` for message records). It asks for no
confirmation: ``--dry-run`` first prints what it would remove, and changes nothing (the store is opened read-only).
``export user`` prints everything stored about a user as JSON on standard output (``> user.json``): exactly what
``forget user`` would remove.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from .. import open_store
from ..cli import add_store_options, existing_store_config
from ..models import snowflake

__all__ = ["register", "render_counts"]


def register(sub: Any) -> None:
    forget = sub.add_parser("forget", help="remove everything stored about a guild or a user (all or nothing)",
                            description=__doc__.split("\n\n")[1] if __doc__ else None)
    kinds = forget.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    guild = kinds.add_parser("guild", help="a guild's members, message records and every document keyed by it")
    guild.add_argument("guild_id", help="the guild (server) id")
    user = kinds.add_parser("user", help="a user's member documents, message records and documents keyed by them")
    user.add_argument("user_id", help="the user id")
    user.add_argument("--guild", help="only what the user has in this guild")
    for parser in (guild, user):
        add_store_options(parser)
        parser.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
        parser.set_defaults(func=run_forget)

    export = sub.add_parser("export", help="print everything stored about a user as JSON (a data-access request)")
    export_kinds = export.add_subparsers(dest="kind", metavar="KIND")
    export_kinds.required = True
    export_user = export_kinds.add_parser("user", help="the user's member documents, message records and "
                                          "documents keyed by them, as JSON on standard output")
    export_user.add_argument("user_id", help="the user id")
    export_user.add_argument("--guild", help="only what the user has in this guild")
    add_store_options(export_user)
    export_user.set_defaults(func=run_export)


def render_counts(counts: dict[str, int], *, dry_run: bool, what: str) -> str:
    """The lines ``forget`` prints: a header, then one ``name  count`` line per collection."""
    if not counts:
        return f"nothing stored about {what}: nothing {'would be ' if dry_run else ''}removed"
    head = f"would remove from {what} (dry run, nothing changed):" if dry_run else f"removed {what}:"
    width = max(len(name) for name in counts)
    lines = [head] + [f"  {name:<{width}}  {n}" for name, n in counts.items()]
    lines.append(f"  {'total':<{width}}  {sum(counts.values())}")
    return "\n".join(lines)


async def run_forget(args: argparse.Namespace) -> int:
    # ids are checked before the store is opened: a typo never opens (or creates) anything
    user: str | None = None
    if args.kind == "guild":
        guild: str | None = snowflake(args.guild_id, "guild_id")
        what = f"guild {guild}"
    else:
        user = snowflake(args.user_id, "user_id")
        guild = snowflake(args.guild, "guild") if args.guild else None
        what = f"user {user}" + (f" in guild {guild}" if guild else "")
    config = existing_store_config(args)
    if args.dry_run:
        config = dataclasses.replace(config, read_only=True)  # a dry run cannot change anything
    async with open_store(config=config) as store:
        if user is None:
            assert guild is not None
            counts = await store.forget_guild(guild, dry_run=args.dry_run)
        else:
            counts = await store.forget_user(user, guild_id=guild, dry_run=args.dry_run)
    print(render_counts(counts, dry_run=args.dry_run, what=what))
    return 0


async def run_export(args: argparse.Namespace) -> int:
    user = snowflake(args.user_id, "user_id")
    guild = snowflake(args.guild, "guild") if args.guild else None
    config = dataclasses.replace(existing_store_config(args), read_only=True)  # an export never changes the store
    async with open_store(config=config) as store:
        exported = await store.export_user(user, guild_id=guild)
    sys.stdout.write(json.dumps(exported, ensure_ascii=False, indent=2) + "\n")
    return 0
