"""Example migrations, loadable by the command line from the repository root::

    python -m storage migrate status --path config --migrations examples.migrations
    python -m storage migrate up     --path config --migrations examples.migrations

A bot keeps its own package the same way (``mybot/migrations/__init__.py`` with a ``MIGRATIONS`` list) and sets
``STORAGE_MIGRATIONS=mybot.migrations``. The list's order does not matter: versions decide.
"""

from .add_user_preferences import AddUserPreferences
from .move_message_count import MoveMessageCount

MIGRATIONS = [AddUserPreferences(), MoveMessageCount()]

__all__ = ["MIGRATIONS", "AddUserPreferences", "MoveMessageCount"]
