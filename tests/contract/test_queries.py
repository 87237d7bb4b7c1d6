"""Contract: listing, filtering, ordering, cursor paging, counting and statistics."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sessionkeeper import FrozenClock, InvalidInput, SessionStore


def at(clock: FrozenClock) -> datetime:
    return datetime.fromtimestamp(clock.now(), UTC)


async def make(store: SessionStore, clock: FrozenClock) -> dict[str, str]:
    """Six sessions a second apart: two owners, three statuses, varied titles."""
    ids = {}
    for name, owner, status, title in [
        ("s1", "ann", "active", "Plan a trip"),
        ("s2", "bob", "completed", "Job post: Engineer"),
        ("s3", "ann", "completed", "TRIP report"),
        ("s4", "ann", "archived", "Groceries"),
        ("s5", None, "active", "anonymous chat"),
        ("s6", "bob", "active", "Another trip idea"),
    ]:
        session = await store.create_session(session_id=name, owner=owner, title=title)
        if status != "active":
            await store.update_session(name, status=status)  # type: ignore[arg-type]
        ids[name] = session.id
        clock.advance(1)
    return ids


async def test_list_filters_by_owner_status_and_title(
    store: SessionStore, clock: FrozenClock
) -> None:
    await make(store, clock)
    page = await store.list_sessions(owner="ann")
    assert [s.id for s in page.items] == ["s4", "s3", "s1"]
    assert page.next_cursor is None
    assert [s.id for s in (await store.list_sessions(owner=None)).items] == ["s5"]
    assert [s.id for s in (await store.list_sessions(status="completed")).items] == ["s3", "s2"]
    assert [s.id for s in (await store.list_sessions(owner="ann", status="completed")).items] == [
        "s3"
    ]
    titled = await store.list_sessions(title_contains="trip", descending=False)
    assert [s.id for s in titled.items] == ["s1", "s3", "s6"]
    assert await store.count_sessions(title_contains="TRIP") == 3
    assert await store.count_sessions() == 6
    assert await store.count_sessions(owner="bob", status="active") == 1


async def test_listing_carries_no_state(store: SessionStore, clock: FrozenClock) -> None:
    await store.create_session(state={"big": "x" * 1000})
    (summary,) = (await store.list_sessions()).items
    assert not hasattr(summary, "state")


async def test_time_ranges_include_since_and_exclude_before(
    store: SessionStore, clock: FrozenClock
) -> None:
    start = at(clock)
    await make(store, clock)
    since = datetime.fromtimestamp(start.timestamp() + 2, UTC)
    before = datetime.fromtimestamp(start.timestamp() + 4, UTC)
    page = await store.list_sessions(created_since=since, created_before=before)
    assert [s.id for s in page.items] == ["s4", "s3"]
    clock.advance(100)
    await store.update_session("s1", title="touched")
    recent = await store.list_sessions(updated_since=at(clock))
    assert [s.id for s in recent.items] == ["s1"]
    assert await store.count_sessions(updated_before=at(clock)) == 5


async def test_order_by_updated(store: SessionStore, clock: FrozenClock) -> None:
    await make(store, clock)
    await store.update_session("s2", step="x")
    page = await store.list_sessions(order_by="updated_at")
    assert [s.id for s in page.items][:2] == ["s2", "s6"]
    page = await store.list_sessions(order_by="updated_at", descending=False)
    assert [s.id for s in page.items][-1] == "s2"


@pytest.mark.parametrize("descending", [True, False])
async def test_cursor_pages_stay_stable_while_sessions_are_added(
    store: SessionStore, clock: FrozenClock, descending: bool
) -> None:
    for i in range(10):
        await store.create_session(session_id=f"p{i:02d}")
        if i % 3:  # some share a creation time: the id breaks the tie
            clock.advance(1)
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_sessions(limit=3, cursor=cursor, descending=descending)
        seen += [s.id for s in page.items]
        await store.create_session(session_id=f"new{len(seen)}")  # arrives mid-listing
        clock.advance(1)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    originals = [s for s in seen if s.startswith("p")]
    assert sorted(originals) == [f"p{i:02d}" for i in range(10)]
    assert len(seen) == len(set(seen))


async def test_a_cursor_from_another_ordering_or_garbage_is_invalid(
    store: SessionStore, clock: FrozenClock
) -> None:
    await make(store, clock)
    page = await store.list_sessions(limit=2)
    assert page.next_cursor is not None
    with pytest.raises(InvalidInput, match="cursor"):
        await store.list_sessions(limit=2, cursor=page.next_cursor, order_by="updated_at")
    with pytest.raises(InvalidInput, match="cursor"):
        await store.list_sessions(cursor="not-a-cursor!")


async def test_stats(store: SessionStore, clock: FrozenClock) -> None:
    await make(store, clock)
    await store.append_message("s1", "user", "hi", input_tokens=3, output_tokens=1, cost=0.5)
    clock.advance(2 * 86_400)
    await store.update_session("s6", step="later")
    stats = await store.stats(top=2)
    assert (stats.total, stats.active, stats.completed, stats.archived) == (6, 3, 2, 1)
    assert stats.recently_active == 1
    assert stats.completion_rate == pytest.approx(2 / 6)
    assert (stats.messages, stats.input_tokens, stats.output_tokens) == (1, 3, 1)
    assert stats.cost == pytest.approx(0.5)
    assert [(o.owner, o.sessions) for o in stats.top_owners] == [("ann", 3), ("bob", 2)]
    # by cost, ties by owner with none first
    assert [(o.owner, o.cost) for o in stats.top_owners_by_cost] == [("ann", 0.5), (None, 0.0)]
    assert stats.active_hours == 24.0
    wider = await store.stats(active_hours=72)  # the others were made two days ago
    assert (wider.recently_active, wider.active_hours) == (6, 72.0)
    clock.advance(3_600)
    assert (await store.stats(active_hours=0.5)).recently_active == 0
    for bad in (0, -1, 24 * 367, "24", True, float("nan")):
        with pytest.raises(InvalidInput, match="active_hours"):
            await store.stats(active_hours=bad)  # type: ignore[arg-type]


async def test_stats_of_an_empty_tenant(store: SessionStore) -> None:
    stats = await store.stats()
    assert (stats.total, stats.completion_rate, stats.top_owners) == (0, 0.0, [])
    assert stats.top_owners_by_cost == []


async def test_stats_follow_every_write_and_leave_out_expired_sessions_at_once(
    store: SessionStore, clock: FrozenClock
) -> None:
    """Creates, appends, pops, clears, owner and status moves, deletes, and sessions that
    expire before purge removes them: the figures are those of the live sessions."""
    for name, owner in [("a", "ann"), ("b", "bob"), ("c", "bob"), ("d", None)]:
        await store.create_session(session_id=name, owner=owner)
    await store.create_session(session_id="e", owner="eve", ttl=10)
    await store.append_message("a", "user", "1", input_tokens=1, cost=0.25)
    await store.append_message("a", "user", "2", output_tokens=2, cost=0.5)
    await store.append_message("b", "user", "3", input_tokens=4, cost=2.0)
    await store.append_message("c", "user", "4", cost=1.0)
    await store.append_message("e", "user", "5", input_tokens=100, cost=50.0)
    await store.pop_message("a")  # a: 1 message, 1 input token, 0.25
    await store.update_session("c", owner="ann", status="completed")
    await store.append_message("d", "user", "6", output_tokens=8, cost=0.125)
    await store.clear_messages("d")
    await store.create_session(session_id="f", owner="bob")
    await store.delete_session("f")

    stats = await store.stats(top=3)
    assert (stats.total, stats.active, stats.completed) == (5, 4, 1)
    assert (stats.messages, stats.input_tokens, stats.output_tokens) == (4, 105, 0)
    assert stats.cost == pytest.approx(53.25)
    assert [(o.owner, o.sessions) for o in stats.top_owners] == [
        ("ann", 2),
        (None, 1),
        ("bob", 1),
    ]
    assert [o.owner for o in stats.top_owners_by_cost] == ["eve", "bob", "ann"]

    clock.advance(11)  # e expires; nothing has purged it
    stats = await store.stats(top=3)
    assert (stats.total, stats.active, stats.completed, stats.archived) == (4, 3, 1, 0)
    assert (stats.messages, stats.input_tokens, stats.output_tokens) == (3, 5, 0)
    assert stats.cost == pytest.approx(3.25)
    assert stats.completion_rate == pytest.approx(1 / 4)
    assert [(o.owner, o.sessions) for o in stats.top_owners] == [
        ("ann", 2),
        (None, 1),
        ("bob", 1),
    ]
    assert [(o.owner, o.cost) for o in stats.top_owners_by_cost] == [
        ("bob", pytest.approx(2.0)),
        ("ann", pytest.approx(1.25)),
        (None, 0.0),
    ]
    await store.purge_expired()
    assert await store.stats(top=3) == stats
