"""``python -m storage`` / ``storage``: the operator's command line.

Each command lives in its own module under :mod:`storage.commands` with a ``register(subparsers)`` function that
adds its parser and sets ``func`` (an ``async def func(args) -> int`` returning the exit code). The backend comes
from the same environment resolution as the library (``StoreConfig.from_env``), overridable with ``--path`` /
``--dsn`` / ``--backend``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import StoreConfig
from .errors import DatabaseError

__all__ = ["main", "build_parser", "config_from_args", "existing_store_config", "require_store", "CommandRefused",
           "COMMAND_MODULES", "EXIT_REFUSED"]

#: Exit code of a command that refused to run (a store that is not there, demo over foreign data).
EXIT_REFUSED = 2
#: Exit code when the reader of our output went away (``| head``): what a shell reports for SIGPIPE.
EXIT_BROKEN_PIPE = 141
_LITERAL = re.compile(r"``?([^`]+)``?")
#: The JSON backend's journal: a folder holding it (or a ``*.json`` collection) holds a store.
JOURNAL_NAME = "storage.journal"

#: Modules under storage.commands, each adding one or more subcommands.
COMMAND_MODULES = ("core", "check", "migrate", "backup", "stats", "forget")


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """``--backend/--path/--dsn``: where the data is. Without them, the environment decides."""
    parser.add_argument("--backend", choices=("json", "postgres"), help="force a backend (default: from env)")
    parser.add_argument("--path", help="JSON backend folder (default: $STORAGE_PATH or ./config)")
    parser.add_argument("--dsn", help="PostgreSQL URL (default: from DATABASE_PUBLIC_URL, PG*, DB_*)")


def config_from_args(args: argparse.Namespace) -> StoreConfig:
    """The store configuration the command line asked for, falling back to the environment."""
    return StoreConfig.choose(getattr(args, "backend", None), getattr(args, "path", None),
                              getattr(args, "dsn", None), source="command line")

class CommandRefused(Exception):
    """The command line refuses to run (exit :data:`EXIT_REFUSED`); the message says why and what to do."""


def require_store(config: StoreConfig) -> None:
    """Refuse a JSON folder that does not exist or holds no store (no journal, no ``*.json`` collection).

    The library creates a store where it is asked to (a bot's first start), but a command that reads or maintains
    one must not: ``check --path reall`` (a typo) would report "ok" on an empty new folder, and ``backup create``
    would back up nothing and let retention push out the real store's backups."""
    if config.backend != "json":
        return
    path = Path(config.path)
    where = os.path.abspath(path)
    if not path.is_dir():
        raise CommandRefused(f"no store at {where}: the folder does not exist (a typo?); nothing was created. "
                             "Check --path / STORAGE_PATH (a bot creates its store on first start; "
                             "'python -m storage demo' creates one with sample data)")
    if not (path / JOURNAL_NAME).exists() and not any(path.glob("*.json")):
        raise CommandRefused(f"no store at {where}: the folder holds no {JOURNAL_NAME} and no .json collection "
                             "(a typo in --path / STORAGE_PATH?); nothing was created")


def existing_store_config(args: argparse.Namespace) -> StoreConfig:
    """:func:`config_from_args`, refusing a JSON folder that holds no store (see :func:`require_store`)."""
    config = config_from_args(args)
    require_store(config)
    return config


def _plain(text: str | None) -> str | None:
    """Help text for a terminal: reStructuredText literals (````x```` and ```x```) as plain quotes."""
    if text is None:
        return None
    return _LITERAL.sub(r"'\1'", text)


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand a description (its one-line help when it has none) and plain-text help, recursively:
    ``storage backup create --help`` must say what the command does, not only list options."""
    parser.description = _plain(parser.description)
    parser.epilog = _plain(parser.epilog)
    for action in parser._actions:
        action.help = _plain(action.help)
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, child in action.choices.items():
                if not child.description:
                    child.description = helps.get(name)
                _finish_help(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storage", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        module: Any = importlib.import_module(f"storage.commands.{name}")
        module.register(sub)
    _finish_help(parser)
    return parser


def _quiet_stdout() -> None:
    """After a broken pipe (``storage status | head -1``): send the rest of the output nowhere, so that the
    interpreter's final flush does not print a second traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = asyncio.run(args.func(args))
        sys.stdout.flush()  # inside the try: a reader that went away is noticed here, not at exit
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except CommandRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except DatabaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
