"""The batch fast path's output check over a whole batch (member_fast._batch_needs_a_look: ``null`` found with
``rfind``) gives exactly the answer of the per-output check (member_fast._needs_a_look, the compiled pattern), on
random JSON-like texts rich in the bytes both look for."""

from __future__ import annotations

import random

import orjson
import pytest

from storage.member_fast import _batch_needs_a_look, _needs_a_look

_TOKENS = [b"null", b"nul", b"ull", b"nu", b"l", b"n", b"u", b'"', b",", b":", b"{", b"}", b"[", b"]", b"\\",
           b"\\u0000", b"\\u000", b"u0000", b"+", b"1e+16", b".", b"-0.0", b"-0.", b"0.0", b"-0", b"x", b"nulll",
           b"nnull", b'"null"', b"language", b"roles"]


@pytest.mark.parametrize("seed", range(20))
def test_the_batch_check_answers_like_the_per_output_check(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        text = b"".join(rng.choice(_TOKENS) for _ in range(rng.randrange(0, 40)))
        assert _batch_needs_a_look(text) == _needs_a_look(text), text


@pytest.mark.parametrize(("value", "looked_at"), [
    (None, True), (float("nan"), True), (float("inf"), True), (-0.0, True), (1e300, True), ("a\x00b", True),
    ("nullable", True),  # a false alarm: the full rule then decides, and accepts it
    (1.5, False), ("plain", False)])
def test_a_batch_of_members_with_one_odd_value_is_looked_at(value: object, looked_at: bool) -> None:
    docs = [{"user_id": str(i), "preferences": {"language": "en"}} for i in range(300)]
    plain = orjson.dumps(docs)
    assert _batch_needs_a_look(plain) == _needs_a_look(plain) is False
    docs[150]["preferences"]["x"] = value
    odd = orjson.dumps(docs)
    assert _batch_needs_a_look(odd) == _needs_a_look(odd)
    assert _batch_needs_a_look(odd) is looked_at
