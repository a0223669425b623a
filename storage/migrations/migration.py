"""The ``Migration`` base class: a version, a description, and ``up``/``down`` written against the Store API.

The seed's migrations opened ``config/members.json`` and rewrote it. Ours receive a
:class:`~storage.migrations.context.MigrationContext`: the store's document methods inside the migration's own
transaction, so the same code runs on JSON and PostgreSQL and a failure changes nothing.

Checksums: the ledger keeps a checksum of each applied migration's code, so that editing a migration after it
ran (the classic way two environments drift apart) is reported by ``validate()`` instead of going unnoticed. The
checksum is the sha256 of the class's own source (``inspect.getsource``), normalized so that indentation, trailing
spaces, blank lines and whole-line comments do not count. Code the class calls elsewhere (a helper function, a
base class) is not included: keep a migration self-contained, or override :meth:`Migration.checksum`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import textwrap
from typing import TYPE_CHECKING

from ..errors import MigrationError

if TYPE_CHECKING:
    from .context import MigrationContext

__all__ = ["Migration", "source_checksum"]

log = logging.getLogger("storage.migrations")


def source_checksum(cls: type) -> str:
    """``"sha256:<hex>"`` of the normalized source of ``cls``.

    When the source cannot be read (a class typed into a REPL or ``python -c``), the checksum falls back to the
    class's qualified name, prefixed ``"name:"`` so nobody mistakes it for a real code checksum.
    """
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        log.warning("no source for %s.%s: its checksum covers only its name", cls.__module__, cls.__qualname__)
        digest = hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}".encode()).hexdigest()
        return f"name:{digest}"
    lines = (line.rstrip() for line in textwrap.dedent(source.replace("\r\n", "\n")).split("\n"))
    kept = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return "sha256:" + hashlib.sha256("\n".join(kept).encode("utf-8")).hexdigest()


class Migration:
    """One versioned change. Subclass it and implement :meth:`up` (and :meth:`down` to make it reversible).

    Two ways to give the version and description, both as the seed wrote them::

        class AddUserPreferences(Migration):
            def __init__(self):
                super().__init__("1.1.0", "Add user preferences to member data")

        class AddUserPreferences(Migration):
            version = "1.1.0"
            description = "Add user preferences to member data"

    ``up`` and ``down`` receive a :class:`~storage.migrations.context.MigrationContext` (named ``store`` in the
    seed's signature, and it behaves like one): ``get/put/put_many/delete/update/items/count``, the seed's member
    calls, ``transform()``, and the escape hatches ``connection`` (PostgreSQL) and ``path`` (JSON).
    """

    version: str
    description: str = ""

    def __init__(self, version: str | None = None, description: str | None = None) -> None:
        if version is None:
            version = getattr(type(self), "version", None)
        if version is None:
            raise MigrationError(f"{type(self).__qualname__}: a migration needs a version, like '1.1.0'")
        if not isinstance(version, str):
            raise MigrationError(f"{type(self).__qualname__}: version must be a str like '1.1.0', got {version!r}")
        if description is None:
            description = getattr(type(self), "description", "")
        if not isinstance(description, str):
            raise MigrationError(f"{type(self).__qualname__}: description must be a str, got {description!r}")
        self.version = version
        self.description = description

    async def up(self, store: MigrationContext) -> None:
        """Apply the change. Raise to abort: nothing this migration wrote through ``store`` is kept."""
        raise NotImplementedError(f"{type(self).__qualname__} does not implement up()")

    async def down(self, store: MigrationContext) -> None:
        """Undo :meth:`up`, leaving the documents exactly as they were before it. Not overriding it makes the
        migration irreversible: ``downgrade`` refuses to cross it."""
        raise NotImplementedError(f"{type(self).__qualname__} does not implement down()")

    @property
    def name(self) -> str:
        """``module.ClassName``: where to find the code, shown in the ledger and in error messages."""
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"

    @property
    def reversible(self) -> bool:
        return type(self).down is not Migration.down

    def checksum(self) -> str:
        """What the ledger compares to detect an edited migration; override to choose what counts as a change."""
        return source_checksum(type(self))

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {getattr(self, 'version', None)!r}: {getattr(self, 'description', '')!r}>"
