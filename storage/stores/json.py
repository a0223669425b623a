"""The JSON store: the embedded default, the JSON backend with every feature."""

from __future__ import annotations

from ..backends.json.store import JsonBackend
from .features import StoreFeatures

__all__ = ["JsonStore"]


class JsonStore(JsonBackend, StoreFeatures):
    """A store in plain JSON files (see :mod:`storage.backends.json.store`)."""
