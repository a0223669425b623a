"""Per-collection document rules: what a collection accepts, whatever call writes it.

A rule is applied in exactly one place, :meth:`storage.documents.OpsBase._encode_for`, which every write of the
public document API goes through (``put``, ``put_many``, ``update``'s result, the same calls in a transaction and
in a migration's context, ``save_member_data`` and ``batch_update_members``): no path can write a member that
``save_member_data`` would refuse. A rule checks and encodes ``(key, doc)`` into the bytes that are stored.

What a rule does *not* see: data that is already stored and is only being carried over as it is (a restore of a
backup, ``storage copy`` to another backend). A backup is an image of what was stored; an older version of the
library accepted members this rule refuses (a negative ``message_count`` put through ``put``), and refusing to
restore or copy them would make that backup useless exactly when it is needed. Those paths write with
:meth:`storage.documents.OpsBase._put_stored` instead; ``storage check`` is where such documents are reported.

A rule may have a fast path (:data:`FAST_RULES`; the members one is :mod:`storage.member_fast`) that batch writes
(``put_many``, ``batch_update_members``) run first over all their documents: it encodes the usual document and
declines anything else, which then goes through the rule itself. It never refuses: what is accepted or refused,
and with which message, is the rule's decision alone.

Rules live in :data:`RULES`, an immutable mapping from collection name to rule (no registration at run time:
which collection means what is part of the library's contract, like the ``members`` collection itself).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from .codec import encode_doc, shown
from .errors import ValidationError
from .member_fast import encode_member, encode_member_columns, encode_members, time_text
from .models import MEMBERS, check_member, snowflake

__all__ = ["Rule", "RULES", "FAST_RULES", "FAST_COLUMNS", "encode_for", "member_rule", "time_text"]

#: ``rule(key, doc, what) -> encoded bytes``; raises :class:`ValidationError` naming the field.
Rule = Callable[[str, Any, str], bytes]
#: ``fast(pairs) -> [encoded bytes | None]``: a rule's fast path over a batch of ``(key, doc)`` pairs, for the
#: usual document (its key included: it also passes :func:`storage.codec.check_key`); None means "run the rule",
#: never "invalid" (see storage.member_fast).
FastRule = Callable[[list[Any]], "list[bytes | None]"]
#: ``columns(keys, docs) -> [encoded bytes | None] | None``: the same over a batch given as its keys and documents
#: (a mapping's), None when it does not take the batch as a whole (then the pairs go to the FastRule).
FastColumns = Callable[[list[Any], list[Any]], "list[bytes | None] | None"]


def member_rule(key: str, doc: Any, what: str) -> bytes:
    """The seed's member shape (:func:`storage.models.check_member`) under a key ``"{guild_id}_{user_id}"`` of two
    canonical snowflakes; datetimes anywhere in the document are stored as canonical ISO text."""
    encoded = encode_member(key, doc)  # the usual member in a few calls (storage.member_fast), else the long way
    if encoded is not None:
        return encoded
    return member_rule_checked(key, doc, what)


def member_rule_checked(key: str, doc: Any, what: str) -> bytes:
    """:func:`member_rule` without its fast path: every check spelled out, and the error messages."""
    guild, sep, user = key.partition("_")
    try:
        if not sep:
            raise ValidationError("no '_'", field="key")
        canonical = f"{snowflake(guild, 'guild_id')}_{snowflake(user, 'user_id')}"
    except ValidationError:
        raise ValidationError(f"a members key must be '{{guild_id}}_{{user_id}}' (two Discord ids), got {shown(key)}",
                              field="key") from None
    if canonical != key:  # pragma: no cover - snowflake() accepts only canonical text from a str
        raise ValidationError(f"a members key must be canonical, got {shown(key)}", field="key")
    return encode_doc(check_member(doc, user, guild), what=what, default=time_text)


#: The rules by collection. Collections without one accept any JSON object.
RULES: Mapping[str, Rule] = MappingProxyType({MEMBERS: member_rule})
#: The rules' fast paths by collection (a collection may have a rule without one).
FAST_RULES: Mapping[str, FastRule] = MappingProxyType({MEMBERS: encode_members})
FAST_COLUMNS: Mapping[str, FastColumns] = MappingProxyType({MEMBERS: encode_member_columns})


def encode_for(collection: str, key: str, doc: Any, what: str = "document") -> bytes:
    """``doc`` checked by ``collection``'s rule and encoded (plain :func:`encode_doc` where there is no rule)."""
    rule = RULES.get(collection)
    if rule is None:
        return encode_doc(doc, what=what)
    return rule(key, doc, what)
