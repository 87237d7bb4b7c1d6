"""Daily figures of activity: what the store counts as it writes, and how it sums them.

Every write that creates a session, completes one or appends messages adds to a ledger of
counters per tenant, UTC day and owner (``DailyRecord``): sessions created and completed,
messages, tokens and cost. The counters are history: deleting, purging or archiving a
session later does not take its figures back, and importing or migrating sessions adds
nothing (they were counted where they were written). Reading a month of figures reads a
month of counters, however many sessions the store holds.

A store adds to its ledger in memory and writes it to the engine every
``analytics_flush_interval`` seconds (atomic increments, so any number of processes add
up exactly), when it closes and before it reads figures. A process killed between two
writes loses at most that interval's figures, never session data. Appends are counted
per session and their owner is looked up when the figures are written: one bulk read per
tenant and interval, never one per append.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from .models import DailyRecord, MessageDraft

if TYPE_CHECKING:
    from .clock import Clock
    from .engines.base import Engine

__all__ = [
    "GROUPINGS",
    "Analytics",
    "Grouping",
    "Ledger",
    "OwnerPeriod",
    "SeriesPoint",
    "day_of",
    "periods_of",
    "summarize",
]

Grouping = Literal["day", "week", "month"]
GROUPINGS: tuple[Grouping, ...] = ("day", "week", "month")
_DAY = 86_400
_EPOCH = date(1970, 1, 1)
_log = logging.getLogger("sessionkeeper.analytics")


def day_of(timestamp: float) -> int:
    """The UTC day of a Unix time, as days since 1970-01-01."""
    return int(timestamp // _DAY)


def _date(day: int) -> date:
    return _EPOCH + timedelta(days=day)


def _period_start(day: int, grouping: Grouping) -> int:
    """The first day of the period holding ``day``: weeks start on Monday (ISO)."""
    if grouping == "day":
        return day
    when = _date(day)
    if grouping == "week":
        return day - when.weekday()
    return (when.replace(day=1) - _EPOCH).days


def _next_period(start: int, grouping: Grouping) -> int:
    if grouping == "day":
        return start + 1
    if grouping == "week":
        return start + 7
    when = _date(start)
    following = date(when.year + when.month // 12, when.month % 12 + 1, 1)
    return (following - _EPOCH).days


# --- what a reader gets ----------------------------------------------------------------


class SeriesPoint(BaseModel):
    """The figures of one period (a day, an ISO week or a month), every owner together."""

    model_config = ConfigDict(frozen=True)

    start: date = Field(description="The period's first day (clipped to the range asked for)")
    end: date = Field(description="The period's last day (clipped to the range asked for)")
    created: int = Field(description="Sessions created")
    completed: int = Field(description="Sessions completed")
    messages: int = Field(description="Messages appended")
    input_tokens: int
    output_tokens: int
    cost: float
    avg_turns_per_session: float = Field(
        description="Turns (messages) per session completed in the period; 0 if none was"
    )


class OwnerPeriod(BaseModel):
    """One owner's usage in one period."""

    model_config = ConfigDict(frozen=True)

    owner: str | None
    start: date
    created: int
    messages: int
    input_tokens: int
    output_tokens: int
    tokens: int = Field(description="Input plus output tokens")
    cost: float


class Analytics(BaseModel):
    """A range of days, summed per period, with the owners that cost most per period."""

    model_config = ConfigDict(frozen=True)

    group_by: Grouping
    start: date = Field(description="First day of the range (UTC)")
    end: date = Field(description="Last day of the range (UTC), included")
    owner: str | None = Field(
        None, description="The owner the figures are limited to, if one was asked for"
    )
    series: list[SeriesPoint] = Field(description="One point per period, oldest first")
    owners: list[OwnerPeriod] = Field(
        description="Per period (oldest first), its owners by cost, highest first, at most "
        "``top`` of them"
    )
    totals: SeriesPoint = Field(description="The whole range as one period")


def _add(into: DailyRecord, row: DailyRecord) -> None:
    into.created += row.created
    into.completed += row.completed
    into.completed_messages += row.completed_messages
    into.messages += row.messages
    into.input_tokens += row.input_tokens
    into.output_tokens += row.output_tokens
    into.cost += row.cost


def _point(first: int, last: int, row: DailyRecord) -> SeriesPoint:
    return SeriesPoint(
        start=_date(first),
        end=_date(last),
        created=row.created,
        completed=row.completed,
        messages=row.messages,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cost=row.cost,
        avg_turns_per_session=row.completed_messages / row.completed if row.completed else 0.0,
    )


def periods_of(first: int, last: int, grouping: Grouping) -> list[tuple[int, int]]:
    """The (first day, last day) of each period of days ``first`` to ``last``, clipped
    to them."""
    periods: list[tuple[int, int]] = []
    start = first
    while start <= last:
        following = _next_period(_period_start(start, grouping), grouping)
        periods.append((start, min(following - 1, last)))
        start = following
    return periods


