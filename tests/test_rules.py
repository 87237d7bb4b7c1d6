"""Pure rules: merge patch (RFC 7396 appendix A), ids, JSON limits, TTL arithmetic, cursors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionkeeper import InvalidInput
from sessionkeeper.models import SessionQuery, SessionRecord
from sessionkeeper.rules import (
    ID_PATTERN,
    check_id,
    decode_cursor,
    encode_cursor,
    encode_json,
    initial_expiry,
    merge_patch,
    new_id,
    renewed_expiry,
)

# RFC 7396, appendix A: (target, patch, result)
RFC_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_EXAMPLES)
def test_merge_patch_matches_rfc_7396(target: Any, patch: Any, result: Any) -> None:
    before = json.dumps(target)
    assert merge_patch(target, patch) == result
    assert json.dumps(target) == before  # the target is not modified


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=3), json_values, max_size=4), json_values)
def test_merge_patch_is_idempotent(target: dict[str, Any], patch: Any) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


def test_new_ids_match_the_pattern_and_carry_144_bits() -> None:
    for _ in range(100):
        value = new_id()
        assert ID_PATTERN.fullmatch(value)
        assert len(value) == 24


def test_check_id_names_the_field() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_id("../x", "tenant")
    assert caught.value.field == "tenant"


def test_encode_json_counts_utf8_bytes() -> None:
    assert encode_json({"a": "é"}, "f", 100, 5) == '{"a":"é"}'
    with pytest.raises(InvalidInput, match="12 bytes"):
        encode_json({"a": "éé"}, "f", 9, 5)


def test_expiry_arithmetic() -> None:
    assert initial_expiry(100.0, None, None, None) == (None, None)
    assert initial_expiry(100.0, 50.0, None, None) == (150.0, 150.0)
    assert initial_expiry(100.0, None, 10.0, None) == (110.0, None)
    assert initial_expiry(100.0, 50.0, 10.0, None) == (110.0, 150.0)
    assert initial_expiry(100.0, None, None, 30.0) == (130.0, 130.0)
    assert initial_expiry(100.0, 50.0, None, 30.0) == (130.0, 130.0)
    assert renewed_expiry(110.0, 10.0, 150.0, 105.0) == 115.0
    assert renewed_expiry(110.0, 10.0, 150.0, 145.0) == 150.0
    assert renewed_expiry(110.0, None, None, 105.0) == 110.0


def test_cursor_round_trip() -> None:
    record = SessionRecord(
        tenant="t",
        id="abc",
        owner=None,
        folder=None,
        title="",
        status="active",
        step=None,
        metadata="{}",
        state=None,
        version=1,
        created_at=12.5,
        updated_at=99.25,
        expires_at=None,
        idle_ttl=None,
        deadline=None,
    )
    query = SessionQuery(order_by="updated_at", descending=False)
    assert decode_cursor(encode_cursor(query, record), "updated_at", False) == (99.25, "abc")
    with pytest.raises(InvalidInput, match="another ordering"):
        decode_cursor(encode_cursor(query, record), "updated_at", True)
