"""Migration versions, compared as versions: ``"1.10.0"`` comes after ``"1.9.0"``, and ``"1.1"`` is ``"1.1.0"``.

String comparison puts ``"1.10.0"`` before ``"1.9.0"``, which is how a migration silently runs out of order. A
version is dot-separated non-negative integers without leading zeros (``"01.2"`` is ambiguous, so it is refused);
trailing zeros do not count, so ``"1.1"`` and ``"1.1.0"`` are the same version and cannot both exist. ``"0"`` is the
version before every migration: ``downgrade(target="0")`` rolls everything back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import MigrationError

__all__ = ["Version", "parse_version", "BASE_VERSION"]

_VERSION_RE = re.compile(r"(?:0|[1-9][0-9]{0,8})(?:\.(?:0|[1-9][0-9]{0,8})){0,7}\Z")


@dataclass(frozen=True, order=True)
class Version:
    """A parsed version. Equality and order use the numbers only; ``text`` is kept as the user wrote it."""

    key: tuple[int, ...] = field(repr=False)
    text: str = field(compare=False)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Version({self.text!r})"


def parse_version(text: object, *, what: str = "version") -> Version:
    """``text`` as a :class:`Version`, or :class:`MigrationError` saying what a version must look like."""
    if not isinstance(text, str) or not _VERSION_RE.match(text):
        raise MigrationError(
            f"{what} must be dot-separated numbers without leading zeros, like '1.1.0' (got {text!r})")
    parts = [int(p) for p in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return Version(tuple(parts), text)


BASE_VERSION = parse_version("0")
