"""The data lifecycle as a feature of the public stores (:class:`LifecycleMixin`, mixed in by :mod:`storage.stores`):
``forget_guild``, ``forget_user``, ``export_user``.

They are written in :mod:`storage.lifecycle_calls`, a core module, because transactions carry them too
(``tx.forget_guild``, ``tx.forget_user``, ``tx.export_user``, ``tx.prune_messages``), atomic with the rest of the
transaction, and transactions are built by the backends, which never import a feature.
"""

from __future__ import annotations

from .lifecycle_calls import EXPORT_FORMAT, LifecycleCalls, counts_of

__all__ = ["LifecycleMixin", "counts_of", "EXPORT_FORMAT"]


class LifecycleMixin(LifecycleCalls):
    """``forget_guild``, ``forget_user``, ``export_user`` on a store (see :mod:`storage.lifecycle_calls`)."""
