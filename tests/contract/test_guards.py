"""Guards on every engine: rate limits, failed-login lockouts and budgets, atomic there.

Where the engine is shared, the concurrent hits and failures come from separate processes;
otherwise from tasks on one store. Time comes from FrozenClocks.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

from sessionkeeper import (
    BudgetExceeded,
    FrozenClock,
    InvalidInput,
    LockedOut,
    NotFound,
    RateLimited,
    SessionStore,
    Settings,
    VersionConflict,
    open_store,
)
from tests.contract.test_concurrency import START, START_TIMEOUT, Job, run_processes

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

WRITERS = 8


@asynccontextmanager
async def store_with(url: str, clock: FrozenClock, **settings: Any) -> AsyncIterator[SessionStore]:
    async with open_store(url, settings=Settings(url=url, **settings), clock=clock) as store:
        yield store


# --- rate limits -----------------------------------------------------------------------


async def test_hit_admits_the_limit_per_window_then_says_when(
    store: SessionStore, clock: FrozenClock
) -> None:
    results = []
    for _ in range(3):  # at t = 0, 1, 2
        results.append(await store.hit("api:alice", 3, 10))
        clock.advance(1)
    assert [r.allowed for r in results] == [True, True, True]
    assert [r.remaining for r in results] == [2, 1, 0]
    clock.advance(3)  # t = 6
    refused = await store.hit("api:alice", 3, 10)
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(4.0)  # the hit at 0 leaves at 10
    assert refused.reset_after == pytest.approx(6.0)  # the hit at 2 leaves at 12
    assert (await store.hit("api:bob", 3, 10)).allowed  # another key, another count
    clock.advance(4)  # t = 10
    assert (await store.hit("api:alice", 3, 10)).allowed  # the window slid past the first
    assert not (await store.hit("api:alice", 3, 10)).allowed


async def test_hit_weights_and_tenants_are_apart(store: SessionStore, clock: FrozenClock) -> None:
    assert (await store.hit("k", 5, 60, cost=4)).remaining == 1
    refused = await store.hit("k", 5, 60, cost=2)
    assert not refused.allowed
    assert refused.remaining == 1  # a refused hit counts nothing
    assert (await store.hit("k", 5, 60, cost=1)).allowed
    other = store.for_tenant("other")
    assert (await other.hit("k", 5, 60, cost=5)).allowed


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("", 5, 60), "key"),
        (("k\x00", 5, 60), "key"),
        (("k" * 300, 5, 60), "key"),
        (("k", 0, 60), "limit"),
        (("k", 10**9, 60), "limit"),
        (("k", 5, 0), "window"),
        (("k", 5, float("nan")), "window"),
        (("k", 5, 60, 6), "cost"),
        (("k", 5, 60, 0), "cost"),
    ],
)
async def test_hit_refuses_bad_input_and_counts_nothing(
    store: SessionStore, args: tuple[Any, ...], field: str
) -> None:
    key, limit, window, *cost = args
    with pytest.raises(InvalidInput) as caught:
        await store.hit(key, limit, window, cost=cost[0] if cost else 1)
    assert caught.value.field == field
    assert (await store.hit("k", 5, 60)).remaining == 4


async def burst(url: str, hits: int, limit: int, start: Barrier | None) -> int:
    async with store_with(url, FrozenClock(START)) as store:
        if start is not None:
            await asyncio.to_thread(start.wait, START_TIMEOUT)
        results = await asyncio.gather(*(store.hit("burst", limit, 3600) for _ in range(hits)))
        return sum(r.allowed for r in results)


async def test_a_concurrent_burst_admits_exactly_the_limit(
    engine_url: str, shared_engine: bool
) -> None:
    limit = 100
    per_writer = (limit + 50) // WRITERS + 1  # 152 hits in all
    if shared_engine:
        start = multiprocessing.get_context("spawn").Barrier(WRITERS)
        jobs: list[tuple[Job, tuple[Any, ...]]] = [
            (burst, (engine_url, per_writer, limit, start))
        ] * WRITERS
        admitted = await run_processes(jobs)
    else:
        async with store_with(engine_url, FrozenClock(START)) as store:
            results = await asyncio.gather(
                *(store.hit("burst", limit, 3600) for _ in range(per_writer * WRITERS))
            )
            admitted = [sum(r.allowed for r in results)]
    assert sum(admitted) == limit


async def test_session_message_rate_is_enforced_by_append(
    engine_url: str, clock: FrozenClock
) -> None:
    async with store_with(
        engine_url, clock, session_message_limit=3, session_message_window=60
    ) as store:
        session = await store.create_session()
        await store.append_messages(session.id, [{"role": "user"}, {"role": "assistant"}])
        await store.append_message(session.id, "user", "third")
        with pytest.raises(RateLimited) as caught:
            await store.append_message(session.id, "user", "fourth")
        assert caught.value.retry_after == pytest.approx(60.0)
        with pytest.raises(RateLimited):
            await store.change_session(session.id, messages=[{"role": "user"}])
        after = await store.get_session(session.id)
        assert after.message_count == 3
        assert after.version == session.version + 2  # the refused appends wrote nothing
        other = await store.create_session()
        await store.append_message(other.id, "user", "a session of its own")
        clock.advance(60.5)
        await store.append_message(session.id, "user", "fourth, later")


# --- failed logins ---------------------------------------------------------------------


async def test_failures_lock_an_account_then_the_lockout_ends(
    engine_url: str, clock: FrozenClock
) -> None:
    async with store_with(
        engine_url, clock, login_max_failures=3, login_lockout=100, login_progressive=True
    ) as store:
        for _ in range(2):
            status = await store.login_failed(ip="198.51.100.7", account="alice")
            assert not status.locked
        status = await store.login_failed(ip="198.51.100.7", account="alice")
        assert status.locked
        assert status.retry_after == pytest.approx(100.0)
        with pytest.raises(LockedOut) as caught:
            await store.check_login(account="alice")
        assert caught.value.retry_after == pytest.approx(100.0)
        with pytest.raises(LockedOut):
            await store.check_login(ip="198.51.100.7")
        await store.check_login(account="bob", ip="203.0.113.1")  # others are not locked
        clock.advance(100)
        await store.check_login(account="alice")
        for _ in range(3):
            await store.login_failed(account="alice")
        second = await store.login_status(account="alice")
        assert second.lockouts == 2
        assert second.retry_after == pytest.approx(200.0)  # progressive: twice as long
        assert second.failures == 6


async def test_success_and_unlock_clear_failures(store: SessionStore) -> None:
    for _ in range(5):
        await store.login_failed(ip="192.0.2.1", account="carol")
    assert (await store.login_status(account="carol")).locked
    listed = await store.list_logins(locked_only=True)
    assert {s.who for s in listed} == {"ip:192.0.2.1", "account:carol"}
    assert await store.unlock_login(account="carol") == 1
    assert not (await store.login_status(account="carol")).locked
    assert (await store.login_status(ip="192.0.2.1")).locked
    await store.login_succeeded(ip="192.0.2.1", account="carol")
    assert await store.list_logins() == []
    assert await store.for_tenant("other").list_logins() == []
    with pytest.raises(InvalidInput):
        await store.login_failed()
    with pytest.raises(InvalidInput) as caught:
        await store.login_failed(account="x\n")
    assert caught.value.field == "account"


async def fail_logins(url: str, times: int, start: Barrier | None) -> None:
    async with store_with(url, FrozenClock(START), login_max_failures=1000) as store:
        if start is not None:
            await asyncio.to_thread(start.wait, START_TIMEOUT)
        await asyncio.gather(*(store.login_failed(account="target") for _ in range(times)))


async def test_concurrent_failures_are_counted_exactly(
    engine_url: str, shared_engine: bool
) -> None:
    async with store_with(engine_url, FrozenClock(START), login_max_failures=1000) as store:
        if shared_engine:
            start = multiprocessing.get_context("spawn").Barrier(4)
            jobs: list[tuple[Job, tuple[Any, ...]]] = [(fail_logins, (engine_url, 25, start))] * 4
            await run_processes(jobs)
        else:
            await asyncio.gather(*(store.login_failed(account="target") for _ in range(100)))
        status = await store.login_status(account="target")
    assert status.failures == 100
    assert status.recent_failures == 100


# --- budgets ---------------------------------------------------------------------------


async def test_an_append_over_the_owner_budget_writes_nothing(
    engine_url: str, clock: FrozenClock
) -> None:
    async with store_with(
        engine_url, clock, owner_token_budget=100, budget_period="daily"
    ) as store:
        session = await store.create_session(owner="alice")
        await store.append_message(session.id, "user", "a", input_tokens=60)
        other = await store.create_session(owner="alice")
        with pytest.raises(BudgetExceeded) as caught:
            await store.append_message(other.id, "assistant", "b", output_tokens=41)
        assert caught.value.scope == "owner:alice"
        assert caught.value.what == "tokens"
        assert caught.value.used == 60
        assert caught.value.limit == 100
        assert (await store.get_session(other.id)).message_count == 0
        await store.append_message(other.id, "assistant", "b", output_tokens=40)  # fits exactly
        usage = await store.budget_usage(owner="alice")
        assert (usage.input_tokens, usage.output_tokens, usage.token_limit) == (60, 40, 100)
        assert usage.period == "daily"
        bob = await store.create_session(owner="bob")
        await store.append_message(bob.id, "user", "bob has his own", input_tokens=100)
        clock.advance(86_400)
        await store.append_message(other.id, "user", "a new day", input_tokens=100)


async def test_a_failed_append_gives_its_reservation_back(
    engine_url: str, clock: FrozenClock
) -> None:
    async with store_with(engine_url, clock, owner_cost_budget=1.0) as store:
        session = await store.create_session(owner="dan")
        with pytest.raises(VersionConflict):
            await store.append_message(session.id, "user", "x", cost=0.5, expected_version=99)
        assert (await store.budget_usage(owner="dan")).cost == 0.0
        with pytest.raises(NotFound):
            await store.append_message("no-such-session", "user", "x", cost=0.5)
        await store.change_session(session.id, messages=[{"role": "user", "cost": 0.75}])
        with pytest.raises(BudgetExceeded) as caught:
            await store.change_session(
                session.id, status="completed", messages=[{"role": "user", "cost": 0.5}]
            )
        assert caught.value.what == "cost"
        assert (await store.get_session(session.id)).status == "active"
        assert (await store.budget_usage(owner="dan")).cost == pytest.approx(0.75)


async def test_budgets_of_their_own_per_owner_and_per_session(
    engine_url: str, clock: FrozenClock
) -> None:
    async with store_with(engine_url, clock, budgets=True) as store:
        session = await store.create_session(owner="erin")
        await store.append_message(session.id, "user", "no limit yet", input_tokens=1000)
        usage = await store.set_budget(owner="erin", tokens=1500)
        assert usage.token_limit == 1500
        assert usage.input_tokens == 1000  # a new limit keeps what was counted
        await store.set_budget(session_id=session.id, cost=0.1)
        with pytest.raises(BudgetExceeded) as caught:
            await store.append_message(session.id, "user", "x", cost=0.2)
        assert caught.value.scope == f"session:{session.id}"
        assert (await store.budget_usage(owner="erin")).cost == 0.0  # the owner's was returned
        with pytest.raises(BudgetExceeded):
            await store.append_message(session.id, "user", "x", input_tokens=501)
        with pytest.raises(InvalidInput) as bad:
            await store.set_budget(owner="erin", tokens=-1)
        assert bad.value.field == "tokens"
        with pytest.raises(InvalidInput):
            await store.set_budget(owner="erin", period="hourly")


async def test_without_budgets_appends_count_nothing(store: SessionStore) -> None:
    session = await store.create_session(owner="fay")
    await store.append_message(session.id, "user", "x", input_tokens=10**6)
    usage = await store.budget_usage(owner="fay")
    assert usage.input_tokens == 0
    assert usage.token_limit is None


async def test_guards_are_listed_by_prefix_exactly(store: SessionStore, clock: FrozenClock) -> None:
    engine, now = store.engine, clock.now()

    def put(value: str | None) -> tuple[str | None, float | None, None]:
        return '"x"', now + 60, None

    keys = ["p", "p:a", "p:b", "p;", "p:\u00e9", "q:a", "o\U0010ffff"]
    for key in keys:
        await engine.update_guard(store.tenant, key, put, now)
    await engine.update_guard("acme", "p:other-tenant", put, now)

    async def listed(prefix: str) -> list[str]:
        return [g.key for g in await engine.list_guards(store.tenant, prefix, now)]

    assert await listed("p:") == ["p:a", "p:b", "p:\u00e9"]
    assert await listed("p") == ["p", "p:a", "p:b", "p:\u00e9", "p;"]
    assert await listed("o\U0010ffff") == ["o\U0010ffff"]
    assert sorted(await listed("")) == sorted(keys)
    clock.advance(61)
    assert await engine.list_guards(store.tenant, "p", clock.now()) == []
