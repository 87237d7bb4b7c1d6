"""Contract: daily figures (store.analytics) on every engine, with time from a frozen clock:
what is counted, per day, week and month, per owner, as history, and bad input."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sessionkeeper import FrozenClock, InvalidInput, SessionStore, Settings
from sessionkeeper.transfer import export_store, import_file

DAY = 86_400.0
# START of the frozen clock (tests/contract/conftest.py) is 2023-11-14 22:13:20 UTC.
TODAY = date(2023, 11, 14)


def said(role: str, tokens: int = 0, cost: float = 0.0) -> dict[str, Any]:
    return {"role": role, "content": "x", "input_tokens": tokens, "output_tokens": 1, "cost": cost}


async def three_days(store: SessionStore, clock: FrozenClock) -> None:
    """Day 1: alice opens a session with 2 messages; bob one with 1 and completes it.
    Day 2: nothing. Day 3: alice's session gets 3 more and completes; an ownerless one
    is created."""
    await store.create_session(session_id="a1", owner="alice")
    await store.append_messages("a1", [said("user", 10, 0.5), said("assistant", 20, 1.5)])
    await store.create_session(session_id="b1", owner="bob")
    await store.change_session("b1", status="completed", messages=[said("user", 5, 0.25)])
    clock.advance(2 * DAY)
    await store.append_message("a1", "user", "more", input_tokens=1, cost=0.125)
    await store.change_session(
        "a1", status="completed", messages=[said("assistant", 2), said("user", 3, 0.125)]
    )
    await store.create_session(session_id="n1")


async def test_figures_per_day_count_what_each_day_wrote(
    store: SessionStore, clock: FrozenClock
) -> None:
    await three_days(store, clock)
    found = await store.analytics(days=3)
    assert (found.start, found.end, found.group_by) == (TODAY, TODAY + timedelta(days=2), "day")
    days = [(p.start, p.created, p.completed, p.messages) for p in found.series]
    assert days == [
        (TODAY, 2, 1, 3),
        (TODAY + timedelta(days=1), 0, 0, 0),
        (TODAY + timedelta(days=2), 1, 1, 3),
    ]
    first, _, third = found.series
    assert (first.input_tokens, first.output_tokens, first.cost) == (35, 3, 2.25)
    assert (third.input_tokens, third.output_tokens, third.cost) == (6, 2, 0.25)
    # a session completed on day 1 had 1 message then, the one on day 3 had 5
    assert (first.avg_turns_per_session, third.avg_turns_per_session) == (1.0, 5.0)
    total = found.totals
    assert (total.created, total.completed, total.messages, total.cost) == (3, 2, 6, 2.5)
    assert total.avg_turns_per_session == 3.0


async def test_owners_per_period_are_ranked_by_cost(
    store: SessionStore, clock: FrozenClock
) -> None:
    await three_days(store, clock)
    found = await store.analytics(days=3)
    ranked = [(o.start, o.owner, o.messages, o.tokens, o.cost) for o in found.owners]
    assert ranked == [
        (TODAY, "alice", 2, 32, 2.0),
        (TODAY, "bob", 1, 6, 0.25),
        (TODAY + timedelta(days=2), "alice", 3, 8, 0.25),
        (TODAY + timedelta(days=2), None, 0, 0, 0.0),
    ]
    top = await store.analytics(days=3, top=1)
    assert [(o.start, o.owner) for o in top.owners] == [
        (TODAY, "alice"),
        (TODAY + timedelta(days=2), "alice"),
    ]
    alice = await store.analytics(days=3, owner="alice")
    assert alice.owner == "alice"
    assert [(p.created, p.messages) for p in alice.series] == [(1, 2), (0, 0), (0, 3)]
    nobody = await store.analytics(days=3, owner=None)
    assert nobody.totals.created == 1
    assert nobody.totals.messages == 0


async def test_weeks_and_months_sum_their_days(store: SessionStore, clock: FrozenClock) -> None:
    await three_days(store, clock)  # Tuesday 14 to Thursday 16 November 2023
    clock.advance(20 * DAY)  # Wednesday 6 December
    await store.create_session(owner="carol")
    months = await store.analytics(days=60, group_by="month")
    assert [(p.start, p.end, p.created) for p in months.series] == [
        (date(2023, 10, 8), date(2023, 10, 31), 0),
        (date(2023, 11, 1), date(2023, 11, 30), 3),
        (date(2023, 12, 1), date(2023, 12, 6), 1),
    ]
    weeks = await store.analytics(days=23, group_by="week")
    assert [(p.start, p.created, p.messages) for p in weeks.series] == [
        (TODAY, 3, 6),  # the range starts on a Tuesday: the first week is clipped
        (date(2023, 11, 20), 0, 0),
        (date(2023, 11, 27), 0, 0),
        (date(2023, 12, 4), 1, 0),
    ]
    assert weeks.series[0].end == date(2023, 11, 19)
    back_then = await store.analytics(days=1, until=TODAY + timedelta(days=2))
    assert back_then.totals.messages == 3
    as_datetime = await store.analytics(days=1, until=datetime(2023, 11, 16, 23, 59, tzinfo=UTC))
    assert as_datetime == back_then


async def test_figures_are_history_that_deletes_and_imports_leave_alone(
    store: SessionStore, clock: FrozenClock, tmp_path: Path
) -> None:
    await three_days(store, clock)
    before = await store.analytics(days=3)
    await export_store(store, tmp_path / "all.jsonl")
    await store.delete_session("a1")
    await store.pop_message("b1")
    await store.clear_messages("b1")
    assert await store.analytics(days=3) == before
    # what an import writes was counted where it was written, not again here
    await import_file(store, tmp_path / "all.jsonl", on_conflict="overwrite")
    assert await store.analytics(days=3) == before
    # re-completing a completed session is no completion; completing it again after
    # reopening is one more
    await store.update_session("a1", status="completed")
    assert (await store.analytics(days=1)).totals.completed == 1
    await store.update_session("a1", status="active")
    await store.update_session("a1", status="completed")
    assert (await store.analytics(days=1)).totals.completed == 2


async def test_tenants_count_apart(store: SessionStore, clock: FrozenClock) -> None:
    await three_days(store, clock)
    acme = store.for_tenant("acme")
    await acme.create_session(owner="alice")
    assert (await acme.analytics(days=3)).totals.created == 1
    assert (await store.analytics(days=3)).totals.created == 3


async def test_figures_another_store_wrote_are_read_after_it_closed(
    store: SessionStore, engine_url: str, clock: FrozenClock
) -> None:
    settings = Settings(url=engine_url, analytics_flush_interval=0)
    other = await SessionStore(store.engine, settings=settings, clock=clock).open()
    await other.create_session(session_id="o1", owner="olga")
    await other.append_message("o1", "user", "hi", input_tokens=7, cost=0.5)
    assert (await store.analytics(days=1)).totals.created == 0  # still in other's ledger
    await other.close()
    found = await store.analytics(days=1)
    assert (found.totals.created, found.totals.messages, found.totals.cost) == (1, 1, 0.5)
    assert [o.owner for o in found.owners] == ["olga"]


async def test_a_store_with_analytics_off_counts_nothing(
    store: SessionStore, engine_url: str, clock: FrozenClock
) -> None:
    quiet = SessionStore(
        store.engine, settings=Settings(url=engine_url, analytics=False), clock=clock
    )
    await quiet.open()
    await quiet.create_session(session_id="q1")
    await quiet.append_message("q1", "user", "unseen")
    assert (await store.analytics(days=1)).totals.created == 0
    with pytest.raises(InvalidInput) as raised:
        await quiet.analytics()
    assert raised.value.field == "analytics"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"days": 0}, "days"),
        ({"days": 3_661}, "days"),
        ({"days": "7"}, "days"),
        ({"group_by": "year"}, "group_by"),
        ({"top": -1}, "top"),
        ({"days": 3_660, "top": 10}, "top"),  # 36,600 owner rows a day at most
        ({"days": 400, "group_by": "week", "top": 1_000}, "top"),
        ({"until": "2023-11-14"}, "until"),
        ({"until": datetime(2023, 11, 14)}, "until"),  # naive
        ({"owner": ""}, "owner"),
        ({"owner": 7}, "owner"),
    ],
)
async def test_bad_arguments_name_the_field(
    store: SessionStore, arguments: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        await store.analytics(**arguments)
    assert raised.value.field == field
