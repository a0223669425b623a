"""The ingest fast path (``storage.messages.records.usual_fields``) agrees with the full checks on every input.

``usual_fields`` re-implements, inline and for speed, what ``validate_message`` + ``_check_rest`` decide for the usual
record, and answers None for anything else (the full checks then decide and name the error). That is only safe
if it never accepts something the full checks refuse or would normalize differently: these tests feed both
thousands of records mutated one field at a time, near the canonical forms, and require that whenever the fast
path accepts, the full path accepts too and returns the same record. They also pin down that the usual record
does take the fast path (otherwise ingest silently gets twice as slow).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from storage import ValidationError
from storage.backends.postgres.ingest import RowEncoder
from storage.messages.records import _check_rest, _record_of, normalize_messages, usual_fields
from storage.models import validate_message


def _usual(record: Any, known: set[str]) -> dict[str, Any] | None:
    """The normalized record the fast path makes of ``record`` (as the generic ingest does); None if it declines."""
    fields = usual_fields(record, known)
    return None if fields is None else _record_of(fields)


BASE: dict[str, Any] = {
    "message_id": "1364752701849600003",
    "channel_id": "900000000000010304",
    "author_id": "900000000001031231",
    "guild_id": "900000000000000003",
    "timestamp": "2025-04-24T13:45:12Z",
    "content_length": 346,
    "attachments": 1,
    "reactions": 4,
    "analysis": {"topics": ["music", "art"], "sentiment": "neutral"},
}
CHARS = "0123456789-:T.Z +,zt\u0661\uff11a\x00/"
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**63, 2**64, 1.0, "", "0", "00", "12", "١٢", b"12", [], {},
                         ["x"], {"a": 1}, "x\x00", "\ud800", "é"]


def full(record: Any) -> dict[str, Any] | None:
    """What the reference path makes of a record (None: it refuses it)."""
    try:
        out = validate_message(record)
        return _check_rest(out, None, set())
    except (ValidationError, OverflowError):
        return None


def mutate_text(text: str, rnd: random.Random) -> str:
    chars = list(text)
    for _ in range(rnd.randint(1, 2)):
        action = rnd.random()
        pos = rnd.randrange(len(chars) + 1)
        if action < 0.6 and pos < len(chars):
            chars[pos] = rnd.choice(CHARS)
        elif action < 0.8:
            chars.insert(pos, rnd.choice(CHARS))
        elif chars:
            del chars[min(pos, len(chars) - 1)]
    return "".join(chars)


def variants(rnd: random.Random) -> dict[str, Any]:
    record = {**BASE, "analysis": {**BASE["analysis"]}}
    field = rnd.choice([*BASE, "analysis.sentiment", "analysis.topics", "extra", "missing"])
    roll = rnd.random()
    if field == "missing":
        del record[rnd.choice(list(BASE))]
    elif field == "extra":
        record[rnd.choice(["note", "guild", "Message_id"])] = rnd.choice(ODD_VALUES)
    elif field == "analysis.sentiment":
        record["analysis"]["sentiment"] = rnd.choice(ODD_VALUES) if roll < 0.5 else mutate_text("neutral", rnd)
    elif field == "analysis.topics":
        topics = rnd.choice([[], ["a", "a"], [rnd.choice(ODD_VALUES)], "music", None, ("music",),
                             [mutate_text("music", rnd)], [["music"]]])
        record["analysis"]["topics"] = topics
    elif field == "analysis":
        record["analysis"] = rnd.choice([None, {}, [], "x", {"sentiment": None}, {"topics": None},
                                         {"score": 1.5}, {"sentiment": "ok", "other": 1}])
    elif field == "timestamp":
        base = rnd.choice(["2025-04-24T13:45:12Z", "2025-04-24T13:45:12.123456Z", "2024-02-29T23:59:59.999999Z",
                           "2025-04-24T13:45:12.000000Z", "0999-01-01T00:00:00Z"])
        record["timestamp"] = base if roll < 0.1 else mutate_text(base, rnd) if roll < 0.9 else rnd.choice(ODD_VALUES)
    elif field in ("content_length", "attachments", "reactions"):
        record[field] = rnd.choice([*ODD_VALUES, 2**64 - 1, 2**63 - 1, 10**30])
    elif roll < 0.6:
        record[field] = mutate_text(BASE[field], rnd)
    else:
        record[field] = rnd.choice([*ODD_VALUES, int(BASE[field]), str(2**64 - 1), "1" * 19, "1" * 20, "1" * 21])
    return record


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_accepts_only_what_the_full_checks_accept_identically(seed: int) -> None:
    rnd = random.Random(seed)
    fast_accepted = full_accepted = 0
    for _ in range(5000):
        record = variants(rnd)
        expected = full(record)
        got = _usual(record, set())
        full_accepted += expected is not None
        if got is None:
            continue
        fast_accepted += 1
        assert expected is not None, f"the fast path accepted a record the full checks refuse: {record!r}"
        assert got == expected, record
        assert next(iter(got)) == "message_id"
    # the mutations are near misses: a good share of them are valid, and most valid ones are taken fast
    assert full_accepted > 1000 and fast_accepted > full_accepted // 2, (fast_accepted, full_accepted)


def test_the_usual_record_takes_the_fast_path() -> None:
    assert _usual(BASE, set()) == full(BASE)
    for ts in ("2025-04-24T13:45:12Z", "2025-04-24T13:45:12.5Z".replace(".5", ".500000"), "0001-01-01T00:00:00Z"):
        assert _usual({**BASE, "timestamp": ts}, set()) is not None, ts
    without_optionals = {k: v for k, v in BASE.items() if k not in ("attachments", "reactions", "analysis")}
    assert _usual(without_optionals, set()) == full(without_optionals)


def test_fast_path_keeps_first_of_duplicates_and_names_the_bad_index() -> None:
    records = [BASE, {**BASE, "reactions": 9}, {**BASE, "message_id": "5"}]
    assert [r["reactions"] for r in normalize_messages(records)] == [4, 4]
    with pytest.raises(ValidationError, match="record #2: timestamp"):
        normalize_messages([BASE, {**BASE, "message_id": "6"},
                            {**BASE, "message_id": "7", "timestamp": "2025-02-30T00:00:00Z"}])


def outcome(encode: Any, value: Any) -> Any:
    try:
        return encode(value)
    except ValidationError as exc:
        return "refused", exc.field


@pytest.mark.parametrize("seed", range(2))
def test_postgres_rows_of_the_fast_fields_equal_those_of_the_normalized_record(seed: int) -> None:
    """pg_ingest encodes the usual record from its checked fields, never making the normalized dict: the bytes
    must be those the general encoding gives for the normalized record (ids, time, counters, typed columns)."""
    rnd = random.Random(100 + seed)
    compared = 0
    for _ in range(3000):
        record = variants(rnd)
        if rnd.random() < 0.3:  # times across the calendar, ids across the signed range
            record["timestamp"] = f"{rnd.randint(1, 9999):04d}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}T" \
                                  f"{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}" + \
                                  rnd.choice(["Z", f".{rnd.randint(1, 999999):06d}Z"])
            record["message_id"] = str(rnd.randint(1, 2**63 - 1))
        fields = usual_fields(record, set())
        if fields is None:
            continue
        expected = full(record)
        assert expected is not None
        for reactions in (expected["reactions"], 2**63 - 1, 2**63):  # around the largest a bigint holds
            expected["reactions"] = reactions
            fields = (*fields[:7], reactions, *fields[8:])
            assert outcome(RowEncoder().usual, fields) == outcome(RowEncoder().record, expected), record
        compared += 1
    assert compared > 500


def test_a_counter_beyond_bigint_is_refused_by_name_on_the_fast_path_too() -> None:
    fields = usual_fields({**BASE, "attachments": 2**63}, set())
    assert fields is not None  # fine for the JSON backend: it fits in 64 unsigned bits
    with pytest.raises(ValidationError) as info:
        RowEncoder().usual(fields)
    assert info.value.field == "attachments"
