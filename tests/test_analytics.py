"""The analytics ledger (writes every interval, keeps what it could not write) and the
pure summing of daily counters into days, weeks and months."""

from __future__ import annotations

import asyncio
import logging
from datetime import date

import pytest

from sessionkeeper import BackendUnavailable, FrozenClock, SessionStore, Settings
from sessionkeeper.analytics import day_of, summarize
from sessionkeeper.engines.memory import MemoryEngine
from sessionkeeper.models import DailyRecord

START = 1_700_000_000.0
TODAY = day_of(START)


class FlakyEngine(MemoryEngine):
    """A memory engine whose next ``fail`` adds of daily counters fail, as a server
    that went away would make them."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0

    async def add_daily(self, tenant: str, rows: list[DailyRecord], replace: bool = False) -> None:
        if self.fail:
            self.fail -= 1
            raise BackendUnavailable("the engine is away")
        await super().add_daily(tenant, rows, replace)


def _store(engine: MemoryEngine, interval: float) -> SessionStore:
    settings = Settings(url="memory://", analytics_flush_interval=interval)
    return SessionStore(engine, settings=settings, clock=FrozenClock(START))


async def test_figures_are_written_every_interval_without_a_read() -> None:
    engine = MemoryEngine()
    async with _store(engine, 0.05) as store:
        session = await store.create_session(owner="alice")
        await store.append_message(session.id, "user", "hi", input_tokens=3)
        for _ in range(200):
            rows = await engine.read_daily("default", TODAY, TODAY, None, False)
            if rows and rows[0].messages:
                break
            await asyncio.sleep(0.01)
        assert [(r.owner, r.created, r.messages, r.input_tokens) for r in rows] == [
            ("alice", 1, 1, 3)
        ]


async def test_figures_that_could_not_be_written_are_kept_for_the_next_flush() -> None:
    engine = FlakyEngine()
    async with _store(engine, 0) as store:
        await store.create_session(session_id="s1", owner="alice")
        engine.fail = 1
        with pytest.raises(BackendUnavailable):
            await store.analytics(days=1)
        await store.append_message("s1", "user", "after the failure")
        found = await store.analytics(days=1)
        assert (found.totals.created, found.totals.messages) == (1, 1)
        assert (await store.analytics(days=1)) == found  # written once, not twice


async def test_a_store_closes_when_its_figures_cannot_be_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FlakyEngine()
    store = await _store(engine, 0).open()
    await store.create_session()
    engine.fail = 1
    with caplog.at_level(logging.WARNING, "sessionkeeper"):
        await store.close()
    assert "analytics figures not written" in caplog.text
    with pytest.raises(BackendUnavailable):
        await store.create_session()  # closed all the same


def test_months_run_over_the_turn_of_the_year() -> None:
    first = (date(2023, 12, 20) - date(1970, 1, 1)).days
    last = first + 20  # 9 January 2024
    rows = [DailyRecord(first, "a", created=1), DailyRecord(last, "b", created=2, cost=0.5)]
    found = summarize(rows, first, last, "month", top=5)
    assert [(p.start, p.end, p.created) for p in found.series] == [
        (date(2023, 12, 20), date(2023, 12, 31), 1),
        (date(2024, 1, 1), date(2024, 1, 9), 2),
    ]
    assert [(o.start, o.owner, o.cost) for o in found.owners] == [
        (date(2023, 12, 20), "a", 0.0),
        (date(2024, 1, 1), "b", 0.5),
    ]


def test_weeks_start_on_monday_and_rows_outside_the_range_are_left_out() -> None:
    monday = (date(2024, 1, 1) - date(1970, 1, 1)).days
    rows = [DailyRecord(monday + day, None, messages=1) for day in range(-3, 17)]
    found = summarize(rows, monday, monday + 13, "week", top=0)
    assert [(p.start, p.end, p.messages) for p in found.series] == [
        (date(2024, 1, 1), date(2024, 1, 7), 7),
        (date(2024, 1, 8), date(2024, 1, 14), 7),
    ]
    assert found.owners == []
    assert found.totals.messages == 14
