"""The features every store has above its backend's primitives, mixed together once (see :mod:`storage.stores`)."""

from __future__ import annotations

from ..backup.operations import BackupMixin
from ..lifecycle import LifecycleMixin
from ..members import MembersMixin
from ..messages.queries import AnalyticsMixin

__all__ = ["StoreFeatures"]


class StoreFeatures(BackupMixin, MembersMixin, AnalyticsMixin, LifecycleMixin):
    """Everything a store offers above its backend's primitives: the seed's member calls, message analytics,
    backups and restores, forgetting and exporting data."""
