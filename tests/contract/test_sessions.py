"""Contract: creating, reading, updating and deleting sessions; versions and atomic changes."""

from __future__ import annotations

import re

import pytest

from sessionkeeper import (
    AlreadyExists,
    FrozenClock,
    InvalidInput,
    NotFound,
    SessionStore,
    VersionConflict,
)


async def test_create_generates_a_url_safe_id_with_128_bits_or_more(store: SessionStore) -> None:
    ids = {(await store.create_session()).id for _ in range(50)}
    assert len(ids) == 50
    for session_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", session_id)
        assert len(session_id) * 6 >= 128


async def test_create_with_client_id_and_every_field(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(
        session_id="chat:42.a-b_c",
        owner="user-1",
        title="Trip to Lisbon",
        status="active",
        step="draft",
        state={"draft": {"title": "Engineer"}, "n": 1},
        metadata={"source": "web"},
    )
    assert session.id == "chat:42.a-b_c"
    assert session.tenant == "default"
    assert session.owner == "user-1"
    assert session.title == "Trip to Lisbon"
    assert session.step == "draft"
    assert session.state == {"draft": {"title": "Engineer"}, "n": 1}
    assert session.metadata == {"source": "web"}
    assert session.version == 1
    assert session.created_at == session.updated_at
    assert session.created_at.timestamp() == clock.now()
    assert session.expires_at is None
    assert (session.message_count, session.input_tokens, session.output_tokens) == (0, 0, 0)
    assert session.cost == 0.0
    assert await store.get_session("chat:42.a-b_c") == session


async def test_create_with_a_taken_id_is_already_exists(store: SessionStore) -> None:
    await store.create_session(session_id="taken", state={"a": 1})
    with pytest.raises(AlreadyExists, match="taken"):
        await store.create_session(session_id="taken", state={"a": 2})
    assert (await store.get_session("taken")).state == {"a": 1}


async def test_get_of_a_missing_session_is_not_found(store: SessionStore) -> None:
    with pytest.raises(NotFound, match="nope"):
        await store.get_session("nope")


async def test_delete_removes_the_session_and_its_messages(store: SessionStore) -> None:
    session = await store.create_session(session_id="gone")
    await store.append_message(session.id, "user", "hello")
    await store.delete_session(session.id)
    with pytest.raises(NotFound):
        await store.get_session(session.id)
    with pytest.raises(NotFound):
        await store.read_messages(session.id)
    with pytest.raises(NotFound):
        await store.delete_session(session.id)
    again = await store.create_session(session_id="gone")
    assert again.message_count == 0
    assert await store.read_messages("gone") == []


async def test_delete_with_a_stale_version_changes_nothing(store: SessionStore) -> None:
    session = await store.create_session()
    await store.update_session(session.id, title="x")
    with pytest.raises(VersionConflict):
        await store.delete_session(session.id, expected_version=1)
    await store.get_session(session.id)
    await store.delete_session(session.id, expected_version=2)


async def test_update_fields_bumps_version_and_leaves_others(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(owner="o", title="t", step="s1", metadata={"k": 1})
    clock.advance(5)
    updated = await store.update_session(session.id, status="completed", step="s2")
    assert updated.version == 2
    assert updated.status == "completed"
    assert updated.step == "s2"
    assert (updated.title, updated.owner, updated.metadata) == ("t", "o", {"k": 1})
    assert updated.updated_at.timestamp() == clock.now()
    assert updated.created_at == session.created_at
    cleared = await store.update_session(session.id, step=None, owner=None, title="")
    assert (cleared.step, cleared.owner, cleared.title) == (None, None, "")
    assert cleared.version == 3


async def test_merge_patch_follows_rfc_7396(store: SessionStore) -> None:
    session = await store.create_session(
        state={"a": "b", "c": {"d": "e", "f": "g"}, "list": [1, 2], "keep": True}
    )
    patched = await store.update_state(
        session.id, {"a": "z", "c": {"f": None, "h": [1]}, "list": [3], "new": {"x": None}}
    )
    assert patched.state == {
        "a": "z",
        "c": {"d": "e", "h": [1]},
        "list": [3],
        "keep": True,
        "new": {},
    }
    assert patched.version == 2
    assert (await store.get_session(session.id)).state == patched.state


async def test_replace_state_drops_what_is_not_given(store: SessionStore) -> None:
    session = await store.create_session(state={"a": 1, "b": 2})
    replaced = await store.update_state(session.id, {"c": 3}, replace=True)
    assert replaced.state == {"c": 3}


async def test_stale_expected_version_raises_and_changes_nothing(store: SessionStore) -> None:
    session = await store.create_session(state={"n": 0})
    await store.update_state(session.id, {"n": 1}, expected_version=1)
    with pytest.raises(VersionConflict) as caught:
        await store.update_state(session.id, {"n": 99}, expected_version=1)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    with pytest.raises(VersionConflict):
        await store.update_session(session.id, title="lost", expected_version=1)
    with pytest.raises(VersionConflict):
        await store.append_message(session.id, "user", "lost", expected_version=1)
    now = await store.get_session(session.id)
    assert now.state == {"n": 1}
    assert now.title == ""
    assert now.version == 2
    assert await store.read_messages(session.id) == []


async def test_one_atomic_change_lands_whole(store: SessionStore) -> None:
    session = await store.create_session(state={"step": 0})
    result = await store.change_session(
        session.id,
        state_patch={"step": 1, "answer": "yes"},
        status="completed",
        step="done",
        messages=[
            {"role": "user", "content": "q", "input_tokens": 5},
            {"role": "assistant", "content": "a", "output_tokens": 7, "cost": 0.25},
        ],
        expected_version=1,
    )
    assert result.session.version == 2
    assert result.session.state == {"step": 1, "answer": "yes"}
    assert (result.session.status, result.session.step) == ("completed", "done")
    assert [m.seq for m in result.messages] == [1, 2]
    assert (result.session.message_count, result.session.input_tokens) == (2, 5)
    assert (result.session.output_tokens, result.session.cost) == (7, 0.25)
    assert await store.get_session(session.id) == result.session


async def test_a_failing_atomic_change_lands_not_at_all(store: SessionStore) -> None:
    session = await store.create_session(state={"step": 0})
    with pytest.raises(VersionConflict):
        await store.change_session(
            session.id,
            state_patch={"step": 1},
            status="completed",
            messages=[{"role": "user", "content": "q"}],
            expected_version=7,
        )
    with pytest.raises(InvalidInput, match=r"messages\[1\]\.role"):
        await store.change_session(
            session.id,
            state_patch={"step": 1},
            messages=[{"role": "user", "content": "q"}, {"role": 5, "content": "a"}],
        )
    with pytest.raises(NotFound, match="folder"):
        await store.change_session(
            session.id,
            state_patch={"step": 1},
            folder="no-such-folder",
            messages=[{"role": "user", "content": "q"}],
        )
    unchanged = await store.get_session(session.id)
    assert unchanged == session
    assert await store.read_messages(session.id) == []


async def test_merge_patch_that_grows_state_past_the_limit_changes_nothing(
    store: SessionStore,
) -> None:
    limit = store.settings.max_state_bytes
    session = await store.create_session(state={"a": "x" * (limit // 2)})
    with pytest.raises(InvalidInput, match="state"):
        await store.update_state(session.id, {"b": "y" * (limit // 2 + 10)})
    assert (await store.get_session(session.id)).version == 1
