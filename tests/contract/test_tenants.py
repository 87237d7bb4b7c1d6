"""Contract: a tenant sees nothing of another tenant, through every call."""

from __future__ import annotations

import pytest

from sessionkeeper import FrozenClock, NotFound, SessionStore


async def test_a_session_of_tenant_a_is_invisible_to_tenant_b(
    store: SessionStore, clock: FrozenClock
) -> None:
    a = store.for_tenant("tenant-a")
    b = store.for_tenant("tenant-b")
    folder = await a.create_folder("Work", owner="ann")
    session = await a.create_session(session_id="shared-id", owner="ann", folder=folder.id)
    await a.append_message(session.id, "user", "secret")

    calls = [
        b.get_session(session.id),
        b.read_messages(session.id),
        b.last_messages(session.id),
        b.append_message(session.id, "user", "x"),
        b.update_state(session.id, {"x": 1}),
        b.update_session(session.id, title="x"),
        b.pop_message(session.id),
        b.clear_messages(session.id),
        b.delete_session(session.id),
        b.get_folder(folder.id),
        b.rename_folder(folder.id, "x"),
        b.delete_folder(folder.id),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            await call
    with pytest.raises(NotFound, match="folder"):
        await b.create_session(owner="ann", folder=folder.id)
    assert (await b.list_sessions()).items == []
    assert await b.count_sessions(owner="ann") == 0
    assert await b.list_folders() == []
    assert (await b.stats()).total == 0

    # the same id and folder name are free in tenant b, and stay apart
    mine = await b.create_session(session_id="shared-id", state={"b": True})
    await b.create_folder("Work", owner="ann")
    assert mine.tenant == "tenant-b"
    original = await a.get_session(session.id)
    assert (original.tenant, original.state, original.message_count) == ("tenant-a", {}, 1)

    clock.advance(1)
    await b.create_session(session_id="short", ttl=1)
    await a.create_session(session_id="short", ttl=1)
    clock.advance(1)
    assert await b.purge_expired() == 1
    assert await a.purge_expired() == 1


async def test_the_default_tenant_is_a_tenant_like_any_other(store: SessionStore) -> None:
    await store.create_session(session_id="d")
    with pytest.raises(NotFound):
        await store.for_tenant("other").get_session("d")
    assert store.tenant == "default"
