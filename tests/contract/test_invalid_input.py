"""Contract: bad input is an InvalidInput naming the field and the reason, and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from sessionkeeper import InvalidInput, SessionStore


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"d": value}
    return value


BAD_IDS = ["", "../etc/passwd", "a/b", ".hidden", "..", "x" * 129, "sp ace", "é", "a\x00b", 5]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
async def test_bad_session_ids_are_rejected_before_any_io(store: SessionStore, bad: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.create_session(session_id=bad)
    assert caught.value.field == "session_id"
    for call in (store.get_session(bad), store.read_messages(bad), store.delete_session(bad)):
        with pytest.raises(InvalidInput, match="session_id"):
            await call
    assert await store.count_sessions() == 0


async def test_the_longest_id_and_every_allowed_character_pass(store: SessionStore) -> None:
    longest = "a" * 128
    await store.create_session(session_id=longest)
    await store.create_session(session_id="Az09._:-x")
    assert await store.count_sessions() == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"state": [1, 2]}, "state"),
        ({"state": "text"}, "state"),
        ({"state": {"x": float("nan")}}, "state"),
        ({"state": {"x": object()}}, "state"),
        ({"state": {1: "non-string key"}}, "state"),
        ({"state": {"a": "\ud800"}}, "state"),
        ({"state": {"n": 2**64}}, "state"),
        ({"metadata": {"a": "lone \udfff surrogate"}}, "metadata"),
        ({"metadata": ["no"]}, "metadata"),
        ({"status": "deleted"}, "status"),
        ({"title": 7}, "title"),
        ({"title": "line\nbreak"}, "title"),
        ({"owner": ""}, "owner"),
        ({"owner": 12}, "owner"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": "10"}, "ttl"),
        ({"idle_ttl": 0}, "idle_ttl"),
        ({"folder": "../x"}, "folder"),
    ],
    ids=lambda v: repr(v)[:40],
)
async def test_bad_session_fields_name_the_field(
    store: SessionStore, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.create_session(**kwargs)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert await store.count_sessions() == 0


async def test_state_over_the_size_limit_or_too_deep(store: SessionStore) -> None:
    limits = store.settings
    with pytest.raises(InvalidInput, match="over the limit"):
        await store.create_session(state={"x": "y" * limits.max_state_bytes})
    with pytest.raises(InvalidInput, match="deeper than the limit"):
        await store.create_session(state=deep(limits.max_depth + 1))
    await store.create_session(state=deep(limits.max_depth))
    assert await store.count_sessions() == 1


async def test_bad_updates_change_nothing(store: SessionStore) -> None:
    session = await store.create_session(state={"a": 1})
    cases: list[tuple[Any, str]] = [
        (store.update_state(session.id, [1]), "patch"),  # type: ignore[arg-type]
        (store.update_state(session.id, [1], replace=True), "patch"),  # type: ignore[arg-type]
        (store.update_state(session.id, {"a": {"b": deep(40)}}), "state_patch"),
        (store.update_state(session.id, {"a": 1}, expected_version=0), "expected_version"),
        (store.update_state(session.id, {"a": 1}, expected_version=True), "expected_version"),
        (store.update_session(session.id, status="gone"), "status"),  # type: ignore[arg-type]
        (store.change_session(session.id, state={"a": 2}, state_patch={"a": 3}), "state"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidInput) as caught:
            await call
        assert caught.value.field == field
    assert await store.get_session(session.id) == session


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user", "content": "x", "colour": "red"}, "messages[0].colour"),
        ({"content": "x"}, "messages[0].role"),
        ({"role": "", "content": "x"}, "messages[0].role"),
        ({"role": "user", "content": "x", "input_tokens": -1}, "messages[0].input_tokens"),
        ({"role": "user", "content": "x", "input_tokens": "3"}, "messages[0].input_tokens"),
        ({"role": "user", "content": "x", "cost": float("inf")}, "messages[0].cost"),
        ({"role": "user", "content": {1, 2}}, "messages[0].content"),
        ({"role": "user", "content": "\ud83d"}, "messages[0].content"),
        ({"role": "user", "content": "x", "metadata": [1]}, "messages[0].metadata"),
        ("just text", "messages[0]"),
    ],
    ids=lambda v: repr(v)[:40],
)
async def test_bad_messages_name_the_field_and_append_nothing(
    store: SessionStore, message: Any, field: str
) -> None:
    session = await store.create_session()
    with pytest.raises(InvalidInput) as caught:
        await store.append_messages(session.id, [message])
    assert caught.value.field == field
    good = {"role": "user", "content": "fine"}
    with pytest.raises(InvalidInput):
        await store.append_messages(session.id, [good, message])
    assert await store.read_messages(session.id) == []
    assert (await store.get_session(session.id)).version == 1


async def test_message_size_and_count_limits(store: SessionStore) -> None:
    session = await store.create_session()
    limit = store.settings.max_message_bytes
    with pytest.raises(InvalidInput, match=r"content: is .* over the limit"):
        await store.append_message(session.id, "user", "x" * limit)
    with pytest.raises(InvalidInput, match="metadata"):
        await store.append_message(
            session.id, "user", "x" * (limit // 2), metadata={"m": "y" * (limit // 2)}
        )
    too_many = [{"role": "user", "content": "x"}] * (store.settings.max_messages_per_append + 1)
    with pytest.raises(InvalidInput, match="messages: has"):
        await store.append_messages(session.id, too_many)
    with pytest.raises(InvalidInput, match="messages"):
        await store.append_messages(session.id, [])
    with pytest.raises(InvalidInput, match="messages"):
        await store.append_messages(session.id, "not a list")  # type: ignore[arg-type]
    assert await store.read_messages(session.id) == []


async def test_bad_query_input(store: SessionStore) -> None:
    from datetime import datetime

    cases: list[tuple[Any, str]] = [
        (store.list_sessions(limit=0), "limit"),
        (store.list_sessions(limit=10**6), "limit"),
        (store.list_sessions(order_by="title"), "order_by"),  # type: ignore[arg-type]
        (store.list_sessions(status="nope"), "status"),  # type: ignore[arg-type]
        (store.list_sessions(created_since=datetime(2024, 1, 1)), "created_since"),
        (store.count_sessions(updated_before="yesterday"), "updated_before"),  # type: ignore[arg-type]
        (store.read_messages("s", after_seq=-1), "after_seq"),
        (store.last_messages("s", 0), "n"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidInput) as caught:
            await call
        assert caught.value.field == field


async def test_limits_are_configurable(engine_url: str, clock: Any) -> None:
    from sessionkeeper import Settings, open_store

    settings = Settings(url=engine_url, max_state_bytes=64, max_depth=3)
    async with open_store(engine_url, settings=settings, clock=clock) as small:
        with pytest.raises(InvalidInput, match="limit of 64"):
            await small.create_session(state={"x": "y" * 100})
        with pytest.raises(InvalidInput, match="limit of 3"):
            await small.create_session(state=deep(4))
