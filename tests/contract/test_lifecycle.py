"""Contract: change hooks, the per-owner session limit, archive, restore, purge by age and
the sweeper, on every engine, with time from a frozen clock."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

from sessionkeeper import (
    AlreadyExists,
    FrozenClock,
    InvalidInput,
    NotFound,
    SessionEvent,
    SessionStore,
    Settings,
    VersionConflict,
    open_store,
)
from sessionkeeper.maintenance import Sweeper, archive, purge, restore
from tests.contract.test_concurrency import SHARED_PARAMS, START, START_TIMEOUT, run_processes

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

DAY = 86_400.0
LIMIT = 5


def record_events(store: SessionStore) -> list[tuple[str, str, str]]:
    """(event, tenant, session id) of every hook call of ``store``, in order."""
    seen: list[tuple[str, str, str]] = []
    for event in ("created", "completed", "expired", "deleted"):
        store.on(event, lambda e: seen.append((e.event, e.tenant, e.session_id)))
    return seen


@pytest.fixture
async def archive_store(
    url_factory: Callable[[], str], clock: FrozenClock
) -> AsyncIterator[SessionStore]:
    """A second store of the same engine, in a namespace of its own: the archive."""
    url = url_factory()
    async with open_store(url, settings=Settings(url=url), clock=clock) as opened:
        yield opened


async def two_stores(store: SessionStore, **settings: Any) -> list[SessionStore]:
    """Two stores with hooks of their own over the engine of ``store`` (processes race in
    test_completions_and_creates_from_processes_stay_exact)."""
    config = Settings(url="memory://", **settings)
    return [
        await SessionStore(store.engine, settings=config, clock=store.clock).open()
        for _ in range(2)
    ]


# --- change hooks ------------------------------------------------------------------------


async def test_hooks_fire_once_after_each_write_that_landed(store: SessionStore) -> None:
    seen = record_events(store)
    awaited: list[str] = []

    async def on_completed(event: SessionEvent) -> None:
        await asyncio.sleep(0)
        assert event.session is not None
        awaited.append(f"{event.session.status} v{event.session.version}")

    store.on("completed", on_completed)
    session = await store.create_session(session_id="s1", owner="alice")
    with pytest.raises(AlreadyExists):
        await store.create_session(session_id="s1")
    await store.update_session("s1", status="completed")
    await store.update_session("s1", status="completed")  # already completed: no event
    with pytest.raises(VersionConflict):
        await store.update_session("s1", status="active", expected_version=session.version)
    await store.update_session("s1", status="active")
    result = await store.change_session(
        "s1", status="completed", messages=[{"role": "user", "content": "done"}]
    )
    assert result.session.message_count == 1
    await store.delete_session("s1")
    with pytest.raises(NotFound):
        await store.delete_session("s1")
    assert seen == [
        ("created", "default", "s1"),
        ("completed", "default", "s1"),
        ("completed", "default", "s1"),
        ("deleted", "default", "s1"),
    ]
    assert awaited == ["completed v2", "completed v5"]


async def test_hooks_see_every_tenant_view_and_can_be_removed(store: SessionStore) -> None:
    seen: list[tuple[str, str]] = []
    remove = store.on("created", lambda e: seen.append((e.tenant, e.session_id)))
    other = store.for_tenant("acme")
    await other.create_session(session_id="a1")
    await store.create_session(session_id="d1")
    remove()
    remove()  # twice is harmless
    await store.create_session(session_id="d2")
    assert seen == [("acme", "a1"), ("default", "d1")]
    with pytest.raises(InvalidInput) as bad:
        store.on("finished", print)  # type: ignore[arg-type]
    assert bad.value.field == "event"


async def test_a_failing_hook_is_logged_and_the_write_stands(
    store: SessionStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: SessionEvent) -> None:
        raise RuntimeError("hook bug")

    after: list[str] = []
    store.on("created", broken)
    store.on("created", lambda e: after.append(e.session_id))
    session = await store.create_session(session_id="s1")
    assert (await store.get_session("s1")).version == session.version
    assert after == ["s1"]  # later hooks still run
    assert "'created' hook failed for session 's1'" in caplog.text
    assert "hook bug" in caplog.text


async def test_concurrent_completions_fire_exactly_once(store: SessionStore) -> None:
    stores = await two_stores(store)
    completions: list[int] = []
    for each in stores:
        each.on("completed", lambda e: completions.append(e.session.version))  # type: ignore[union-attr]
    session = await stores[0].create_session(session_id="s1")
    for round_ in range(3):
        writes = [
            stores[i % 2].update_session("s1", status="completed", title=f"t{i}") for i in range(8)
        ]
        await asyncio.gather(*writes)
        assert len(completions) == round_ + 1
        await stores[0].update_session("s1", status="active")
    # with expected_version, exactly one of the racers wins, and fires
    current = (await stores[0].get_session("s1")).version
    racers = [
        stores[i % 2].update_session("s1", status="completed", expected_version=current)
        for i in range(6)
    ]
    outcomes = await asyncio.gather(*racers, return_exceptions=True)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, VersionConflict) for o in outcomes if isinstance(o, Exception))
    assert len(completions) == 4
    final = await stores[0].get_session("s1")
    assert final.version == session.version + 3 * 8 + 3 + 1


# --- the limit of sessions per owner -----------------------------------------------------


async def test_an_owner_at_the_limit_cannot_create_more(
    store: SessionStore, engine_url: str, clock: FrozenClock
) -> None:
    settings = Settings(url=engine_url, max_sessions_per_owner=3)
    limited = SessionStore(store.engine, settings=settings, clock=clock)
    await limited.open()
    await limited.create_session(session_id="short", owner="alice", ttl=60)
    for _ in range(2):
        await limited.create_session(owner="alice")
    with pytest.raises(InvalidInput) as refused:
        await limited.create_session(owner="alice")
    assert refused.value.field == "owner"
    assert "max_sessions_per_owner allows 3" in refused.value.reason
    assert await limited.count_sessions(owner="alice") == 3
    await limited.create_session(owner="bob")  # other owners, and no owner, are not limited
    for _ in range(4):
        await limited.create_session()
    clock.advance(60)  # an expired session does not count
    await limited.create_session(owner="alice")
    with pytest.raises(InvalidInput):
        await limited.create_session(owner="alice")
    await limited.for_tenant("acme").create_session(owner="alice")  # per tenant


async def test_concurrent_creates_never_pass_the_limit(store: SessionStore) -> None:
    stores = await two_stores(store, max_sessions_per_owner=4)
    creates = [stores[i % 2].create_session(owner="alice") for i in range(16)]
    outcomes = await asyncio.gather(*creates, return_exceptions=True)
    made = [o for o in outcomes if not isinstance(o, BaseException)]
    assert all(isinstance(o, InvalidInput) for o in outcomes if isinstance(o, Exception))
    assert 1 <= len(made) <= 4
    assert await stores[0].count_sessions(owner="alice") == len(made)
    # the reservations of the refused creates are gone: the rest of the room is free
    for _ in range(4 - len(made)):
        await stores[0].create_session(owner="alice")
    with pytest.raises(InvalidInput):
        await stores[1].create_session(owner="alice")


async def race_in_child(url: str, start: Barrier) -> tuple[int, int]:
    """One racing process: complete s1 four times and create four sessions of alice, with
    its own store and hooks. Returns (completions it fired, sessions it created)."""
    settings = Settings(url=url, max_sessions_per_owner=LIMIT)
    async with open_store(url, settings=settings, clock=FrozenClock(START)) as store:
        fired: list[str] = []
        store.on("completed", lambda e: fired.append(e.session_id))
        await asyncio.to_thread(start.wait, START_TIMEOUT)
        created = 0
        for i in range(4):
            await store.update_session("s1", status="completed", title=f"t{i}")
            try:
                await store.create_session(owner="alice")
            except InvalidInput:
                continue
            created += 1
        return len(fired), created


@pytest.mark.parametrize("engine_name", SHARED_PARAMS)
async def test_completions_and_creates_from_processes_stay_exact(engine_url: str) -> None:
    processes = 4
    settings = Settings(url=engine_url, max_sessions_per_owner=LIMIT)
    async with open_store(engine_url, settings=settings, clock=FrozenClock(START)) as store:
        await store.create_session(session_id="s1")
        start = multiprocessing.get_context("spawn").Barrier(processes)
        results = await run_processes([(race_in_child, (engine_url, start))] * processes)
        assert sum(fired for fired, _ in results) == 1
        created = sum(made for _, made in results)
        assert 1 <= created <= LIMIT
        assert await store.count_sessions(owner="alice") == created
        assert (await store.get_session("s1")).version == 1 + processes * 4
        # the processes' figures, added to one counter row each from 4 processes
        figures = (await store.analytics(days=1)).totals
        assert (figures.created, figures.completed) == (1 + created, 1)


# --- archive and restore -----------------------------------------------------------------


async def test_archive_sets_old_sessions_archived(store: SessionStore, clock: FrozenClock) -> None:
    await store.create_session(session_id="old")
    await store.create_session(session_id="old-done", status="completed")
    await store.create_session(session_id="old-archived", status="archived")
    await store.create_session(session_id="touched")
    clock.advance(100 * DAY)
    await store.create_session(session_id="new")
    await store.append_message("touched", "user", "still here")
    before = {s.id: s for s in (await store.list_sessions()).items}

    dry = await archive(store, older_than=timedelta(days=90), dry_run=True)
    assert (dry.archived, dry.skipped, dry.failed) == (2, 0, 0)
    assert sorted(dry.sample) == ["default/old", "default/old-done"]
    assert {s.id: s for s in (await store.list_sessions()).items} == before

    report = await archive(store, older_than=90 * DAY)
    assert (report.archived, report.skipped, report.failed, report.ok) == (2, 0, 0, True)
    after = {s.id: s for s in (await store.list_sessions()).items}
    assert {i for i, s in after.items() if s.status == "archived"} == {
        "old",
        "old-done",
        "old-archived",
    }
    assert after["old"].version == before["old"].version + 1
    assert after["old-archived"].version == before["old-archived"].version
    assert after["touched"].status == after["new"].status == "active"
    assert (await archive(store, older_than=90 * DAY)).archived == 0

    restored = await restore(store, "old-done")
    assert (restored.reactivated, restored.moved, restored.status) == (True, False, "active")
    assert (await store.get_session("old-done")).status == "active"
    again = await restore(store, "old-done")  # not archived: left alone
    assert again.reactivated is False
    with pytest.raises(NotFound):
        await restore(store, "nobody")


async def test_archive_moves_sessions_exactly_and_restore_brings_them_back(
    store: SessionStore, archive_store: SessionStore, clock: FrozenClock
) -> None:
    seen = record_events(store)
    folder = await store.create_folder("trips", owner="alice")
    await store.create_session(
        session_id="trip",
        owner="alice",
        folder=folder.id,
        title="Lisbon",
        state={"city": "Lisbon", "days": [1, 2]},
        metadata={"source": "web"},
        ttl=400 * DAY,
    )
    await store.append_messages(
        "trip", [{"role": "user", "content": "hi", "input_tokens": 3, "cost": 0.25}] * 3
    )
    await store.pop_message("trip")  # a seq gap, kept by the copy
    await store.create_session(session_id="plain", status="completed")
    await store.for_tenant("acme").create_session(session_id="other-tenant")
    clock.advance(100 * DAY)
    await store.create_session(session_id="recent")
    exported = {sid: await store.export_session(sid) for sid in ("trip", "plain")}

    dry = await archive(store, older_than=90 * DAY, to=archive_store, dry_run=True)
    assert (dry.archived, dry.messages, dry.moved) == (2, 2, True)
    assert await archive_store.count_sessions() == 0

    report = await archive(store, older_than=90 * DAY, to=archive_store)
    assert (report.archived, report.messages, report.skipped, report.failed) == (2, 2, 0, 0)
    for sid, copy in exported.items():
        assert await archive_store.export_session(sid) == copy
        with pytest.raises(NotFound):
            await store.get_session(sid)
    assert [f.name for f in await archive_store.list_folders()] == ["trips"]
    assert {s.id for s in (await store.list_sessions()).items} == {"recent"}
    assert await store.for_tenant("acme").count_sessions() == 1  # only this tenant
    assert sorted(e for e in seen if e[0] == "deleted") == [
        ("deleted", "default", "plain"),
        ("deleted", "default", "trip"),
    ]
    assert (await archive(store, older_than=90 * DAY, to=archive_store)).archived == 0

    dry_restore = await restore(store, "trip", source=archive_store, dry_run=True)
    assert (dry_restore.moved, dry_restore.messages) == (True, 2)
    with pytest.raises(NotFound):
        await store.get_session("trip")
    back = await restore(store, "trip", source=archive_store)
    assert (back.moved, back.reactivated, back.status) == (True, False, "active")
    assert await store.export_session("trip") == exported["trip"]
    with pytest.raises(NotFound):
        await archive_store.get_session("trip")
    with pytest.raises(NotFound):
        await restore(store, "nobody", source=archive_store)


async def test_archive_and_restore_finish_what_a_crash_left(
    store: SessionStore, archive_store: SessionStore, clock: FrozenClock
) -> None:
    await store.create_session(session_id="copied", state={"n": 1})
    await store.create_session(session_id="stale", state={"n": 1})
    clock.advance(100 * DAY)
    # a run stopped after the copy landed, before the source was deleted; another copy
    # is older than its session, changed since (but still idle for long enough)
    await archive_store.load_session(*(await store.export_session("copied")))
    await archive_store.load_session(*(await store.export_session("stale")))
    clock.advance(-99 * DAY)
    await store.update_state("stale", {"n": 2})
    clock.advance(99 * DAY)
    expected = {sid: await store.export_session(sid) for sid in ("copied", "stale")}

    report = await archive(store, older_than=90 * DAY, to=archive_store)
    assert (report.archived, report.failed) == (2, 0)
    for sid, copy in expected.items():
        assert await archive_store.export_session(sid) == copy
    assert await store.count_sessions() == 0

    # restore stopped after its copy landed, before the archived one was deleted
    await store.load_session(*expected["copied"])
    back = await restore(store, "copied", source=archive_store)
    assert back.moved is True
    assert await store.export_session("copied") == expected["copied"]
    assert await archive_store.count_sessions() == 1
    # a live session with the id that is not the archived one is never overwritten
    await store.create_session(session_id="stale", state={"other": True})
    with pytest.raises(AlreadyExists):
        await restore(store, "stale", source=archive_store)
    assert (await store.get_session("stale")).state == {"other": True}
    assert await archive_store.export_session("stale") == expected["stale"]


# --- purge -------------------------------------------------------------------------------


async def test_purge_deletes_old_sessions_and_expired_ones(
    store: SessionStore, clock: FrozenClock
) -> None:
    seen = record_events(store)
    await store.create_session(session_id="old", status="archived")
    await store.create_session(session_id="old-active")
    await store.append_message("old-active", "user", "hi")
    await store.create_session(session_id="short", ttl=60)
    await store.create_session(session_id="kept")
    clock.advance(400 * DAY)
    await store.update_session("kept", step="again")

    dry = await purge(store, older_than=365 * DAY, expired=True, dry_run=True)
    assert (dry.old, dry.expired, dry.purged) == (2, None, 2)
    assert await store.count_sessions() == 3

    report = await purge(store, older_than=365 * DAY)
    assert (report.old, report.expired, report.skipped, report.failed) == (2, None, 0, 0)
    assert sorted(report.sample) == ["default/old", "default/old-active"]
    assert {s.id for s in (await store.list_sessions()).items} == {"kept"}
    assert sorted(e[2] for e in seen if e[0] == "deleted") == ["old", "old-active"]
    expired = await purge(store, expired=True)
    assert (expired.expired, expired.old, expired.purged) == (1, 0, 1)
    assert (await purge(store, expired=True, older_than=365 * DAY)).purged == 0


# --- the sweeper -------------------------------------------------------------------------


async def test_a_sweep_purges_expired_sessions_and_archives_aged_ones(
    store: SessionStore, engine_url: str, clock: FrozenClock
) -> None:
    settings = Settings(url=engine_url, max_session_age=30 * DAY)
    swept = SessionStore(store.engine, settings=settings, clock=clock)
    await swept.open()
    await swept.create_session(session_id="aged")
    await swept.create_session(session_id="aged-done", status="completed")
    await swept.for_tenant("acme").create_session(session_id="aged-acme")
    await swept.create_session(session_id="short", ttl=60)
    clock.advance(31 * DAY)
    await swept.create_session(session_id="young")
    await swept.update_session("aged", title="activity does not make it younger")

    report = await Sweeper(swept).sweep()
    assert (report.expired, report.aged, report.skipped, report.failed) == (1, 3, 0, 0)
    statuses = {s.id: s.status for s in (await swept.list_sessions()).items}
    assert statuses == {"aged": "archived", "aged-done": "archived", "young": "active"}
    assert (await swept.for_tenant("acme").get_session("aged-acme")).status == "archived"
    again = await Sweeper(swept).sweep()
    assert (again.expired, again.aged) == (0, 0)


async def test_purging_expired_sessions_fires_expired_once_each(
    store: SessionStore, clock: FrozenClock
) -> None:
    seen = record_events(store)
    other = store.for_tenant("acme")
    await store.create_session(session_id="short", ttl=60)
    await store.create_session(session_id="idle", idle_ttl=60)
    await other.create_session(session_id="short-acme", ttl=60)
    await store.create_session(session_id="long", ttl=3_600)
    clock.advance(61)
    assert await store.get_session("long")
    # Two purgers over one engine, one after the other: each expired session is announced
    # by the one that deleted it, and only once.
    second = (await two_stores(store))[0]
    also = record_events(second)
    assert await store.purge_expired(batch_size=1) == 2
    assert await second.purge_expired(all_tenants=True) == 1
    assert await store.purge_expired(all_tenants=True) == 0
    expired = sorted(e for e in seen if e[0] == "expired")
    assert expired == [("expired", "default", "idle"), ("expired", "default", "short")]
    assert [e for e in also if e[0] == "expired"] == [("expired", "acme", "short-acme")]
    assert not [e for e in seen + also if e[0] == "deleted"]


async def test_a_sweep_can_purge_aged_sessions_firing_expired(
    store: SessionStore, engine_url: str, clock: FrozenClock
) -> None:
    settings = Settings(url=engine_url, max_session_age=30 * DAY, max_session_age_action="purge")
    swept = SessionStore(store.engine, settings=settings, clock=clock)
    await swept.open()
    expired: list[SessionEvent] = []
    swept.on("expired", expired.append)
    deleted = record_events(swept)
    await swept.create_session(session_id="aged", owner="alice", status="archived")
    clock.advance(31 * DAY)
    await swept.create_session(session_id="young")

    report = await Sweeper(swept).sweep()
    assert (report.expired, report.aged) == (0, 1)
    assert [s.id for s in (await swept.list_sessions()).items] == ["young"]
    assert [(e.event, e.session_id) for e in expired] == [("expired", "aged")]
    assert expired[0].session is not None
    assert expired[0].session.owner == "alice"
    assert not [e for e in deleted if e[0] == "deleted"]
