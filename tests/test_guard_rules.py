"""The guards' pure rules: sliding windows, lockouts, budget periods, client addresses."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionkeeper import rules
from sessionkeeper.errors import InvalidInput


def _log(times: list[float]) -> str:
    return orjson.dumps(times).decode()


def test_rate_hit_admits_up_to_the_limit_then_says_when() -> None:
    value = None
    for i in range(3):
        hits, allowed, retry = rules.rate_hit(value, 3, 10.0, 1, 100.0 + i)
        assert allowed
        assert retry == 0.0
        value = _log(hits)
    hits, allowed, retry = rules.rate_hit(value, 3, 10.0, 1, 103.0)
    assert not allowed
    assert hits == [100.0, 101.0, 102.0]  # a refused hit is not logged
    assert retry == pytest.approx(7.0)  # the hit at 100 leaves the window at 110


def test_rate_hit_window_slides_and_weights_count() -> None:
    value = _log([100.0, 101.0, 102.0])
    hits, allowed, _ = rules.rate_hit(value, 3, 10.0, 1, 110.0)
    assert allowed
    assert hits == [101.0, 102.0, 110.0]
    hits, allowed, retry = rules.rate_hit(_log(hits), 3, 10.0, 2, 110.5)
    assert not allowed
    assert retry == pytest.approx(1.5)


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=40), st.integers(1, 10))
def test_rate_hit_never_admits_more_than_limit_per_window(times: list[float], limit: int) -> None:
    value: str | None = None
    admitted: list[float] = []
    for now in sorted(times):
        hits, allowed, retry = rules.rate_hit(value, limit, 5.0, 1, now)
        value = _log(hits)
        if allowed:
            admitted.append(now)
        else:
            assert retry > 0
        assert sum(1 for t in admitted if t > now - 5.0) <= limit


def test_login_locks_after_max_failures_and_grows_when_progressive() -> None:
    policy = {
        "max_failures": 3,
        "window": 60.0,
        "lockout": 100.0,
        "progressive": True,
        "max_lockout": 350.0,
    }
    value = None
    for i in range(3):
        record = rules.login_failure(value, 1000.0 + i, **policy)  # type: ignore[arg-type]
        value = orjson.dumps(record).decode()
    assert record["locked_until"] == 1102.0
    assert record["lockouts"] == 1
    # failures while locked count, but do not extend the lock
    record = rules.login_failure(value, 1050.0, **policy)  # type: ignore[arg-type]
    assert record["failures"] == 4
    assert record["locked_until"] == 1102.0
    value = orjson.dumps(record).decode()
    for i in range(3):
        record = rules.login_failure(value, 1200.0 + i, **policy)  # type: ignore[arg-type]
        value = orjson.dumps(record).decode()
    assert record["lockouts"] == 2
    assert record["locked_until"] == 1202.0 + 200.0
    for round_ in range(2):
        for i in range(3):
            record = rules.login_failure(value, 2000.0 + 1000 * round_ + i, **policy)  # type: ignore[arg-type]
            value = orjson.dumps(record).decode()
    assert record["lockouts"] == 4
    assert record["locked_until"] == 3002.0 + 350.0  # capped at max_lockout


def test_login_failures_outside_the_window_do_not_lock() -> None:
    value = None
    for i in range(10):
        record = rules.login_failure(value, 1000.0 + 61 * i, 3, 60.0, 100.0, False, 100.0)
        value = orjson.dumps(record).decode()
    assert record["locked_until"] is None
    assert record["failures"] == 10
    assert rules.login_expiry(record, 60.0, 500.0) == 1000.0 + 61 * 9 + 60.0 + 500.0


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("daily", "2026-11-22T13:45:00", "2026-11-22T00:00:00", "2026-11-23T00:00:00"),
        ("weekly", "2026-11-22T13:45:00", "2026-11-16T00:00:00", "2026-11-23T00:00:00"),
        ("monthly", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("monthly", "2026-02-10T00:00:00", "2026-02-01T00:00:00", "2026-03-01T00:00:00"),
    ],
)
def test_period_bounds_are_utc_calendar_periods(
    period: str, now: str, start: str, end: str
) -> None:
    def ts(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()

    assert rules.period_bounds(period, ts(now)) == (ts(start), ts(end))
    assert rules.period_bounds("none", ts(now)) == (None, None)


def test_period_bounds_refuses_an_unknown_period() -> None:
    with pytest.raises(InvalidInput, match="period"):
        rules.period_bounds("hourly", 0.0)


def test_budget_record_resets_usage_when_the_period_turns_and_keeps_limits() -> None:
    day = 86_400.0
    record = rules.budget_record(None, "daily", 10 * day + 5)
    assert record["start"] == 10 * day
    assert record["input_tokens"] == 0
    record.update(input_tokens=40, output_tokens=2, cost=0.5, limits={"tokens": 50})
    same = rules.budget_record(orjson.dumps(record).decode(), "daily", 10 * day + 99)
    assert same["input_tokens"] == 40
    assert rules.budget_excess(same, 50, None, 5, 4, 0.0) == ("tokens", 42, 9, 50)
    assert rules.budget_excess(same, 50, None, 5, 3, 0.0) is None  # exactly the limit fits
    assert rules.budget_excess(same, None, 0.75, 0, 0, 0.3) == ("cost", 0.5, 0.3, 0.75)
    nextday = rules.budget_record(orjson.dumps(record).decode(), "daily", 11 * day + 1)
    assert nextday["input_tokens"] == 0
    assert nextday["limits"] == {"tokens": 50}


def test_client_ip_trusts_forwarded_for_only_behind_a_trusted_proxy() -> None:
    trusted = ["10.0.0.0/8", "127.0.0.1"]
    assert rules.client_ip("203.0.113.9", "1.2.3.4", trusted) == "203.0.113.9"  # forged
    assert rules.client_ip("10.1.1.1", "198.51.100.7", trusted) == "198.51.100.7"
    # the nearest untrusted hop wins: a client cannot prepend a fake address
    assert rules.client_ip("10.1.1.1", "6.6.6.6, 198.51.100.7, 10.2.2.2", trusted) == (
        "198.51.100.7"
    )
    assert rules.client_ip("10.1.1.1", "not-an-ip", trusted) == "10.1.1.1"
    assert rules.client_ip("10.1.1.1", None, trusted) == "10.1.1.1"
    assert rules.client_ip(None, "1.2.3.4", trusted) == "unknown"
