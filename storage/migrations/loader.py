"""Finding a project's migrations by module name, for the command line (``--migrations`` / ``STORAGE_MIGRATIONS``).

The module either exposes a list ``MIGRATIONS`` (objects or classes), or every :class:`Migration` subclass *defined
in it* (not imported into it) is taken, except those another class of the module subclasses (shared bases). Each
is created without arguments, so it must give its version itself (the seed's ``super().__init__("1.1.0", ...)`` or a
``version`` class attribute). The current directory is put on ``sys.path`` so a
project's own package imports the same way under ``python -m storage`` and the ``storage`` console script.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from ..errors import MigrationError
from .migration import Migration
from .migrator import check_migrations

__all__ = ["load_migrations", "ENV_VAR"]

ENV_VAR = "STORAGE_MIGRATIONS"


def load_migrations(module_name: str | None = None) -> list[Migration]:
    """The migrations of ``module_name`` (default ``$STORAGE_MIGRATIONS``), sorted and checked."""
    name = module_name or os.environ.get(ENV_VAR, "").strip()
    if not name:
        raise MigrationError(f"which migrations? pass --migrations MODULE (e.g. mybot.migrations) or set {ENV_VAR}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise MigrationError(f"cannot import the migrations module {name!r}: {exc}") from exc
    found = getattr(module, "MIGRATIONS", None)
    if found is None:
        defined = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                   if issubclass(cls, Migration) and cls is not Migration and cls.__module__ == module.__name__]
        found = [cls for cls in defined if not any(other is not cls and issubclass(other, cls) for other in defined)]
        if not found:
            raise MigrationError(f"{name} has no MIGRATIONS list and defines no Migration subclass")
    return check_migrations(found)
