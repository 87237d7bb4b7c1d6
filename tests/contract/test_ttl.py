"""Contract: absolute and idle expiry, read as absence at once, and purge."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sessionkeeper import FrozenClock, NotFound, SessionStore


async def test_absolute_ttl_expires_at_once_and_is_not_renewed(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(ttl=timedelta(minutes=10))
    assert session.expires_at is not None
    assert session.expires_at.timestamp() == clock.now() + 600
    clock.advance(599)
    await store.append_message(session.id, "user", "still here")
    await store.get_session(session.id)
    clock.advance(1)
    with pytest.raises(NotFound):
        await store.get_session(session.id)
    with pytest.raises(NotFound):
        await store.read_messages(session.id)
    with pytest.raises(NotFound):
        await store.update_state(session.id, {"a": 1})
    assert await store.count_sessions() == 0
    assert (await store.list_sessions()).items == []


async def test_idle_ttl_is_renewed_by_reads_and_writes(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(idle_ttl=60)
    for _ in range(3):
        clock.advance(59)
        await store.get_session(session.id)
    clock.advance(59)
    await store.last_messages(session.id)
    clock.advance(59)
    await store.read_messages(session.id)
    clock.advance(59)
    await store.append_message(session.id, "user", "hi")
    clock.advance(59)
    renewed = await store.update_session(session.id, step="x")
    assert renewed.expires_at is not None
    assert renewed.expires_at.timestamp() == clock.now() + 60
    clock.advance(60)
    with pytest.raises(NotFound):
        await store.get_session(session.id)


async def test_listing_does_not_renew(store: SessionStore, clock: FrozenClock) -> None:
    session = await store.create_session(idle_ttl=60)
    clock.advance(59)
    await store.list_sessions()
    await store.count_sessions()
    clock.advance(1)
    with pytest.raises(NotFound):
        await store.get_session(session.id)


async def test_idle_renewal_is_capped_by_the_absolute_ttl(
    store: SessionStore, clock: FrozenClock
) -> None:
    session = await store.create_session(idle_ttl=60, ttl=100)
    assert session.expires_at is not None
    assert session.expires_at.timestamp() == clock.now() + 60
    clock.advance(50)
    touched = await store.get_session(session.id)
    assert touched.expires_at is not None
    assert touched.expires_at.timestamp() == clock.now() + 50
    clock.advance(50)
    with pytest.raises(NotFound):
        await store.get_session(session.id)


async def test_an_expired_id_can_be_created_again_empty(
    store: SessionStore, clock: FrozenClock
) -> None:
    await store.create_session(session_id="reuse", ttl=1, state={"old": True})
    await store.append_message("reuse", "user", "old")
    clock.advance(1)
    fresh = await store.create_session(session_id="reuse", state={"new": True})
    assert (fresh.state, fresh.message_count, fresh.version) == ({"new": True}, 0, 1)
    assert await store.read_messages("reuse") == []
    assert (await store.append_message("reuse", "user", "new")).seq == 1


async def test_purge_removes_expired_sessions_in_batches(
    store: SessionStore, clock: FrozenClock
) -> None:
    for i in range(7):
        session = await store.create_session(ttl=10)
        await store.append_message(session.id, "user", f"m{i}")
    keeper = await store.create_session()
    await store.create_session(ttl=1000)
    assert await store.purge_expired() == 0
    clock.advance(10)
    assert await store.purge_expired(batch_size=3) == 7
    assert await store.purge_expired() == 0
    assert await store.count_sessions() == 2
    await store.get_session(keeper.id)