def summarize(
    rows: Iterable[DailyRecord],
    first: int,
    last: int,
    grouping: Grouping,
    top: int,
    owner: str | None = None,
) -> Analytics:
    """Sum the counters of days ``first`` to ``last`` (included) per period: every
    period of the range gets a point, with zeros where nothing happened. ``rows`` are per
    day, or per period dated by its first day (from engines that sum in storage; the
    engine's range already left out the days outside)."""
    periods = periods_of(first, last, grouping)
    index = {day: i for i, (a, b) in enumerate(periods) for day in range(a, b + 1)}
    # rows an engine summed per period are dated by its first day, before the range's
    # first day for a clipped first period
    index[_period_start(first, grouping)] = 0
    sums = [DailyRecord(a, None) for a, _ in periods]
    by_owner: list[dict[str | None, DailyRecord]] = [{} for _ in periods]
    total = DailyRecord(first, None)
    for row in rows:
        at = index.get(row.day)
        if at is None:
            continue
        _add(sums[at], row)
        _add(total, row)
        _add(by_owner[at].setdefault(row.owner, DailyRecord(periods[at][0], row.owner)), row)
    owners: list[OwnerPeriod] = []
    for found in by_owner:
        ranked = sorted(
            found.values(),
            key=lambda r: (-r.cost, -(r.input_tokens + r.output_tokens), r.owner or ""),
        )
        owners += [
            OwnerPeriod(
                owner=r.owner,
                start=_date(r.day),
                created=r.created,
                messages=r.messages,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
                tokens=r.input_tokens + r.output_tokens,
                cost=r.cost,
            )
            for r in ranked[:top]
        ]
    return Analytics(
        group_by=grouping,
        start=_date(first),
        end=_date(last),
        owner=owner,
        series=[_point(a, b, s) for (a, b), s in zip(periods, sums, strict=True)],
        owners=owners,
        totals=_point(first, last, total),
    )


# --- what a writer adds ----------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """One tenant's figures not yet written: by owner where the writer knew it, by session
    (owner looked up when written) for appends."""

    by_owner: dict[tuple[int, str | None], DailyRecord] = field(default_factory=dict)
    by_session: dict[tuple[int, str], DailyRecord] = field(default_factory=dict)

    def merge(self, other: _Pending) -> None:
        for key, row in other.by_owner.items():
            _add(self.by_owner.setdefault(key, DailyRecord(row.day, row.owner)), row)
        for (day, sid), row in other.by_session.items():
            _add(self.by_session.setdefault((day, sid), DailyRecord(day, None)), row)


class Ledger:
    """The figures a store (and its tenant views) counted and has not written yet."""

    __slots__ = ("_clock", "_engine", "_flushing", "_pending", "_task", "interval")

    def __init__(self, engine: Engine, clock: Clock, interval: float) -> None:
        self._engine = engine
        self._clock = clock
        self.interval = interval
        self._pending: dict[str, _Pending] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def _tenant(self, tenant: str) -> _Pending:
        found = self._pending.get(tenant)
        if found is None:
            found = self._pending[tenant] = _Pending()
            self._wake()
        return found

    def _by_owner(self, tenant: str, owner: str | None) -> DailyRecord:
        day = day_of(self._clock.now())
        pending = self._tenant(tenant).by_owner
        found = pending.get((day, owner))
        if found is None:
            found = pending[day, owner] = DailyRecord(day, owner)
        return found

    def created(self, tenant: str, owner: str | None) -> None:
        self._by_owner(tenant, owner).created += 1

    def completed(self, tenant: str, owner: str | None, messages: int) -> None:
        row = self._by_owner(tenant, owner)
        row.completed += 1
        row.completed_messages += messages

    def appended(self, tenant: str, session_id: str, drafts: Sequence[MessageDraft]) -> None:
        day = day_of(self._clock.now())
        pending = self._tenant(tenant).by_session
        row = pending.get((day, session_id))
        if row is None:
            row = pending[day, session_id] = DailyRecord(day, None)
        row.messages += len(drafts)
        for draft in drafts:
            row.input_tokens += draft.input_tokens
            row.output_tokens += draft.output_tokens
            row.cost += draft.cost

    def _wake(self) -> None:
        """Start the task that writes the figures every interval, if none runs."""
        if self.interval <= 0 or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # counted outside a loop: written at the next flush
            return
        self._task = loop.create_task(self._every_interval(), name="sessionkeeper-analytics")

    async def _every_interval(self) -> None:
        while self._pending:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # the engine is down: keep the figures, try again
                _log.warning("could not write analytics figures; will retry", exc_info=True)

    async def flush(self) -> None:
        """Write what was counted: one owner look-up and one atomic add per tenant. What
        could not be written is kept for the next flush, and the error raised."""
        async with self._flushing:
            taken, self._pending = self._pending, {}
            for tenant in list(taken):
                pending = taken[tenant]
                try:
                    await self._write(tenant, pending)
                except BaseException:
                    for name, left in taken.items():
                        self._tenant(name).merge(left)
                    raise
                del taken[tenant]

    async def _write(self, tenant: str, pending: _Pending) -> None:
        rows = dict(pending.by_owner)
        if pending.by_session:
            sids = sorted({sid for _, sid in pending.by_session})
            owners = await self._engine.session_owners(tenant, sids)
            for (day, sid), row in pending.by_session.items():
                owner = owners.get(sid)
                _add(rows.setdefault((day, owner), DailyRecord(day, owner)), row)
        if rows:
            await self._engine.add_daily(tenant, sorted(rows.values(), key=_row_key))
        pending.by_owner.clear()
        pending.by_session.clear()

    async def close(self) -> None:
        """Stop the interval task and write what is left."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.flush()


def _row_key(row: DailyRecord) -> tuple[int, str]:
    # one order for every writer, so concurrent adds lock rows in the same order
    return row.day, row.owner or ""
