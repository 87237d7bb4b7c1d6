"""maintenance: durations, the sweeper task, races the policies lose on purpose, hooks in
the synchronous twin and bad input. The engine-independent behaviour is in the contract
suite (tests/contract/test_lifecycle.py); these run on memory://."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sessionkeeper import (
    BackendUnavailable,
    FrozenClock,
    InvalidInput,
    SessionEvent,
    SessionStore,
    Settings,
    open_store,
    open_store_sync,
)
from sessionkeeper.maintenance import Sweeper, archive, parse_duration, purge, restore

DAY = 86_400.0


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
async def store(clock: FrozenClock) -> AsyncIterator[SessionStore]:
    async with open_store("memory://", clock=clock) as opened:
        yield opened


def aged_store(store: SessionStore, clock: FrozenClock, **settings: Any) -> SessionStore:
    """A store over the same engine with other settings."""
    return SessionStore(store.engine, settings=Settings(url="memory://", **settings), clock=clock)


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45), ("30m", 1800), ("12h", 43_200), ("90d", 7_776_000), ("2w", 1_209_600)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text, "--older-than") == seconds
    assert parse_duration(f" {text} ", "--older-than") == seconds


@pytest.mark.parametrize("text", ["3x", "", "90", "d", "1.5h", "-1d", "1h30m", "10 d", "٣d"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(InvalidInput) as bad:
        parse_duration(text, "--older-than")
    assert bad.value.field == "--older-than"
    assert repr(text) in bad.value.reason


def test_a_zero_duration_is_refused() -> None:
    with pytest.raises(InvalidInput, match="longer than 0"):
        parse_duration("0d", "older_than")
    with pytest.raises(InvalidInput, match="must be a duration"):
        parse_duration(90, "older_than")


async def test_policies_check_their_arguments(store: SessionStore) -> None:
    cases: list[tuple[str, Any]] = [
        ("older_than", archive(store, older_than=-1)),
        ("older_than", archive(store, older_than=float("inf"))),
        ("older_than", archive(store, older_than="90d")),  # type: ignore[arg-type]
        ("batch_size", archive(store, older_than=1, batch_size=0)),
        ("concurrency", archive(store, older_than=1, concurrency=0)),
        ("older_than", purge(store)),
        ("to", archive(store, older_than=1, to=store.for_tenant("other"))),
        ("source", restore(store, "s1", source=store)),
    ]
    for field, call in cases:
        with pytest.raises(InvalidInput) as bad:
            await call
        assert bad.value.field == field


# --- the sweeper -------------------------------------------------------------------------


async def test_the_sweeper_runs_a_pass_at_once_and_stops_cleanly(
    store: SessionStore, clock: FrozenClock
) -> None:
    swept = aged_store(store, clock, max_session_age=DAY, max_session_age_action="purge")
    await swept.open()
    gone = asyncio.Event()
    swept.on("expired", lambda e: gone.set())
    await swept.create_session(session_id="aged")
    clock.advance(2 * DAY)
    sweeper = Sweeper(swept, interval=3600)
    async with sweeper:
        await asyncio.wait_for(gone.wait(), 30)
        task = sweeper._task
        assert task is not None
    assert task.cancelled()
    assert sweeper.last_report is not None
    assert sweeper.last_report.aged == 1
    await sweeper.stop()  # twice is harmless


async def test_a_disabled_sweeper_does_nothing(store: SessionStore, clock: FrozenClock) -> None:
    for sweeper in (
        Sweeper(store, interval=0),
        Sweeper(aged_store(store, clock, sweep_interval=None)),
        Sweeper(aged_store(store, clock, sweep_interval=0)),
    ):
        assert not sweeper.enabled
        sweeper.start()
        assert sweeper._task is None
        await sweeper.run()  # returns at once
        await sweeper.stop()
    assert Sweeper(store).interval == 60
    with pytest.raises(InvalidInput):
        Sweeper(store, interval=-1)
    with pytest.raises(InvalidInput):
        Sweeper(store, batch_size=0)


async def test_a_failed_pass_is_logged_and_the_next_runs(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    second = asyncio.Event()

    async def flaky(self: SessionStore, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BackendUnavailable("the database is down")
        second.set()
        return 0

    monkeypatch.setattr(SessionStore, "purge_expired", flaky)
    with caplog.at_level(logging.ERROR, "sessionkeeper.maintenance"):
        async with Sweeper(store, interval=0.001):
            await asyncio.wait_for(second.wait(), 30)
    assert "sweeper: a pass failed" in caplog.text
    assert "the database is down" in caplog.text


async def test_stopping_cancels_a_pass_in_progress(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def stuck(self: SessionStore, **kwargs: Any) -> int:
        started.set()
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(SessionStore, "purge_expired", stuck)
    sweeper = Sweeper(store, interval=60)
    sweeper.start()
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.wait_for(sweeper.stop(), 30)
    assert sweeper.passes == 0


# --- races the policies lose on purpose --------------------------------------------------


async def test_a_session_changed_after_it_was_listed_is_not_archived(
    store: SessionStore, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create_session(session_id="busy")
    await store.create_session(session_id="idle")
    clock.advance(100 * DAY)
    listing = SessionStore.list_sessions

    async def list_then_write(self: SessionStore, **kwargs: Any) -> Any:
        page = await listing(self, **kwargs)
        if any(s.id == "busy" for s in page.items):
            await self.append_message("busy", "user", "back again")
        return page

    monkeypatch.setattr(SessionStore, "list_sessions", list_then_write)
    report = await archive(store, older_than=90 * DAY)
    assert (report.archived, report.skipped) == (1, 1)
    assert (await store.get_session("busy")).status == "active"
    assert (await store.get_session("idle")).status == "archived"
    async with open_store("memory://", clock=clock) as target:
        await store.update_session("idle", status="active")
        clock.advance(100 * DAY)
        moved = await archive(store, older_than=90 * DAY, to=target)
        assert (moved.archived, moved.skipped) == (1, 1)
        assert [s.id for s in (await target.list_sessions()).items] == ["idle"]


async def test_a_session_changed_while_it_was_copied_stays_and_its_copy_goes(
    store: SessionStore, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create_session(session_id="s1", state={"n": 1})
    clock.advance(100 * DAY)
    loading = SessionStore.load_session

    async def load_then_write(self: SessionStore, *args: Any, **kwargs: Any) -> Any:
        outcome = await loading(self, *args, **kwargs)
        await store.update_state("s1", {"n": 2})  # in the source, after the copy landed
        return outcome

    async with open_store("memory://", clock=clock) as target:
        monkeypatch.setattr(SessionStore, "load_session", load_then_write)
        report = await archive(store, older_than=90 * DAY, to=target)
        assert (report.archived, report.skipped) == (0, 1)
        assert (await store.get_session("s1")).state == {"n": 2}
        assert await target.count_sessions() == 0


async def test_restore_finishes_after_a_crash_that_followed_the_archive_delete(
    store: SessionStore,
) -> None:
    await store.create_session(session_id="s1", status="archived")
    async with open_store("memory://") as empty_archive:
        report = await restore(store, "s1", source=empty_archive)
    assert (report.moved, report.reactivated) == (False, True)
    assert (await store.get_session("s1")).status == "active"


async def test_archive_of_every_tenant(store: SessionStore, clock: FrozenClock) -> None:
    for tenant in ("a", "b", "c"):
        await store.for_tenant(tenant).create_session(session_id="old")
    clock.advance(2 * DAY)
    only_default = await archive(store, older_than=DAY)
    assert (only_default.tenants, only_default.archived) == (1, 0)
    seen: list[tuple[int, int]] = []
    report = await archive(store, older_than=DAY, all_tenants=True, progress=_tell(seen))
    assert (report.tenants, report.archived) == (3, 3)
    assert seen[0] == (0, 3)
    assert seen[-1] == (3, 3)
    assert sorted(report.sample) == ["a/old", "b/old", "c/old"]


def _tell(seen: list[tuple[int, int]]) -> Any:
    def tell(done: int, total: int) -> None:
        seen.append((done, total))

    return tell


async def test_purge_walks_in_pages(store: SessionStore, clock: FrozenClock) -> None:
    for i in range(25):
        await store.create_session(session_id=f"s{i:02}")
    clock.advance(2 * DAY)
    report = await purge(store, older_than=DAY, batch_size=4, concurrency=3)
    assert report.old == 25
    assert await store.count_sessions() == 0


# --- hooks -------------------------------------------------------------------------------


async def test_deleting_a_folder_with_its_sessions_fires_deleted_for_each(
    store: SessionStore,
) -> None:
    folder = await store.create_folder("work", owner="alice")
    for i in range(3):
        await store.create_session(session_id=f"s{i}", owner="alice", folder=folder.id)
    await store.create_session(session_id="elsewhere", owner="alice")
    deleted: list[str] = []
    store.on("deleted", lambda e: deleted.append(e.session_id))
    assert await store.delete_folder(folder.id, cascade=True) == 3
    assert sorted(deleted) == ["s0", "s1", "s2"]
    assert [s.id for s in (await store.list_sessions()).items] == ["elsewhere"]


async def test_a_bad_hook_is_refused(store: SessionStore) -> None:
    with pytest.raises(InvalidInput) as bad:
        store.on("created", "not callable")  # type: ignore[arg-type]
    assert bad.value.field == "callback"


def test_hooks_of_the_sync_twin_may_call_the_store(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    with open_store_sync("memory://") as store:

        def on_completed(event: SessionEvent) -> None:
            # a plain function runs off the event loop: calling the store does not block it
            seen.append(store.get_session(event.session_id).status)

        async def on_created(event: SessionEvent) -> None:
            seen.append(f"created {event.session_id}")

        def broken(event: SessionEvent) -> None:
            raise ValueError("hook bug")

        store.on("completed", on_completed)
        store.on("created", on_created)
        remove = store.on("deleted", broken)
        session = store.create_session(session_id="s1")
        store.update_session(session.id, status="completed")
        store.delete_session(session.id)
        remove()
        assert seen == ["created s1", "completed"]
        assert "hook bug" in caplog.text
        with pytest.raises(InvalidInput):
            store.on("created", None)  # type: ignore[arg-type]
