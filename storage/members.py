"""The seed's member calls as a feature of the public stores (:class:`MembersMixin`, mixed in by
:mod:`storage.stores`).

They are written in :mod:`storage.member_calls`, a core module, because transactions carry them too
(``tx.get_member_data``, ``tx.save_member_data``, ``tx.batch_update_members``) and transactions are built by the
backends, which never import a feature.
"""

from __future__ import annotations

from .member_calls import MEMBERS, MembersMixin, deep_merge

__all__ = ["MEMBERS", "MembersMixin", "deep_merge"]
